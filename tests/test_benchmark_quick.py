"""The benchmark (`benchmarks/compare.py --quick`) runs and writes its outputs."""

import json
import math
import os
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare  # noqa: E402
import controller_signal  # noqa: E402
import keras  # noqa: E402
import problems  # noqa: E402
import report  # noqa: E402
import runner  # noqa: E402

import keras_soaa  # noqa: E402

# The quick run's optimizers; the others train in
# `test_every_other_optimizer_trains`.
OPTIMIZERS = ("soaa", "soaa_hd", "adam", "schedulefree")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    results, config = compare.main(
        ["--quick", "--optimizers", ",".join(OPTIMIZERS), "--out", str(out)]
    )
    return out, results, config


def main_table_rows(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("| problem | optimizer |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_has_a_row_per_problem_and_optimizer(quick_run):
    out, results, _ = quick_run
    rows = main_table_rows((out / "report.md").read_text())
    assert sorted((row[0], row[1]) for row in rows) == sorted(
        (name, report.NAMES[o]) for name in problems.PROBLEM_NAMES
        for o in OPTIMIZERS
    )
    for row in rows:
        grid = results[row[0]]["problem"]["lrs"]
        assert row[2] in {f"{k} / {len(OPTIMIZERS)}"
                          for k in range(1, len(OPTIMIZERS) + 1)}
        assert float(row[3].split()[0]) in grid
        assert "±" in row[4]
        steps = results[row[0]]["problem"]["steps"]
        assert row[5].endswith(f"/ {steps}")
        held_out_name = results[row[0]]["problem"]["held_out_name"]
        # ScheduleFreeAdamW's held-out metric also at its averaged point x.
        assert ("(at x: " in row[6]) == (
            row[1] == "ScheduleFreeAdamW" and held_out_name is not None)
        if row[1] in ("SOAA", "SOAA-HD"):
            assert row[8].count("%") == 2
            assert 0 <= float(row[9].rstrip("%")) <= 100
        else:
            assert row[8] == row[9] == "—"
    # Within a problem, the rows go from rank 1 down.
    for name in problems.PROBLEM_NAMES:
        ranks = [int(row[2].split()[0]) for row in rows if row[0] == name]
        assert ranks == list(range(1, len(OPTIMIZERS) + 1))
    text = (out / "report.md").read_text()
    assert "Lion" not in text  # named only when it ran
    assert "eager update" not in text
    for name in problems.PROBLEM_NAMES:
        assert f"## {name}" in text and f"![{name}]({name}.png)" in text


def test_plots_are_png_files(quick_run):
    out, _, _ = quick_run
    for name in problems.PROBLEM_NAMES:
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 400 and height >= 300
        assert len(data) > 20_000


def test_every_run_is_recorded_and_soaa_radius_stays_in_its_bounds(quick_run):
    _, results, config = quick_run
    assert config["seeds"] == [0]
    for entry in results.values():
        steps = entry["problem"]["steps"]
        assert steps == compare.QUICK_STEPS
        assert set(entry["runs"]) == set(OPTIMIZERS)
        for optimizer, by_lr in entry["runs"].items():
            assert [float(lr) for lr in by_lr] == entry["problem"]["lrs"]
            for records in by_lr.values():
                (record,) = records
                assert len(record["loss"]) == steps
                assert np.all(np.isfinite(record["loss"]))
                assert np.all(np.diff(record["time"]) >= 0)
                if optimizer == "schedulefree":
                    assert (record["held_out_x"] is None) == (
                        record["held_out"] is None)
                else:
                    assert record["held_out_x"] is None
                if optimizer not in ("soaa", "soaa_hd"):
                    assert record["radius"] is None
                    assert record["fisher_share"] is None
                    continue
                if optimizer == "soaa_hd":
                    # SOAA's defaults: constant bounds, any radius inside.
                    assert record["radius_bounds"] == [0.1, 10.0]
                    radius = np.array(record["radius"])
                    assert len(radius) == steps
                    assert np.all((radius >= 0.1 * (1 - 1e-6))
                                  & (radius <= 10.0 * (1 + 1e-6)))
                    # It moves after every step but the first (no previous
                    # direction yet), by at most rate·|cos| ≤ 0.05 in log d.
                    steps_in_log = np.diff(np.log(np.concatenate([[1.0], radius])))
                    assert np.all(np.abs(steps_in_log) <= 0.05 + 1e-5)
                    assert steps_in_log[0] == 0 and np.all(steps_in_log[1:] != 0)
                    continue
                assert record["radius_bounds"] is None
                # Probed at steps 1 and 11, ... (every 10 steps).
                assert len(record["fisher_share"]) == -(-steps // 10)
                assert all(0 <= share <= 1 for share in record["fisher_share"])
                radius = np.array(record["radius"])
                lower, upper = report.radius_bounds(steps, steps)
                assert len(radius) == steps
                assert np.all(radius >= lower * (1 - 1e-6))
                assert np.all(radius <= upper * (1 + 1e-6))
                # The first observation puts the radius on its lower bound, 1.
                assert radius[0] == pytest.approx(1.0)


def test_report_redraws_identically_from_results_json(quick_run, tmp_path):
    out, _, _ = quick_run
    saved = json.loads((out / "results.json").read_text())
    report.write(saved["results"], saved["config"], str(tmp_path))
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()


def test_a_reused_compiled_model_reproduces_fresh_runs():
    problem = problems.make_problem("quadratic", steps=10, quick=True)
    learning_rates, seeds = [0.03, 0.1], [0]
    reused = runner.sweep(problem, "soaa", learning_rates, seeds, reuse=True)
    fresh = runner.sweep(problem, "soaa", learning_rates, seeds, reuse=False)
    for key in reused:
        for a, b in zip(reused[key], fresh[key]):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
            np.testing.assert_allclose(a["radius"], b["radius"], rtol=1e-5)
    # The two rates really ran differently.
    first, second = (reused[key][0]["loss"] for key in reused)
    assert first[-1] != second[-1]


def test_radius_bounds_follow_the_spec():
    lower, upper = report.radius_bounds(steps=5, total_steps=4)
    # After step t: e = min(t - 1, T) / T.
    e = np.array([0, 1, 2, 3, 4]) / 4
    np.testing.assert_allclose(lower, 0.9**e)
    np.testing.assert_allclose(upper, 1 + 0.1**e)
    assert (lower[0], upper[0]) == (1.0, 2.0)
    assert (lower[-1], upper[-1]) == pytest.approx((0.9, 1.1))
    radii = [1.0, 1.5, upper[2], lower[3], 1.0]
    assert report.bound_fractions(radii, total_steps=4) == (0.4, 0.2)


def test_trailing_mean_and_verdict():
    np.testing.assert_allclose(
        report.trailing_mean([4.0, 2.0, 6.0, 0.0], window=2), [4, 3, 4, 3]
    )

    def entry(mean, std):
        return {"final": {"mean": mean, "std": std}}

    summary = {"soaa": entry(1.0, 0.01), "soaa_cosine": entry(0.5, 0.01),
               "adam": entry(2.0, 0.01), "adamw": entry(3.0, 0.01),
               "schedulefree": entry(1.5, 0.01)}
    # Against the strongest optimizer that is not SOAA, not against Adam.
    assert report.verdict(summary) == ("wins", "schedulefree")
    assert report.verdict(summary, "soaa_cosine") == ("wins", "schedulefree")
    assert report.strongest(summary) == "soaa_cosine"
    assert report.ranking(summary) == ["soaa_cosine", "soaa", "schedulefree",
                                       "adam", "adamw"]
    summary["soaa"] = entry(1.51, 0.0)
    assert report.verdict(summary) == ("ties", "schedulefree")
    summary["soaa"] = entry(2.5, 0.1)
    assert report.verdict(summary) == ("loses", "schedulefree")
    summary["schedulefree"] = {"final": {"mean": float("inf"), "std": 0.0}}
    assert report.verdict(summary) == ("loses", "adam")
    assert report.ranking(summary)[-1] == "schedulefree"


def test_plots_show_soaa_and_the_strongest_others():
    def entry(mean):
        return {"final": {"mean": mean, "std": 0.0}}

    summary = {name: entry(float(k)) for k, name in enumerate(
        ["lion", "muon", "adam", "soaa", "adamw", "schedulefree",
         "soaa_cosine", "adam_cosine", "soaa_hd", "soaa_hd_cosine"])}
    # The recommended SOAA, the paper's, Adam and the two strongest others
    # that are not SOAA variants; in rank order.
    assert compare.RECOMMENDED == "soaa_cosine"
    assert report.plotted(summary) == ["lion", "muon", "adam", "soaa",
                                       "soaa_cosine"]
    # Fewer of the three: more others, at most five in all.
    del summary["soaa"], summary["adam"]
    assert report.plotted(summary) == ["lion", "muon", "adamw", "schedulefree",
                                       "soaa_cosine"]
    # Only SOAA variants: the strongest of them.
    only_soaa = {o: summary[o] for o in ("soaa_cosine", "soaa_hd_cosine")}
    assert report.plotted(only_soaa) == ["soaa_cosine", "soaa_hd_cosine"]


def test_at_most_five_curves_per_panel_in_distinct_colours(quick_run,
                                                           monkeypatch):
    """Every optimizer ran (the quick run's records under every name): each
    panel draws at most five, in distinct fixed colours, and no legend sits
    on an axes."""
    _, results, _ = quick_run
    entry = json.loads(json.dumps(results["digits"]))
    source = entry["runs"]["soaa"]
    for name in compare.OPTIMIZERS:
        entry["runs"].setdefault(name, source)
    summary = report.summarize(entry)
    figures = []
    monkeypatch.setattr(report, "save_small_png",
                        lambda figure, path: figures.append(figure))
    monkeypatch.setattr(report.plt, "close", lambda figure: None)
    report.plot_problem("digits", entry, summary, "unused.png")
    (figure,) = figures
    by_step, by_time, by_lr, radius = figure.axes
    shown = report.plotted(summary)
    assert len(shown) == report.MAX_CURVES <= 5
    assert {compare.RECOMMENDED, "soaa", "adam"} <= set(shown)
    colours = [report.COLORS[o] for o in shown]
    assert len(set(colours)) == len(colours)
    for axis in (by_step, by_time):
        assert len(axis.get_lines()) == len(shown)
    assert len({line.get_color() for line in by_step.get_lines()}) == len(shown)
    # The sweep: one error-bar series per optimizer, in its colour.
    assert len(by_lr.containers) == len(shown)
    assert {line.get_color() for line in by_lr.get_lines()} == set(colours)
    # The radius: one line per seed of the SOAA variants shown, and bounds.
    soaa_shown = [o for o in shown if o in report.SOAA_VARIANTS]
    radius_colours = {line.get_color() for line in radius.get_lines()}
    assert {report.COLORS[o] for o in soaa_shown} <= radius_colours
    for axis in figure.axes:
        assert axis.get_legend() is None
    (legend,) = figure.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert sum(label.startswith("#") for label in labels) == len(shown)
    # The legend sits below the axes.
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    top = legend.get_window_extent(renderer).y1
    assert all(top <= axis.get_window_extent(renderer).y0
               for axis in figure.axes)
    report.plt.close(figure)


def test_the_wall_clock_starts_after_the_first_step():
    records = [{"time": [5.0, 5.5, 6.0]}, {"time": [1.0, 1.25, 1.5]}]
    np.testing.assert_allclose(report.wall_clock(records), [0.0, 0.375, 0.75])


def test_the_wall_clock_panel_leaves_out_compilation(quick_run):
    out, results, _ = quick_run
    for entry in results.values():
        for by_lr in entry["runs"].values():
            for records in by_lr.values():
                assert report.wall_clock(records)[0] == 0.0


def verdict_lines(text):
    return {line.split("**")[1]: line for line in text.splitlines()
            if line.startswith("- **") and "**: best " in line}


def test_the_verdict_names_the_strongest_optimizer(quick_run):
    out, results, _ = quick_run
    lines = verdict_lines((out / "report.md").read_text())
    assert set(lines) == set(problems.PROBLEM_NAMES)
    for name, entry in results.items():
        # The lowest mean final loss over seeds of each optimizer's best rate.
        best = {
            optimizer: min(np.mean([r["final_loss"] for r in records])
                           for records in by_lr.values())
            for optimizer, by_lr in entry["runs"].items()
        }
        winner = min(best, key=best.get)
        other = min((o for o in best if o not in ("soaa", "soaa_hd")),
                    key=best.get)
        line = lines[name]
        assert line.startswith(f"- **{name}**: best {report.NAMES[winner]} (")
        assert f"against {report.NAMES[other]} (" in line
        for soaa in ("soaa", "soaa_hd"):
            # Equal losses keep the run's order.
            rank = sorted(best, key=best.get).index(soaa) + 1
            assert f"{report.NAMES[soaa]} (rank {rank} of {len(best)})" in line


def test_the_report_states_the_targets_for_each_soaa_variant(quick_run):
    out, _, config = quick_run
    text = (out / "report.md").read_text()
    assert config["hypergradient"] == {
        "radius_learning_rate": 0.05, "min_radius": 0.1, "max_radius": 10.0}
    assert "`radius_learning_rate=0.05`, `min_radius=0.1`, `max_radius=10`" in text
    section = text.split("## Targets for the radius controllers")[1]
    section = section.split("\n## ")[0]
    rows = [line for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| problem")]
    assert sorted(row.split(" | ")[:2] for row in rows) == sorted(
        [f"| {name}", report.NAMES[o]] for name in problems.PROBLEM_NAMES
        for o in ("soaa", "soaa_hd"))
    for optimizer in ("soaa", "soaa_hd"):
        assert f"- **{report.NAMES[optimizer]}**: T1 " in section


def test_options_cover_every_optimizer():
    assert compare.parse_args([]).optimizers == list(compare.DEFAULT_OPTIMIZERS)
    # --full: every default optimizer of the README's tables.
    assert compare.parse_args(["--full"]).optimizers == list(
        compare.FULL_OPTIMIZERS)
    assert {"soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine", "adam",
            "adam_cosine", "schedulefree"} <= set(compare.FULL_OPTIMIZERS)
    assert compare.parse_args([]).hypergradient == {}
    args = compare.parse_args(["--hd-radius-lr", "0.1", "--hd-bounds", "0.3,3"])
    assert args.hypergradient == {"radius_learning_rate": 0.1,
                                  "min_radius": 0.3, "max_radius": 3.0}
    with pytest.raises(SystemExit):
        compare.parse_args(["--hd-bounds", "3,0.3"])
    assert compare.parse_args(["--optimizers", "all"]).optimizers == list(
        compare.OPTIMIZERS)
    assert {"muon", "lion", "adamw"} <= set(compare.OPTIMIZERS)
    with pytest.raises(SystemExit):
        compare.parse_args(["--optimizers", "sgd"])
    for name in compare.OPTIMIZERS:
        assert name in report.NAMES and name in report.COLORS


def chosen(argv):
    """The problems `compare.py argv` would run."""
    return compare.problem_names(compare.parse_args(argv), problems)


def test_the_three_modes():
    default = compare.parse_args([])
    assert default.mode == "default"
    assert default.problem_set == "calibration"
    assert chosen([]) == ["digits", "breast_cancer", "quadratic",
                          "rosenbrock"]
    assert (default.seeds, default.steps, default.middle_grid) == (3, None,
                                                                   False)
    # The verdict: the recommended SOAA and the paper's against the peers.
    assert {compare.RECOMMENDED, "soaa", "adam", "adam_cosine",
            "schedulefree"} <= set(default.optimizers)
    # --full: what the default run did before (every problem and default
    # optimizer, 3 seeds, each problem's own steps and grid).
    full = compare.parse_args(["--full"])
    assert (full.mode, full.seeds, full.steps,
            full.middle_grid) == ("full", 3, None, False)
    assert chosen(["--full"]) == list(problems.CALIBRATION)
    assert full.optimizers == ["soaa", "soaa_cosine", "soaa_hd",
                               "soaa_hd_cosine", "soaa_gr", "soaa_gr_cosine",
                               "adam", "adam_cosine", "schedulefree"]
    quick = compare.parse_args(["--quick"])
    assert (quick.mode, quick.seeds, quick.steps,
            quick.middle_grid) == ("quick", 1, compare.QUICK_STEPS, True)
    assert chosen(["--quick"]) == list(problems.CALIBRATION)
    assert compare.RECOMMENDED in quick.optimizers
    with pytest.raises(SystemExit):
        compare.parse_args(["--quick", "--full"])
    # Explicit options override the mode's.
    args = compare.parse_args(["--full", "--problems", "digits", "--seeds",
                               "2", "--steps", "50", "--optimizers", "adam",
                               "--lrs", "0.1,0.2"])
    assert (args.problems, args.seeds, args.steps, args.optimizers,
            args.lrs) == ("digits", 2, 50, ["adam"], [0.1, 0.2])
    # --help lists the modes.
    for mode in compare.MODES.values():
        assert mode.problems in ("all", "fast")
        assert set(mode.optimizers) <= set(compare.OPTIMIZERS)
    text = compare.modes_text()
    for flag in ("(default)", "--full", "--quick"):
        assert f"  {flag}: " in text
    assert ", ".join(compare.DEFAULT_OPTIMIZERS[:2]) in text


def test_each_run_gets_a_new_folder(tmp_path):
    now = 1_700_000_000.0
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    args = compare.parse_args([])
    first = compare.output_folder(args, root=str(tmp_path), now=now)
    second = compare.output_folder(args, root=str(tmp_path), now=now)
    assert first == str(tmp_path / f"default-{stamp}")
    assert second == first + "-2"
    quick = compare.output_folder(compare.parse_args(["--quick"]),
                                  root=str(tmp_path), now=now)
    full = compare.output_folder(compare.parse_args(["--full"]),
                                 root=str(tmp_path), now=now)
    assert Path(quick).name == f"quick-{stamp}"
    assert Path(full).name == f"full-{stamp}"
    assert all(os.path.isdir(f) for f in (first, second, quick, full))
    # Another set than calibration: named in the folder.
    held_out = compare.output_folder(
        compare.parse_args(["--full", "--set", "held_out"]),
        root=str(tmp_path), now=now)
    assert Path(held_out).name == f"full-held_out-{stamp}"
    # The set the problems make up names it, whatever --set said.
    both = compare.output_folder(compare.parse_args(["--full"]),
                                 root=str(tmp_path), now=now,
                                 problem_set="all")
    assert Path(both).name == f"full-all-{stamp}"
    (tmp_path / f"full-{stamp}" / "results.json").write_text("{}")
    (Path(held_out) / "results.json").write_text("{}")
    # The newest full run of a set; calibration's by default.
    assert compare.latest_run(str(tmp_path)) == full
    assert compare.latest_run(str(tmp_path), modes=("default",)) is None
    assert compare.latest_run(str(tmp_path),
                              problem_set="held_out") == held_out
    assert compare.latest_run(str(tmp_path), problem_set="all") is None


def test_an_explicit_out_with_results_is_refused(tmp_path, capsys):
    folder = tmp_path / "old"
    folder.mkdir()
    args = compare.parse_args(["--out", str(folder)])
    assert compare.output_folder(args) == str(folder)  # empty: fine
    (folder / "results.json").write_text('{"kept": true}')
    with pytest.raises(SystemExit, match="--overwrite"):
        compare.output_folder(args)
    # Refused before anything runs; the old results stay.
    with pytest.raises(SystemExit, match="already holds results"):
        compare.main(["--quick", "--problems", "rosenbrock", "--optimizers",
                      "adam", "--out", str(folder)])
    assert json.loads((folder / "results.json").read_text()) == {"kept": True}
    assert "runs on" not in capsys.readouterr().out
    args = compare.parse_args(["--out", str(folder), "--overwrite"])
    assert compare.output_folder(args) == str(folder)


def test_a_run_without_out_writes_a_new_folder_and_says_where(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--quick", "--problems", "rosenbrock", "--optimizers", "adam",
            "--lrs", "0.1", "--steps", "4"]
    compare.main(tiny)
    compare.main(tiny)
    folders = sorted((tmp_path / compare.RUNS).iterdir())
    assert len(folders) == 2
    for folder in folders:
        assert re.fullmatch(r"quick-\d{8}-\d{6}(-\d+)?", folder.name)
        assert (folder / "results.json").exists()
        assert (folder / "report.md").exists()
    out = capsys.readouterr().out
    for folder in folders:
        where = os.path.join(compare.RUNS, folder.name)
        assert f"writing to {where}\n" in out
        assert f"to {where}\n" in out.split(f"writing to {where}\n")[1]


def test_the_progress_line_weighs_runs_by_their_cost():
    """Ten cheap runs done, ten expensive ones left: not 50%, and the time
    left is the expensive runs' expected time at the measured rate."""
    now = [0.0]
    progress = runner.Progress(clock=lambda: now[0])
    progress.plan("fast", cost=10.0, runs=10)
    progress.plan("slow", cost=1000.0, runs=10)
    line = ""
    for _ in range(10):
        now[0] += 2.0  # twice as slow as expected
        line = progress.next("fast", 1.0)
    assert progress.remaining() == pytest.approx(2000.0)
    assert line == "[10/20   1%, 0:20 elapsed, ~33:20 left]"
    # The slow problem runs faster than the fast one's rate: its own rate
    # (0.5 s per unit) takes over as its runs add up.
    now[0] += 50.0
    progress.next("slow", 100.0)
    prior = runner.PRIOR_SHARE * 1000.0
    rate = (50.0 + prior * 70.0 / 110.0) / (100.0 + prior)
    assert progress.remaining() == pytest.approx(900.0 * rate)
    for _ in range(8):
        now[0] += 50.0
        progress.next("slow", 100.0)
    assert progress.remaining() == pytest.approx(
        100.0 * (450.0 + prior * 470.0 / 910.0) / (900.0 + prior))
    assert runner.clock_text(3725) == "1:02:05"


def test_the_expected_costs_follow_the_slow_problems():
    char_lm = problems.make_problem("char_lm")
    digits = problems.make_problem("digits")
    assert runner.run_cost(char_lm, "adam") > 50 * runner.run_cost(digits,
                                                                   "adam")
    assert runner.run_cost(digits, "soaa") > runner.run_cost(digits, "adam")
    assert runner.run_cost(digits, "adam", compiled=True) > runner.run_cost(
        digits, "adam")
    # One compilation per (problem, optimizer); per rate with a schedule.
    assert runner.compiles("adam", [1, 2], [0, 1]) == [True, False, False,
                                                       False]
    assert runner.compiles("adam_cosine", [1, 2], [0, 1]) == [True, False,
                                                              True, False]
    assert runner.compiles("adam", [1], [0, 1], reuse=False) == [True, True]


def test_the_header_shows_the_installed_versions(quick_run):
    out, _, config = quick_run
    header = (out / "report.md").read_text().splitlines()[2]
    backend = keras.backend.backend()
    version = __import__(backend).__version__
    assert f"keras-soaa **{keras_soaa.__version__}**" in header
    assert f"keras {keras.__version__}" in header
    assert f"{backend} {version}" in header
    assert "quick mode" in header
    assert config["versions"]["keras-soaa"] == keras_soaa.__version__
    assert config["mode"] == "quick"


def test_the_benchmark_does_not_import_tensorflow_on_jax_or_torch():
    backend = keras.backend.backend()
    if backend == "tensorflow":
        pytest.skip("TensorFlow is the backend")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "import problems, report, runner;"
        "p = problems.make_problem('breast_cancer', steps=4, quick=True);"
        "runner.sweep(p, 'soaa', [0.01], [0]);"
        "runner.sweep(p, 'schedulefree', [0.01], [0]);"
        "print('tensorflow' in sys.modules)"
    )
    env = dict(os.environ, KERAS_BACKEND=backend)
    done = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)],
                          env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout
    assert "tensorflow" not in done.stderr.lower()


def test_the_benchmark_uses_public_names_only():
    """No private attribute of a Keras or keras_soaa object in the files that
    run the benchmark (the benchmark's own helpers aside)."""
    own = {"_fit", "_fresh_start", "_compiled_model", "_variables",
           "_predict", "_accuracy"}
    for name in ("compare.py", "runner.py", "report.py", "problems.py",
                 "controller_signal.py"):
        text = (BENCHMARKS / name).read_text()
        assert "_keras_internals" not in text
        assert "keras.src" not in text
        private = set(re.findall(r"\.(_[a-z]\w*)", text)) - own
        assert not private, (name, private)


def test_the_loss_metric_and_slots_are_found_by_public_names():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras_soaa.SOAA(total_steps=10), loss="mse")
    model.optimizer.build(model.trainable_variables)
    assert runner.loss_metric(model).name == "loss"
    assert runner.loss_metric(model) in model.metrics
    kernel = model.trainable_variables[0]
    momentum = runner.slot_variable(model.optimizer, kernel, "momentum")
    velocity = runner.slot_variable(model.optimizer, kernel, "velocity")
    assert tuple(momentum.shape) == tuple(velocity.shape) == (3, 2)
    assert momentum is not velocity
    model.optimizer.apply([np.full((3, 2), 2.0, "float32"),
                           np.full((2,), 1e-6, "float32")],
                          model.trainable_variables)
    share = runner.fisher_share(model.optimizer, model.trainable_variables)
    # d·c·v̂ > √v̂ where √v̂ > 1/(d·c): the kernel's large gradients only.
    assert share == pytest.approx(6 / 8)
    assert runner.fisher_share(keras.optimizers.Adam(), []) is None


