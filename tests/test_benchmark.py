"""The benchmark (`benchmarks/compare.py`): modes, folders, the verdict, tables.

Runs use a tiny problem and a few steps, so the whole file takes seconds.
"""

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare  # noqa: E402
import optimizers  # noqa: E402
import problems  # noqa: E402
import report  # noqa: E402
import runner  # noqa: E402

import keras_soaa  # noqa: E402

RECOMMENDED = "recommended SOAA (soaa_sb_cosine, keras_soaa.presets.recommended)"


def tiny_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.1).astype("float32")
    return (x[:48], y[:48]), (x[48:], y[48:])


# A problem is one row: this one is added by the tests (a linear regression).
TINY = problems.Problem(
    "tiny", "calibration", "linear regression, {n_train} train / {n_test} "
    "held-out", steps=10, batch_size=8, lrs=(0.01, 0.1),
    data=tiny_data, model=problems.stack((3,), problems.dense(1)),
    loss=keras.losses.MeanSquaredError, metric=problems.MSE, step_ms=0.1)
# So is an optimizer: plain SGD.
SGD = optimizers.Optimizer(
    "sgd", "SGD", "tab:green",
    lambda lr, steps, model: keras.optimizers.SGD(lr))


@pytest.fixture
def rows(monkeypatch):
    """The tiny problem and SGD, added to the tables for one test."""
    monkeypatch.setitem(problems.PROBLEMS, "tiny", TINY)
    monkeypatch.setitem(optimizers.OPTIMIZERS, "sgd", SGD)


def chosen(argv):
    return compare.chosen_problems(compare.parse_args(argv))


def test_the_three_modes():
    default = compare.parse_args([])
    assert (default.mode, default.problem_set, default.seeds, default.steps,
            default.middle_grid) == ("default", "calibration", 3, None, False)
    assert chosen([]) == ["digits", "breast_cancer", "quadratic", "rosenbrock"]
    assert {"soaa_sb_cosine", "soaa_cosine", "soaa", "adam", "adam_cosine",
            "schedulefree"} <= set(default.optimizers)
    full = compare.parse_args(["--full"])
    assert (full.mode, full.seeds, full.steps, full.middle_grid) == (
        "full", 3, None, False)
    assert chosen(["--full"]) == problems.in_set("calibration") == [
        "digits", "breast_cancer", "quadratic", "rosenbrock", "char_lm",
        "digits_cnn"]
    assert full.optimizers == ["soaa", "soaa_cosine", "soaa_hd",
                               "soaa_hd_cosine", "soaa_gr", "soaa_gr_cosine",
                               "soaa_sb", "soaa_sb_cosine", "adam", "adam_cosine",
                               "schedulefree"]
    quick = compare.parse_args(["--quick"])
    assert (quick.mode, quick.seeds, quick.steps, quick.middle_grid) == (
        "quick", 1, compare.QUICK_STEPS, True)
    assert chosen(["--quick"]) == problems.in_set("calibration")
    with pytest.raises(SystemExit):
        compare.parse_args(["--quick", "--full"])
    # Explicit options override the mode's.
    args = compare.parse_args(["--full", "--problems", "digits", "--seeds",
                               "2", "--steps", "50", "--optimizers", "adam",
                               "--lrs", "0.1,0.2"])
    assert (args.seeds, args.steps, args.optimizers, args.lrs) == (
        2, 50, ["adam"], [0.1, 0.2])
    assert compare.chosen_optimizers(compare.parse_args(
        ["--optimizers", "all"])) == list(optimizers.OPTIMIZERS)
    with pytest.raises(SystemExit, match="unknown optimizer"):
        compare.chosen_optimizers(compare.parse_args(["--optimizers", "sgd2"]))
    for mode in compare.MODES.values():
        assert set(mode.optimizers) <= set(optimizers.OPTIMIZERS)


