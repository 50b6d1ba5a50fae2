"""The benchmark (`benchmarks/compare.py --quick`) runs and writes its outputs."""

import json
import math
import struct
import sys
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
         "soaa_cosine", "adam_cosine"])}
    assert report.plotted(summary) == ["lion", "muon", "soaa", "soaa_cosine"]


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
    assert {"soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine", "adam",
            "adam_cosine", "schedulefree"} <= set(compare.DEFAULT_OPTIMIZERS)
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


def test_hypergradient_variants_pass_the_controller_and_its_arguments():
    optimizer = runner.make_optimizer("soaa_hd", 0.01)
    assert optimizer.controller_name == "hypergradient"
    assert (optimizer.radius_learning_rate, optimizer.min_radius,
            optimizer.max_radius) == (0.05, 0.1, 10.0)
    assert runner.make_optimizer("soaa", 0.01).controller_name == "paper"
    saved = dict(runner.HYPERGRADIENT_ARGUMENTS)
    try:
        runner.HYPERGRADIENT_ARGUMENTS.update(radius_learning_rate=0.1,
                                              min_radius=0.3, max_radius=3.0)
        optimizer = runner.make_optimizer("soaa_hd_cosine", 0.01, steps=10)
        assert optimizer.controller_name == "hypergradient"
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
        assert optimizer.controller_name == "gradient_ratio"
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


def test_plots_show_every_soaa_variant():
    def entry(mean):
        return {"final": {"mean": mean, "std": 0.0}}

    summary = {name: entry(float(k)) for k, name in enumerate(
        ["adam", "soaa_hd", "schedulefree", "soaa", "adam_cosine",
         "soaa_hd_cosine", "soaa_cosine"])}
    assert report.plotted(summary) == [
        "adam", "soaa_hd", "schedulefree", "soaa", "soaa_hd_cosine",
        "soaa_cosine"]


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
        keras.utils.set_random_seed(0)
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
        schedule = optimizer._learning_rate
        mid = float(keras.ops.convert_to_numpy(schedule(5)))
        assert mid == pytest.approx(learning_rate / 2, rel=1e-5)
    else:
        assert lr == pytest.approx(learning_rate)
    if name == "muon":
        # The hidden kernel takes Muon's step; the output kernel, the biases
        # (and any non-2-D variable) its AdamW fallback.
        uses_adamw = [optimizer._should_use_adamw(v)
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