def controller_of(optimizer):
    """The registered name of a SOAA's controller, from its public config."""
    return optimizer.get_config()["controller"]


def test_hypergradient_variants_pass_the_controller_and_its_arguments():
    optimizer = runner.make_optimizer("soaa_hd", 0.01)
    assert controller_of(optimizer) == "hypergradient"
    assert (optimizer.radius_learning_rate, optimizer.min_radius,
            optimizer.max_radius) == (0.05, 0.1, 10.0)
    assert controller_of(runner.make_optimizer("soaa", 0.01)) == "paper"
    saved = dict(runner.HYPERGRADIENT_ARGUMENTS)
    try:
        runner.HYPERGRADIENT_ARGUMENTS.update(radius_learning_rate=0.1,
                                              min_radius=0.3, max_radius=3.0)
        optimizer = runner.make_optimizer("soaa_hd_cosine", 0.01, steps=10)
        assert controller_of(optimizer) == "hypergradient"
        assert (optimizer.radius_learning_rate, optimizer.min_radius,
                optimizer.max_radius) == (0.1, 0.3, 3.0)
        assert runner.hypergradient_arguments() == {
            "radius_learning_rate": 0.1, "min_radius": 0.3, "max_radius": 3.0}
    finally:
        runner.HYPERGRADIENT_ARGUMENTS.clear()
        runner.HYPERGRADIENT_ARGUMENTS.update(saved)