def test_the_sets():
    calibration, held_out = (problems.in_set("calibration"),
                             problems.in_set("held_out"))
    assert len(held_out) == 10 and not set(calibration) & set(held_out)
    assert problems.in_set("all") == calibration + held_out
    fast = [n for n in held_out if n not in ("shapes_cnn", "hub_lm", "resnet_cnn")]
    assert chosen(["--set", "held_out"]) == fast
    assert chosen(["--full", "--set", "held_out"]) == held_out
    assert chosen(["--set", "all"]) == chosen([]) + fast
    assert chosen(["--problems", "wave_gru,digits"]) == ["wave_gru", "digits"]
    assert chosen(["--set", "held_out", "--problems", "all"]) == held_out
    with pytest.raises(SystemExit, match="unknown problem"):
        chosen(["--problems", "digits,mnist"])
    assert problems.covered_set(["digits", "quadratic"]) == "calibration"
    assert problems.covered_set(["digits", "wave_gru"]) == "all"


def test_help_names_the_recommended_configuration():
    assert optimizers.RECOMMENDED == "soaa_sb_cosine"
    assert optimizers.label("soaa_sb_cosine") == "recommended SOAA"
    text = " ".join(compare.__doc__.split())
    assert "`soaa_sb_cosine`, which is `keras_soaa.presets.recommended`" in text
    assert "soaa_hd" not in text  # no other configuration is called so
    built = optimizers.make("soaa_sb_cosine", 0.01, 100, None)
    assert isinstance(built, keras_soaa.SOAA) and built.total_steps == 100
    assert built.controller == keras_soaa.controllers.get("same_batch")
    schedule = keras.optimizers.schedules.deserialize(
        built.get_config()["learning_rate"])
    assert float(keras.ops.convert_to_numpy(schedule(100))) == 0.0


def test_each_run_gets_a_new_folder(tmp_path):
    now = 1_700_000_000.0
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))

    def folder(argv, **kwargs):
        return Path(compare.output_folder(compare.parse_args(argv),
                                          root=str(tmp_path), now=now,
                                          **kwargs)).name

    assert folder([]) == f"default-{stamp}"
    assert folder([]) == f"default-{stamp}-2"
    assert folder(["--quick"]) == f"quick-{stamp}"
    assert folder(["--full", "--set", "held_out"]) == f"full-held_out-{stamp}"
    assert folder(["--full"], problem_set="all") == f"full-all-{stamp}"
    assert len(list(tmp_path.iterdir())) == 5


def test_an_out_folder_with_results_is_refused(tmp_path, capsys, rows):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "results.json").write_text('{"kept": true}')
    argv = ["--quick", "--problems", "tiny", "--optimizers", "adam",
            "--out", str(folder)]
    with pytest.raises(SystemExit, match="refusing to overwrite.*--overwrite"):
        compare.main(argv)
    assert json.loads((folder / "results.json").read_text()) == {"kept": True}
    assert capsys.readouterr().out == ""  # refused before anything ran
    compare.main(argv + ["--overwrite"])
    assert "tiny" in json.loads((folder / "results.json").read_text())[
        "results"]