def test_gradient_ratio_variants_pass_the_controller():
    for name in ("soaa_gr", "soaa_gr_cosine"):
        optimizer = runner.make_optimizer(name, 0.01, steps=10)
        assert controller_of(optimizer) == "gradient_ratio"
        assert runner.is_soaa(name) and runner.is_hypergradient(name)


def test_merge_adds_a_previous_runs_optimizers(tmp_path):
    common = ["--quick", "--problems", "breast_cancer"]
    first, _ = compare.main(common + ["--optimizers", "adam",
                                      "--out", str(tmp_path / "a")])
    merged, config = compare.main(
        common + ["--optimizers", "soaa_gr", "--merge", str(tmp_path / "a"),
                  "--out", str(tmp_path / "b")])
    runs = merged["breast_cancer"]["runs"]
    assert list(runs) == ["adam", "soaa_gr"]
    assert runs["adam"] == first["breast_cancer"]["runs"]["adam"]
    assert config["merged_from"]["optimizers"] == ["adam"]
    text = (tmp_path / "b" / "report.md").read_text()
    assert "| breast_cancer | Adam |" in text and "| breast_cancer | SOAA-GR |" in text
    with pytest.raises(SystemExit):
        compare.main(common + ["--seeds", "2", "--optimizers", "soaa",
                               "--merge", str(tmp_path / "a"),
                               "--out", str(tmp_path / "c")])


def test_bound_fractions_with_constant_bounds_and_the_interior():
    trace = [0.1, 0.1000001, 0.5, 10.0, 3.0, 9.99, 0.10001, 10.0]
    # On a bound: within a relative 1e-5 (float32 rounding).
    assert report.bound_fractions(trace, 8, bounds=(0.1, 10.0)) == (0.25, 0.25)
    assert report.interior_fraction(trace, 8, bounds=(0.1, 10.0)) == 0.5
    # The paper controller's narrowing bounds when none are given.
    lower, upper = report.radius_bounds(4, 4)
    paper = [lower[0], 1.5, upper[2], 1.0]
    assert report.interior_fraction(paper, 4) == pytest.approx(0.5)


def test_the_targets_figures_on_a_hand_made_summary():
    def item(mean, std, steps, sweep, interior=None):
        return {"final": {"mean": mean, "std": std}, "steps_to_adam": steps,
                "sweep": {repr(lr): {"lr": lr, "mean": m}
                          for lr, m in sweep.items()},
                "interior": interior}

    summary = {
        # Within 2x of its best at 0.01..1: 2 decades; Adam's 0.1..1: 1.
        "soaa_hd": item(1.0, 0.1, 70, {0.01: 1.9, 0.1: 1.0, 1.0: 1.5,
                                        10.0: math.inf}, interior=0.9),
        "adam": item(2.0, 0.1, 100, {0.01: 9.0, 0.1: 2.0, 1.0: 3.0}),
        "adam_cosine": item(1.05, 0.01, 80, {0.1: 1.05}),
        "schedulefree": item(1.5, 0.01, 90, {0.1: 1.5}),
    }
    figures = report.target_figures(summary, "soaa_hd")
    assert figures["steps_ratio"] == pytest.approx(0.7)
    assert figures["against_scheduled"] == "ties"  # 1.0 ± 0.1 vs 1.05 ± 0.01
    assert figures["scheduled_peer"] == "adam_cosine"
    assert figures["width"] == pytest.approx(2.0)
    assert figures["adam_width"] == pytest.approx(1.0)
    assert figures["interior"] == 0.9
    other = dict(figures, steps_ratio=1.2, against_scheduled="loses",
                 width=1.0, interior=0.3)
    verdicts = report.target_verdicts({"a": figures, "b": other})
    assert verdicts["T1"] == {"share_at_most_0.8": 0.5, "worst": 1.2,
                              "pass": False}
    assert verdicts["T2"] == {"share_ties_or_wins": 0.5, "pass": False}
    assert verdicts["T3"] == {"share_wider": 0.5, "pass": False}
    assert verdicts["T4_interior"]["min"] == 0.3
    assert not verdicts["T4_interior"]["pass"]
    summary["soaa_hd"]["steps_to_adam"] = None  # never reached
    assert report.target_figures(summary, "soaa_hd")["steps_ratio"] == math.inf