def test_a_tiny_run_with_added_rows_prints_the_verdict(tmp_path, capsys,
                                                       monkeypatch, rows):
    """The tiny problem and SGD are one row each: they run like the others,
    and the run ends with the verdict on screen and the report's path."""
    monkeypatch.chdir(tmp_path)
    results, config = compare.main(
        ["--quick", "--problems", "tiny", "--optimizers",
         "soaa_sb_cosine,sgd,adam,schedulefree"])
    (folder,) = (tmp_path / compare.RUNS).iterdir()
    assert re.fullmatch(r"quick-\d{8}-\d{6}", folder.name)
    out = capsys.readouterr().out
    assert f"writing to {os.path.join(compare.RUNS, folder.name)}\n" in out
    verdict = out.split("Verdict, calibration set: ")[1]
    assert verdict.startswith(RECOMMENDED + " against the best peer")
    assert re.search(r"- worst ratio to the best peer: \d+\.\d\d \(on tiny\)",
                     verdict)
    assert re.search(r"- (wins|ties|loses) on 1: tiny \(", verdict)
    assert out.endswith(f"report: {os.path.join(compare.RUNS, folder.name)}"
                        "/report.md\n")
    entry = results["tiny"]
    assert entry["problem"]["description"] == (
        "linear regression, 48 train / 16 held-out")
    assert list(entry["runs"]) == ["soaa_sb_cosine", "sgd", "adam", "schedulefree"]
    for name, by_lr in entry["runs"].items():
        assert list(by_lr) == ["0.01", "0.1"]  # the grid's middle two
        (record,) = by_lr["0.1"]
        assert len(record["loss"]) == compare.QUICK_STEPS
        assert np.isfinite(record["final_loss"]) and record["held_out"] >= 0
        assert (record["radius"] is not None) == (name == "soaa_sb_cosine")
        assert (record["held_out_x"] is not None) == (name == "schedulefree")
    text = (folder / "report.md").read_text()
    assert "| tiny | SGD |" in text and "| tiny | recommended SOAA |" in text
    assert "### " not in text and "## Verdict" in text and RECOMMENDED in text
    assert "Target" not in text and "T1" not in text
    assert (folder / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert config["mode"] == "quick" and config["set"] == "calibration"
    # The report redraws identically from results.json.
    saved = json.loads((folder / "results.json").read_text())
    report.write(saved["results"], saved["config"], str(tmp_path))
    assert (tmp_path / "report.md").read_text() == text


def test_merge_adds_a_previous_runs_optimizers(tmp_path, rows):
    common = ["--quick", "--problems", "tiny", "--lrs", "0.1"]
    first, _ = compare.main(common + ["--optimizers", "sgd",
                                      "--out", str(tmp_path / "a")])
    merged, config = compare.main(common + [
        "--optimizers", "adam", "--merge", str(tmp_path / "a"),
        "--out", str(tmp_path / "b")])
    assert list(merged["tiny"]["runs"]) == ["sgd", "adam"]
    assert merged["tiny"]["runs"]["sgd"] == first["tiny"]["runs"]["sgd"]
    assert config["merged_from"]["optimizers"] == ["sgd"]
    with pytest.raises(SystemExit, match="seeds"):
        compare.main(common + ["--seeds", "2", "--merge", str(tmp_path / "a"),
                               "--out", str(tmp_path / "c")])


@pytest.mark.parametrize("problem, name, lrs", [
    (TINY, "soaa", [0.01, 0.1]), (TINY, "schedulefree", [0.01, 0.1]),
    (problems.get("tabular_bn", steps=6), "adam", [0.003])])  # dropout, BN
def test_a_reused_compiled_model_reproduces_fresh_runs(problem, name, lrs):
    """Each run from a reused compiled model (fresh weights and optimizer
    state copied in) matches one from a freshly compiled model."""
    reused = runner.sweep(problem, name, lrs, [0, 1], reuse=True)
    fresh = runner.sweep(problem, name, lrs, [0, 1], reuse=False)
    for key in reused:
        for a, b in zip(reused[key], fresh[key]):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        assert reused[key][0]["loss"] != reused[key][1]["loss"]


# Their models take seconds to build eagerly; `compare.py --quick` runs them.
SLOW_MODELS = ("char_lm", "digits_cnn", "shapes_cnn", "hub_lm", "resnet_cnn")


def test_every_problem_gives_its_data_and_its_model_evaluates():
    for name in problems.PROBLEMS:
        problem = problems.get(name, steps=2, quick=True)
        x, y = problem.batches(0)
        again, _ = problem.batches(0)
        assert len(x) == len(y) == 2 * problem.batch_size
        np.testing.assert_array_equal(x, again)
        info = problem.describe(problem.lrs)
        assert "{" not in info["description"] and info["set"] in (
            "calibration", "held_out")
        if keras.backend.backend() != "jax" or name in SLOW_MODELS:
            continue  # the models are Keras', the same on every backend
        runner.seed_everything(0)
        held_out = problem.held_out(problem.model(0))
        assert (held_out is None) == (problem.metric is None)
        assert held_out is None or np.isfinite(held_out)
        keras.backend.clear_session()


def synthetic(finals):
    """results.json-like results of {problem: {optimizer: [final per seed]}}
    at one rate (no SOAA radius: the report's figures are not drawn)."""
    return {problem: {
        "problem": {"description": problem, "steps": 10, "batch_size": 1,
                    "lrs": [0.1], "held_out_name": None,
                    "held_out_lower_is_better": False, "final_window": 1,
                    "exact_gradients": False, "set": "calibration"},
        "runs": {name: {"0.1": [
            {"seed": seed, "loss": [final or 1.0] * 10, "time": [0.0] * 10,
             "radius": None, "fisher_share": None, "final_loss": final,
             "held_out": None, "held_out_x": None, "ms_per_step": 1.0}
            for seed, final in enumerate(seeds)]}
                 for name, seeds in runs.items()}}
        for problem, runs in finals.items()}


FINALS = {
    # Best peer Adam + cosine 0.8: the recommended SOAA's 1.2 loses (1.5x).
    "p1": {"soaa_sb_cosine": [1.2, 1.2], "adam": [1.0, 1.0],
           "adam_cosine": [0.8, 0.8], "schedulefree": [0.9, 0.9]},
    # Adam + cosine diverged; the best peer is Adam (2.0): 1.98 ties.
    "p2": {"soaa_sb_cosine": [1.98, 1.98], "adam": [2.0, 2.0],
           "adam_cosine": [None, 1.0]},
    # 1.0 against ScheduleFreeAdamW's 3.0: wins.
    "p3": {"soaa_sb_cosine": [1.0, 1.0], "schedulefree": [3.0, 3.0]},
}


def test_the_verdict_on_synthetic_results(tmp_path, monkeypatch):
    summaries = {p: report.summarize(e) for p, e in synthetic(FINALS).items()}
    assert report.verdict(summaries) == {
        "p1": ("loses", "adam_cosine", pytest.approx(1.5)),
        "p2": ("ties", "adam", pytest.approx(0.99)),
        "p3": ("wins", "schedulefree", pytest.approx(1 / 3))}
    lines = report.verdict_lines(summaries)
    assert lines[0].startswith(RECOMMENDED + " against the best peer")
    assert lines[1:4] == ["- worst ratio to the best peer: 1.50 (on p1)",
                          "- wins on 1: p3 (0.33 x ScheduleFreeAdamW)",
                          "- ties on 1: p2 (0.99 x Adam)"]
    worst = report.worst_case(summaries, "adam_cosine")
    assert worst["worst"] == math.inf and worst["worst_problem"] == "p2"
    no_peer = {"p": {"soaa_sb_cosine": summaries["p1"]["soaa_sb_cosine"]}}
    assert "no verdict" in report.verdict_lines(no_peer)[0]
    # The report states it, and the worst case of every optimizer.
    monkeypatch.setattr(report, "plot_problem", lambda *args: None)
    config = {"command": "python benchmarks/compare.py", "mode": "default",
              "versions": {"keras-soaa": "0"}, "backend": "jax",
              "machine": "test", "seeds": [0, 1], "minutes": 0.1,
              "optimizers": ["soaa_sb_cosine", "adam", "adam_cosine",
                             "schedulefree"]}
    report.write(synthetic(FINALS), config, str(tmp_path))
    text = (tmp_path / "report.md").read_text()
    assert "- worst ratio to the best peer: 1.50 (on p1)" in text
    assert ("- **Adam + cosine**: diverged on p2 (worst ratio ∞); within 5% "
            "of tuned Adam on 1 of 2 problems.") in text


def test_schedule_free_is_also_evaluated_at_its_averaged_point():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.ScheduleFreeAdamW(0.5),
                  loss="mse")
    x, y = np.ones((8, 2), "float32"), np.zeros((8, 1), "float32")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    y_point = [keras.ops.convert_to_numpy(v) for v in model.trainable_variables]
    z = [keras.ops.convert_to_numpy(runner.slot_variable(
        model.optimizer, v, "momentum")) for v in model.trainable_variables]
    seen = runner.at_schedule_free_x(model, lambda m: [
        keras.ops.convert_to_numpy(v) for v in m.trainable_variables])
    beta_1 = model.optimizer.beta_1
    for point, y_value, z_value in zip(seen, y_point, z):
        np.testing.assert_allclose(
            point, (y_value - (1 - beta_1) * z_value) / beta_1, rtol=1e-5)
    assert not np.allclose(seen[0], y_point[0])
    for variable, value in zip(model.trainable_variables, y_point):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable),
                                      value)