def signal_setup(controller, steps=20):
    problem = problems.make_problem("quadratic", steps=steps, quick=True)
    x, y = problem.stream(0, problem.steps)
    chunk = runner.steps_per_epoch(problem)

    def make(adaptive):
        if controller == "soaa_hd":
            return keras_soaa.SOAA(
                learning_rate=0.05, controller="hypergradient",
                radius_learning_rate=0.05 if adaptive else 0.0)
        return keras_soaa.SOAA(learning_rate=0.05,
                               total_steps=None if adaptive else steps)

    def model(adaptive):
        runner.seed_everything(0)
        built = problem.build_model(0)
        built.compile(optimizer=make(adaptive), loss=problem.loss())
        return built

    def train(adaptive, extra=()):
        return controller_signal.train(
            model(adaptive), problem, 0, x, y, chunk, make(adaptive),
            with_callback=adaptive or controller == "soaa_hd", extra=extra)

    return problem, x, y, train


@pytest.mark.parametrize("controller", ["soaa", "soaa_hd"])
def test_the_placebo_replays_the_shuffled_radii(controller):
    _, _, _, train = signal_setup(controller)
    original = train(True)
    radii = controller_signal.used_radii(original["radius"])
    assert radii[0] == 1.0 and radii[1:] == original["radius"][:-1]
    assert len(set(np.round(radii, 6))) > 3  # the controller moved d
    # In time order, with the controller off, the replay reproduces the run.
    in_order = train(False, [controller_signal.RadiusReplay(radii)])
    np.testing.assert_allclose(in_order["loss"], original["loss"], rtol=1e-4)
    # Shuffled: each step runs with the assigned radius, which the
    # controller (off) leaves where it is.
    shuffled = list(np.random.default_rng(0).permutation(radii))
    assert shuffled != radii
    placebo = train(False, [controller_signal.RadiusReplay(shuffled)])
    np.testing.assert_allclose(placebo["radius"], shuffled, rtol=1e-5)
    assert not np.allclose(placebo["loss"], original["loss"], rtol=1e-6)