def test_the_fisher_share_reads_soaa_by_public_names():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras_soaa.SOAA(total_steps=10), loss="mse")
    model.optimizer.build(model.trainable_variables)
    assert runner.loss_metric(model) in model.metrics
    model.optimizer.apply([np.full((3, 2), 2.0, "float32"),
                           np.full((2,), 1e-6, "float32")],
                          model.trainable_variables)
    # d·c·v̂ > √v̂ where √v̂ > 1/(d·c): the kernel's large gradients only.
    assert runner.fisher_share(model.optimizer, model.trainable_variables,
                               1.0) == pytest.approx(6 / 8)


def test_the_benchmark_stands_apart_from_research_and_private_names():
    for path in BENCHMARKS.glob("*.py"):
        text = path.read_text()
        assert "research" not in text, path.name
        assert "keras.src" not in text and "_keras_internals" not in text
        if path.name != "memory_passes.py":  # names torch's `._foreach_*`
            # speed.py counts torch.compile's graph breaks (`torch._dynamo`).
            allowed = {"_dynamo"} if path.name == "speed.py" else set()
            assert not set(re.findall(r"\.(_[a-z]\w*)", text)) - allowed, path.name
    # SOAA is built in the optimizer table only.
    for path in BENCHMARKS.glob("*.py"):
        if path.name not in ("optimizers.py", "speed.py", "memory_passes.py"):
            assert "keras_soaa.SOAA(" not in path.read_text(), path.name