def test_the_oracle_probes_restore_the_run_exactly():
    problem, x, y, train = signal_setup("soaa_hd")
    plain = train(True)
    probe_x, probe_y = problem.stream(10_000, 2)
    oracle = controller_signal.OracleProbe(5, x, y, problem.batch_size,
                                           probe_x, probe_y, problem.loss())
    probed = train(True, [oracle])
    np.testing.assert_allclose(probed["loss"], plain["loss"], rtol=1e-5)
    np.testing.assert_allclose(probed["radius"], plain["radius"], rtol=1e-5)
    assert [p["step"] for p in oracle.probes] == [5, 10, 15]
    for probe in oracle.probes:
        assert len(probe["losses"]) == len(controller_signal.MULTIPLIERS)
        assert len(set(probe["losses"])) == len(probe["losses"])  # all ran
        assert probe["best"] == controller_signal.MULTIPLIERS[
            int(np.argmin(probe["losses"]))]
        # The radius the step used: the one logged after the step before.
        assert probe["radius"] == pytest.approx(plain["radius"][probe["step"] - 1],
                                                rel=1e-6)


def test_the_local_shuffle_keeps_each_window():
    values = list(range(10))
    shuffled = controller_signal.shuffled_within(values, 4,
                                                 np.random.default_rng(0))
    assert shuffled != values
    for start in (0, 4, 8):
        assert sorted(shuffled[start:start + 4]) == values[start:start + 4]


def test_spearman_matches_scipy():
    from scipy import stats

    a = [0.9, 1.2, 1.2, 2.0, 0.5, 1.7]
    b = [0.5, 1.0, 1.4, 2.0, 0.7, 1.0]
    assert controller_signal.spearman(a, b) == pytest.approx(
        stats.spearmanr(a, b).statistic)
    assert math.isnan(controller_signal.spearman([1.0, 1.0], [0.5, 2.0]))


@pytest.mark.parametrize(
    "name", ["soaa_cosine", "soaa_hd_cosine", "soaa_gr", "soaa_gr_cosine",
             "adam_cosine", "adamw", "muon", "lion", *compare.DESIGN_OPTIMIZERS])
def test_every_other_optimizer_trains(name):
    problem = problems.make_problem("digits", steps=10, quick=True)
    learning_rate = 0.01
    model = runner._compiled_model(problem, name, learning_rate, 0,
                                   runner.steps_per_epoch(problem))
    record = runner.run(model, problem, name, learning_rate, 0)
    assert len(record["loss"]) == 10 and np.all(np.isfinite(record["loss"]))
    assert 0 < record["held_out"] <= 1
    assert (record["radius"] is not None) == name.startswith("soaa")
    optimizer = model.optimizer
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 10
    lr = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    if name.endswith("_cosine"):
        # Cosine decay to 0 over the run; half the rate at mid-run.
        assert lr == pytest.approx(0.0, abs=1e-9)
        schedule = keras.optimizers.schedules.deserialize(
            optimizer.get_config()["learning_rate"])
        mid = float(keras.ops.convert_to_numpy(schedule(5)))
        assert mid == pytest.approx(learning_rate / 2, rel=1e-5)
    else:
        assert lr == pytest.approx(learning_rate)
    if name == "muon":
        # The hidden kernel takes Muon's step; the output kernel, the biases
        # (and any non-2-D variable) its AdamW fallback: only those have an
        # AdamW velocity.
        names = {v.name for v in optimizer.variables}
        uses_adamw = [f"{v.path.replace('/', '_')}_velocity" in names
                      for v in model.trainable_variables]
        shapes = [tuple(v.shape) for v in model.trainable_variables]
        assert dict(zip(shapes, uses_adamw)) == {
            (64, 128): False, (128,): True, (128, 10): True, (10,): True}


def schedule_free_numpy(start, gradients, learning_rate, beta_1, beta_2,
                        epsilon, z_read_after_update):
    """ScheduleFreeAdamW in float64, x tracked explicitly; returns (y, z, x).

    Defazio et al.: z takes Adam-scaled steps, x is the running average of
    the z's, the gradient is taken at y = (1 − β1)·z + β1·x. Keras recovers
    x_old from y_old and z_old; with `z_read_after_update` it uses the new z
    there instead, as Keras 3.15 does on TensorFlow and torch (its
    `momentum.value` is read after `assign_sub` has changed it in place).
    """
    z, y, v = start.copy(), start.copy(), np.zeros_like(start)
    for t, gradient in enumerate(gradients, start=1):
        v = beta_2 * v + (1 - beta_2) * gradient**2
        z_new = z - learning_rate * gradient / (
            np.sqrt(v / (1 - beta_2**t)) + epsilon)
        x_old = (y - (1 - beta_1) * (z_new if z_read_after_update else z)) / beta_1
        x = (1 - 1 / t) * x_old + z_new / t
        y = (1 - beta_1) * z_new + beta_1 * x
        z = z_new
    return y, z, x


def test_schedule_free_x_is_the_averaged_point():
    """x = (y − (1 − β1)·z) / β1 matches x tracked by hand in NumPy."""
    hyper = dict(learning_rate=1.0, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    start = np.array([[0.5, -1.0], [2.0, 0.25]])
    gradients = [np.array([[1.0, -2.0], [0.5, 3.0]]),
                 np.array([[-0.5, 1.0], [2.0, -1.0]]),
                 np.array([[0.25, 0.5], [-1.0, 2.0]])]
    variable = keras.Variable(start.astype("float32"))
    optimizer = keras.optimizers.ScheduleFreeAdamW(
        learning_rate=hyper["learning_rate"])
    optimizer.build([variable])
    for gradient in gradients:
        optimizer.apply([gradient.astype("float32")], [variable])
    aliased = keras.backend.backend() != "jax"
    y, _, x = schedule_free_numpy(start, gradients, **hyper,
                                  z_read_after_update=aliased)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(variable), y,
                               rtol=1e-5, atol=1e-5)
    (point,) = runner.schedule_free_x(optimizer, [variable])
    np.testing.assert_allclose(point, x, rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(x - y)) > 0.01  # x is not the trained point y
    # Only JAX follows the paper's update; if Keras fixes the other two, this
    # fails: drop `z_read_after_update` and the report's note on it.
    paper_y, _, _ = schedule_free_numpy(start, gradients, **hyper,
                                        z_read_after_update=False)
    follows_paper = np.allclose(keras.ops.convert_to_numpy(variable), paper_y,
                                rtol=1e-5, atol=1e-5)
    assert follows_paper == (not aliased)


def test_evaluating_at_another_point_puts_the_weights_back():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    values = [np.full(v.shape, 0.5, "float32") for v in model.trainable_variables]

    def output(m):
        return keras.ops.convert_to_numpy(m(np.ones((1, 3), "float32")))

    np.testing.assert_allclose(runner.evaluate_at(model, values, output),
                               [[2.0, 2.0]])
    for variable, value in zip(model.trainable_variables, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), value)


def test_speed_custom_loop_feeds_soaa_and_times_both_sides():
    """`speed.py`'s custom-loop mode: SOAA's step applies and observes (one
    loss per step), and the timing returns both sides' figures."""
    import argparse

    import speed
    from conftest import BACKEND, to_numpy

    model, _, input_shape, classes = speed.make_model("logreg", quick=True)
    optimizer = keras_soaa.SOAA(total_steps=100)
    optimizer.build(model.trainable_variables)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    step = speed.custom_loop_step(model, loss_fn, optimizer, observe=True)
    x, y = speed.make_data(input_shape, classes, 8, 3, False)
    losses = [float(to_numpy(step(keras.ops.convert_to_tensor(x[i:i + 8]),
                                  keras.ops.convert_to_tensor(y[i:i + 8]))))
              for i in range(0, 24, 8)]
    assert all(np.isfinite(losses))
    if BACKEND != "jax":  # JAX's loop keeps its state outside the variables
        assert int(to_numpy(optimizer.iterations)) == 3
        assert float(to_numpy(optimizer.loss_count)) == 3
    args = argparse.Namespace(small_steps=3, repeats=1, quick=True)
    result = speed.time_custom_loop("logreg", args)
    assert result["adam"] > 0 and result["soaa"] > 0
    assert result["soaa_state_bytes"] == result["adam_state_bytes"] + 20


# -- the problem sets: calibration and held-out ----------------------------------


def test_the_sets_are_disjoint_and_complete():
    calibration, held_out = problems.CALIBRATION, problems.HELD_OUT
    # Calibration: the six problems of old, unchanged.
    assert calibration == ("digits", "breast_cancer", "quadratic",
                           "rosenbrock", "char_lm", "digits_cnn")
    assert problems.PROBLEM_NAMES == calibration
    assert len(held_out) >= 6 and len(set(held_out)) == len(held_out)
    assert not set(calibration) & set(held_out)
    assert problems.SETS == {"calibration": calibration,
                             "held_out": held_out,
                             "all": calibration + held_out}
    assert set(compare.SET_NAMES) == set(problems.SETS)
    for name in problems.ALL_PROBLEMS:
        assert name in problems.DEFAULT_STEPS and name in problems.COSTS
    assert {problems.problem_set(n) for n in held_out} == {"held_out"}
    assert problems.covered_set(["digits", "quadratic"]) == "calibration"
    assert problems.covered_set(["wave_gru"]) == "held_out"
    assert problems.covered_set(["digits", "wave_gru"]) == "all"
    with pytest.raises(KeyError):
        problems.problem_set("mnist")
    for name in held_out:
        problem = problems.make_problem(name)
        assert problem.name == name and problem.cost == problems.COSTS[name]
        # Seven rates, four per decade.
        lrs = np.array(problem.lrs)
        assert len(lrs) == 7
        np.testing.assert_allclose(np.diff(np.log10(lrs)), 0.25, atol=0.02)


def test_the_set_option_picks_the_problems():
    fast = [n for n in problems.HELD_OUT
            if problems.expected_run_s(n) <= compare.FAST_RUN_S]
    # The default mode: the set's fast problems (all but the CNN).
    assert chosen(["--set", "held_out"]) == fast
    assert "shapes_cnn" not in fast and len(fast) >= 5
    assert chosen(["--full", "--set", "held_out"]) == list(problems.HELD_OUT)
    assert chosen(["--quick", "--set", "held_out"]) == list(problems.HELD_OUT)
    assert chosen(["--quick", "--set", "all"]) == list(problems.ALL_PROBLEMS)
    assert chosen(["--set", "all"]) == [
        "digits", "breast_cancer", "quadratic", "rosenbrock", *fast]
    # --problems names problems of either set; "all": every one of --set.
    assert chosen(["--problems", "wave_gru,digits"]) == ["wave_gru", "digits"]
    assert chosen(["--set", "held_out", "--problems", "all"]) == list(
        problems.HELD_OUT)
    assert chosen(["--problems", "all"]) == list(problems.CALIBRATION)
    with pytest.raises(SystemExit, match="unknown problem"):
        chosen(["--problems", "digits,mnist"])
    with pytest.raises(SystemExit):
        compare.parse_args(["--set", "test"])


@pytest.mark.parametrize("name", problems.HELD_OUT)
def test_every_held_out_problem_trains(name):
    problem = problems.make_problem(name, steps=4)
    assert problem.steps == 4
    # The data is the same for every seed; the batch order is the seed's.
    x, y = problem.stream(0, 4)
    again, _ = problem.stream(0, 4)
    other, _ = problem.stream(1, 4)
    assert len(x) == len(y) == 4 * problem.batch_size
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(x, other)
    assert x.dtype == np.float32
    runs = runner.sweep(problem, compare.RECOMMENDED, [problem.lrs[3]], [0])
    (record,) = runs[repr(problem.lrs[3])]
    assert len(record["loss"]) == 4 and np.all(np.isfinite(record["loss"]))
    assert np.isfinite(record["final_loss"])
    assert np.isfinite(record["held_out"])
    if not problem.held_out_lower_is_better:
        assert 0 <= record["held_out"] <= 1


def test_a_reused_model_reproduces_fresh_runs_with_dropout():
    """`tabular_bn` drops units: a fresh start also resets the seeds'
    state (and BatchNormalization's statistics) of a reused model."""
    problem = problems.make_problem("tabular_bn", steps=6)
    learning_rates, seeds = [0.003, 0.03], [0, 1]
    reused = runner.sweep(problem, "adam", learning_rates, seeds, reuse=True)
    fresh = runner.sweep(problem, "adam", learning_rates, seeds, reuse=False)
    for key in reused:
        for a, b in zip(reused[key], fresh[key]):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
            assert a["held_out"] == b["held_out"]
    assert reused["0.003"][0]["loss"] != reused["0.003"][1]["loss"]