def test_research_registers_nothing_on_import():
    names = keras_soaa.controllers.names()
    predictions = keras_soaa.maths.PREDICTIONS
    sys.path.insert(0, str(ROOT / "research"))
    try:
        for module in ("targets", "designs", "controller_designs",
                       "tune_controller", "controller_signal", "schedule_free_soaa",
                       "candidates", "quadratic_prediction"):
            try:
                __import__(module)
            except (ImportError, AttributeError) as error:
                pytest.skip(f"research/{module}.py no longer imports: {error}")
    finally:
        sys.path.remove(str(ROOT / "research"))
    assert keras_soaa.controllers.names() == names
    assert keras_soaa.maths.PREDICTIONS == predictions


def test_the_benchmark_does_not_import_tensorflow_on_jax_or_torch():
    backend = keras.backend.backend()
    if backend == "tensorflow":
        pytest.skip("TensorFlow is the backend")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import problems, "
            "report, runner; runner.sweep(problems.get('breast_cancer', 4), "
            "'soaa', [0.01], [0]); print('tensorflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)],
                          env=dict(os.environ, KERAS_BACKEND=backend),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False", done.stdout


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
    args = argparse.Namespace(small_steps=3, repeats=1, quick=True)
    result = speed.time_custom_loop("logreg", args)
    assert result["adam"] > 0 and result["soaa"] > 0
    assert result["soaa_state_bytes"] > result["adam_state_bytes"]