def synthetic_results(finals, sets=None):
    """results.json-like results: {problem: {optimizer: {lr: [final per
    seed]}}} of non-SOAA optimizers; `sets`: {problem: set}."""
    results = {}
    for problem, runs in finals.items():
        results[problem] = {
            "problem": {"description": problem, "steps": 10,
                        "batch_size": 1, "lrs": [0.1, 0.2],
                        "held_out_name": None,
                        "held_out_lower_is_better": False,
                        "final_window": 1, "exact_gradients": False,
                        "set": (sets or {}).get(problem, "calibration")},
            "runs": {
                optimizer: {
                    repr(lr): [{"seed": seed, "loss": [final or 1.0] * 10,
                                "time": [0.1 * k for k in range(10)],
                                "radius": None, "radius_bounds": None,
                                "fisher_share": None, "final_loss": final,
                                "held_out": None, "held_out_x": None,
                                "ms_per_step": 1.0}
                               for seed, final in enumerate(seed_finals)]
                    for lr, seed_finals in by_lr.items()}
                for optimizer, by_lr in runs.items()},
        }
    return results


WORST_CASE_FINALS = {
    # Lion's tuned rate: 0.1 (mean 1.2; 0.2's mean is 1.3). The best
    # reference: Adam + cosine's 0.8, so its ratio is 1.5; Adam's 1.0:
    # Lion is not within 5% of it.
    "p1": {"adam": {0.1: [1.0, 1.0], 0.2: [1.1, 1.3]},
           "adam_cosine": {0.1: [0.8, 0.8]},
           "schedulefree": {0.1: [0.9, 0.9]},
           "lion": {0.1: [1.2, 1.2], 0.2: [1.0, 1.6]}},
    # Adam + cosine diverged: the best reference is Adam's 2.0; Lion's
    # 2.08 is within 5% of it (ratio 1.04).
    "p2": {"adam": {0.1: [2.0, 2.0]},
           "adam_cosine": {0.1: [None, 1.0]},
           "schedulefree": {0.1: [2.5, 2.5]},
           "lion": {0.1: [2.1, 2.06]}},
    # No Adam: only Adam + cosine is a reference (ratio 3), and the
    # problem does not count for "within 5% of Adam".
    "p3": {"adam_cosine": {0.1: [1.0, 1.0]},
           "lion": {0.1: [3.0, 3.0]}},
}


def test_the_worst_case_ratio_on_synthetic_results():
    results = synthetic_results(WORST_CASE_FINALS)
    summaries = {name: report.summarize(entry)
                 for name, entry in results.items()}
    lion = report.worst_case(summaries, "lion")
    assert lion["ratios"] == pytest.approx({"p1": 1.5, "p2": 1.04,
                                            "p3": 3.0})
    assert (lion["worst_problem"], lion["worst"]) == ("p3", pytest.approx(3))
    assert (lion["near_adam"], lion["with_adam"]) == (1, 2)
    adam = report.worst_case(summaries, "adam")
    assert adam["ratios"] == pytest.approx({"p1": 1.25, "p2": 1.0})
    assert (adam["near_adam"], adam["with_adam"]) == (2, 2)
    cosine = report.worst_case(summaries, "adam_cosine")
    assert cosine["ratios"]["p2"] == math.inf  # diverged
    assert cosine["worst_problem"] == "p2"
    assert (cosine["near_adam"], cosine["with_adam"]) == (1, 2)
    assert report.loss_ratio(0.0, 0.0) == 1.0
    assert report.loss_ratio(1e-3, 0.0) == math.inf
    # Without any reference: no ratio.
    alone = report.worst_case({"p": {"lion": summaries["p1"]["lion"]}},
                              "lion")
    assert alone["worst"] is None and alone["with_adam"] == 0


def write_synthetic(results, out, monkeypatch):
    monkeypatch.setattr(report, "plot_problem", lambda *args: None)
    config = {"command": "python benchmarks/compare.py", "mode": "default",
              "versions": {"keras-soaa": keras_soaa.__version__},
              "backend": "jax", "machine": "test", "seeds": [0, 1],
              "optimizers": ["adam", "adam_cosine", "schedulefree", "lion"],
              "quick": False, "minutes": 0.1}
    report.write(results, config, str(out))
    return (out / "report.md").read_text()


def test_the_report_states_its_set_and_the_worst_case(tmp_path,
                                                      monkeypatch):
    text = write_synthetic(synthetic_results(WORST_CASE_FINALS), tmp_path,
                           monkeypatch)
    assert "Problem set: **calibration**" in text
    assert "Held-out set" not in text
    assert ("- **Lion**: worst ratio 3.00 (on p3); within 5% of tuned Adam "
            "on 1 of 2 problems.") in text
    assert ("- **Adam + cosine**: diverged on p2 (worst ratio ∞); within "
            "5% of tuned Adam on 1 of 2 problems.") in text
    # Only held-out problems: said so.
    held_out = synthetic_results(WORST_CASE_FINALS,
                                 dict.fromkeys(WORST_CASE_FINALS, "held_out"))
    (tmp_path / "h").mkdir()
    text = write_synthetic(held_out, tmp_path / "h", monkeypatch)
    assert "Problem set: **held-out** (never tuned on" in text


def test_both_sets_are_reported_apart(tmp_path, monkeypatch):
    results = synthetic_results(WORST_CASE_FINALS, {"p3": "held_out"})
    text = write_synthetic(results, tmp_path, monkeypatch)
    assert "**calibration** (tuned on) and **held-out** (never tuned on)" in text
    calibration, held_out = text.split("## Held-out set (never tuned on)")
    calibration = calibration.split("## Calibration set (tuned on)")[1]
    rows = [line.split(" | ")[0] for line in held_out.split("\n## p1")[0]
            .splitlines() if re.match(r"\| p\d ", line)]
    assert set(rows) == {"| p3"}
    assert "| p3 |" not in calibration and "| p1 |" in calibration
    # The worst case within each set.
    assert "- **Lion**: worst ratio 1.50 (on p1); within 5% of tuned Adam " \
        "on 1 of 2 problems." in calibration
    assert "- **Lion**: worst ratio 3.00 (on p3)." in held_out


def test_a_held_out_run_writes_its_own_folder_and_says_so(
        tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    results, config = compare.main(
        ["--quick", "--set", "held_out", "--problems", "friedman_mlp",
         "--optimizers", "adam", "--lrs", "0.01", "--steps", "4"])
    assert config["set"] == "held_out"
    assert results["friedman_mlp"]["problem"]["set"] == "held_out"
    (folder,) = (tmp_path / compare.RUNS).iterdir()
    assert re.fullmatch(r"quick-held_out-\d{8}-\d{6}", folder.name)
    text = (folder / "report.md").read_text()
    assert "Problem set: **held-out**" in text
    assert "quick mode, held_out set" in capsys.readouterr().out
