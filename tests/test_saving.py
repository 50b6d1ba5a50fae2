"""Saving, resuming and moving between backends: SOAA loses nothing across a restart.

What a "state" is: every model weight and every optimizer variable
(iterations, learning rate, m and v of each weight, the five trust-region
scalars), see `saving_worker.model_state`.

Tolerances. Same backend, same machine: the same float32 ops in the same
order, so states must be *equal* (`assert_array_equal`), whether the run was
resumed in this process, in a fresh process or from a checkpoint. Across
backends the kernels sum in different orders (matmul, reductions), so each
trained step may round differently: we allow `ULPS_PER_STEP` float32 ulps per
trained step (4 ulps ~ the rounding of a pairwise sum of 16 terms, the batch
size) of each array's rounding scale, i.e. `4 * steps * eps32 * scale`. The
scale is the array's largest magnitude, except for m, whose rounding follows
the gradients it averages (sqrt of the bias-corrected v), not |m| itself,
which cancellation can make small; see `rounding_scales`. Model outputs
(one forward pass, no training) get `FORWARD_ULPS` of their largest value.
Loading itself copies float32 arrays, so a restored state must be bit-exact
on every backend. Integers stored as float32 (iterations, loss_count) are
then exact too, since the tolerance stays below 0.5.

Each test run does its own share of the backend matrix: it saves under the
current backend and loads under all three (a fresh process each, see
`saving_worker.py`); the golden files in saved_models/ (one per backend) are
loaded under the current backend. Over the three runs of the suite that
covers every (source, destination) pair twice.

Run with `-s` to see the measured deviations (lines starting `[deviation]`).
"""

import json
import os
import shutil
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest
import saving_worker as w
from conftest import BACKEND, PAPER_SCALARS

from keras_soaa import SOAA
from keras_soaa.callback import find_soaa
from keras_soaa.controllers import (
    GradientRatioController,
    HypergradientController,
    PaperController,
)
from keras_soaa.optimizer import STATE_LAYOUT_VERSION

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "saved_models"
WORKER = Path(__file__).resolve().parent / "saving_worker.py"
BACKENDS = ("tensorflow", "jax", "torch")
EPS32 = float(np.finfo(np.float32).eps)
ULPS_PER_STEP = 4
KERAS_VERSION = tuple(int(part) for part in keras.version().split(".")[:2])
# The golden files were written by Keras 3.15, whose configs older Keras can't
# read (3.15 added `input_axes` and `output_axes` to the initializers' configs);
# `tests/compat_keras.py` runs these tests on older Keras.
needs_keras_3_15_files = pytest.mark.skipif(
    KERAS_VERSION < (3, 15),
    reason=f"golden .keras files written by Keras 3.15; Keras {keras.version()} "
    "can't load their initializer configs",
)
# One forward pass: each output is an 8-term dot product of tanh values, and
# backends' tanh may differ by an ulp: up to ~8 ulps of the output's scale.
FORWARD_ULPS = 8
EPOCHS = 4
STOP_AFTER = 2
STEPS = EPOCHS * w.STEPS_PER_EPOCH  # 16
STEPS_PART1 = STOP_AFTER * w.STEPS_PER_EPOCH  # 8
WORKER_TIMEOUT_S = 300


def make_soaa():
    # radius_bound=0.9 keeps the radius inside its bounds on some steps, so
    # that rho (and with it loss_average and the predicted reductions)
    # matters; at the bounds the radius would not depend on them.
    return SOAA(learning_rate=0.05, initial_radius=1.3,
                controller=PaperController(radius_bound=0.9))


def report(what, diffs):
    print(f"[deviation] {BACKEND}: {what}: " + ", ".join(
        f"max|d {k}|={v:.3g}" for k, v in diffs.items()))


def assert_states_equal(actual, expected, prefix_a="", prefix_e=""):
    """Bit-exact equality of two states; returns the (zero) deviations."""
    diffs = w.max_abs_diffs(actual, expected, prefix_a, prefix_e)
    for key in (k for k in expected if k.startswith(prefix_e)):
        name = key[len(prefix_e):]
        if name.startswith(("weight/", "optimizer/")):
            np.testing.assert_array_equal(
                actual[prefix_a + name], expected[key], err_msg=name)
    return diffs


def rounding_scales(expected, prefix, model):
    """The magnitude each array's float32 rounding is relative to.

    An array's largest magnitude, except for m: m averages gradients of both
    signs, so its rounding follows the size of the gradients it averages, the
    bias-corrected sqrt(v_hat), not |m|, which cancellation can make much
    smaller (the output bias: max|m| = 0.012, its gradients ~0.05).
    `model` has the layout of the state (to tell m and v apart).
    """
    soaa = find_soaa(model.optimizer)
    names = [v.name for v in model.optimizer.variables]
    iterations = float(expected[f"{prefix}optimizer/{names.index('iteration')}"])
    correction = 1.0 - soaa.beta_2 ** iterations
    scales = {}
    for key in expected:
        name = key[len(prefix):]
        if key.startswith(prefix) and name.startswith(("weight/", "optimizer/")):
            scales[name] = float(np.max(np.abs(expected[key]), initial=0.0))
    for i, variable_name in enumerate(names):
        if variable_name.endswith("_momentum"):
            assert names[i + 1] == variable_name[: -len("momentum")] + "velocity"
            v = np.asarray(expected[f"{prefix}optimizer/{i + 1}"], np.float64)
            gradient_size = float(np.max(np.sqrt(v / correction)))
            scales[f"optimizer/{i}"] = max(scales[f"optimizer/{i}"], gradient_size)
    return scales


def assert_states_close(actual, expected, steps, model, prefix_a="", prefix_e=""):
    """Each array within `ULPS_PER_STEP * steps` ulps of its rounding scale.

    Returns the largest deviations, with `ulps`: the largest deviation of
    any array in float32 ulps of its scale (see `rounding_scales`).
    """
    diffs = w.max_abs_diffs(actual, expected, prefix_a, prefix_e)
    diffs["ulps"] = 0.0
    for name, scale in rounding_scales(expected, prefix_e, model).items():
        want = np.asarray(expected[prefix_e + name], dtype=np.float64)
        got = np.asarray(actual[prefix_a + name], dtype=np.float64)
        if scale > 0:
            diffs["ulps"] = max(diffs["ulps"], float(
                np.max(np.abs(got - want)) / (EPS32 * scale)))
        np.testing.assert_allclose(
            got, want, rtol=0, atol=ULPS_PER_STEP * steps * EPS32 * scale,
            err_msg=name)
    return diffs


def assert_outputs_close(got, want, what):
    """Model outputs of one forward pass: `FORWARD_ULPS` ulps of max|want|."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape
    scale = float(np.max(np.abs(want)))
    np.testing.assert_allclose(
        got, want, rtol=0, atol=FORWARD_ULPS * EPS32 * scale)
    deviation = float(np.max(np.abs(got - want)))
    report(what, {"output": deviation, "ulps": deviation / (EPS32 * scale)})


def assert_losses_close(actual, expected, steps):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(
        actual, expected, rtol=ULPS_PER_STEP * steps * EPS32, atol=0)
    return float(np.max(np.abs(actual - expected), initial=0.0))


def scalars_from_state(model, state):
    """The five trust-region scalars of a state dict, by name."""
    soaa = find_soaa(model.optimizer)
    index = {id(v): i for i, v in enumerate(model.optimizer.variables)}
    return {
        name: float(state[f"optimizer/{index[id(getattr(soaa, name))]}"])
        for name in PAPER_SCALARS
    }


def json_round_trip(config):
    return json.loads(json.dumps(config, sort_keys=True))


class StateEachStep(keras.callbacks.Callback):
    """Records the state after every step (list it after TrustRegionCallback)."""

    def __init__(self):
        super().__init__()
        self.states = []

    def on_train_batch_end(self, batch, logs=None):
        self.states.append(w.model_state(self.model))


class StopAfterStep(keras.callbacks.Callback):
    def __init__(self, steps):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.steps:
            self.model.stop_training = True


class Crash(Exception):
    pass


class CrashAfterStep(keras.callbacks.Callback):
    """Kills `fit` after `steps` steps, as a preempted job would die."""

    def __init__(self, steps):
        super().__init__()
        self.steps, self.seen = steps, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen >= self.steps:
            raise Crash(f"simulated crash after step {self.seen}")


# ---------------------------------------------------------------------------
# Fixtures: one uninterrupted run, one interrupted run, and the workers.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("saving")


@pytest.fixture(scope="module")
def data(workdir):
    x, y = w.make_data(seed=0)
    path = workdir / "data.npz"
    np.savez(path, x=x, y=y)
    return x, y, path


@pytest.fixture(scope="module")
def uninterrupted(workdir, data):
    """16 steps without a break, with ModelCheckpoint files along the way."""
    x, y, _ = data
    model = w.make_model(make_soaa())
    each_step = StateEachStep()
    checkpoints = workdir / "checkpoints"
    fed = w.fit(model, x, y, EPOCHS, callbacks=[
        each_step,
        keras.callbacks.ModelCheckpoint(
            str(checkpoints / "epoch{epoch}.keras"), save_freq="epoch"),
        keras.callbacks.ModelCheckpoint(
            str(checkpoints / "e{epoch}_b{batch}.keras"), save_freq=6),
    ])
    assert model.optimizer.total_steps == STEPS
    return {
        "model": model, "state": w.model_state(model), "fed": fed,
        "each_step": each_step.states, "checkpoints": checkpoints,
    }


@pytest.fixture(scope="module")
def part1(workdir, data):
    """The first 8 of 16 steps (fit for 4 epochs, stopped after 2), saved."""
    x, y, _ = data
    model = w.make_model(make_soaa())
    fed = w.fit(model, x, y, EPOCHS, callbacks=[w.StopAfterEpoch(STOP_AFTER)])
    # The callback inferred the whole run's T from fit's epochs.
    assert model.optimizer.total_steps == STEPS
    path = workdir / "part1.keras"
    model.save(path)
    return {
        "path": path, "model": model, "state": w.model_state(model),
        "fed": fed, "config": json_round_trip(model.optimizer.get_config()),
        "predictions": w.to_numpy(model(x)),
    }


@pytest.fixture(scope="module")
def workers(workdir, data, part1):
    """Loads part1.keras in a fresh process per backend, trains steps 9-16.

    The three processes run at once; returns {backend: npz contents}.
    """
    _, _, data_path = data
    processes = {}
    for backend in BACKENDS:
        out = workdir / f"worker_{backend}.npz"
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        processes[backend] = (out, subprocess.Popen(
            [sys.executable, str(WORKER), str(part1["path"]), str(data_path),
             str(out), "--epochs", str(EPOCHS),
             "--initial-epoch", str(STOP_AFTER)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        ))
    results = {}
    for backend, (out, process) in processes.items():
        _, stderr = process.communicate(timeout=WORKER_TIMEOUT_S)
        assert process.returncode == 0, f"{backend} worker failed:\n{stderr[-5000:]}"
        with np.load(out) as npz:
            results[backend] = dict(npz)
    return results


# ---------------------------------------------------------------------------
# 1. Resume in a fresh process equals the uninterrupted run.


def test_resume_in_fresh_process_equals_uninterrupted(uninterrupted, part1, workers):
    result = workers[BACKEND]
    assert str(result["backend"]) == BACKEND
    # Loading restored exactly what was saved.
    assert_states_equal(result, part1["state"], "loaded/")
    assert json.loads(str(result["config"])) == part1["config"]
    # Steps 9-16 in a fresh process end where 16 unbroken steps end.
    diffs = assert_states_equal(result, uninterrupted["state"], "trained/")
    report("fresh-process resume vs uninterrupted (same backend)", diffs)
    # ... having fed SOAA exactly the same losses.
    np.testing.assert_array_equal(
        result["fed_losses"], uninterrupted["fed"][STEPS_PART1:])
    assert len(uninterrupted["fed"]) == STEPS
    # The first part fed the first 8 of them.
    np.testing.assert_array_equal(
        part1["fed"], uninterrupted["fed"][:STEPS_PART1])
    scalars = scalars_from_state(part1["model"], {
        k[len("trained/"):]: v for k, v in result.items()
        if k.startswith("trained/")})
    assert scalars["loss_count"] == STEPS
    assert scalars == scalars_from_state(
        uninterrupted["model"], uninterrupted["state"])
    print(f"[state] {BACKEND}: scalars after 16 steps: {scalars}")


def test_saved_state_holds_the_trust_region_mid_run(part1):
    """The file holds a trust region that has moved: it is worth restoring."""
    loaded = keras.saving.load_model(part1["path"])
    scalars = w.scalar_state(loaded)
    assert scalars == w.scalar_state(part1["model"])
    assert scalars["loss_count"] == STEPS_PART1
    assert scalars["radius"] != 1.3
    assert scalars["loss_average"] > 0
    assert scalars["previous_predicted_reduction"] > 0
    assert int(w.to_numpy(loaded.optimizer.iterations)) == STEPS_PART1
    assert loaded.optimizer.total_steps == STEPS
    assert loaded.optimizer.get_config()["state_layout_version"] == 4


# ---------------------------------------------------------------------------
# 3. Across backends: saved here, loaded and trained on every backend.


@pytest.mark.parametrize("destination", BACKENDS)
def test_file_saved_here_loads_and_trains_on(destination, uninterrupted, part1,
                                             workers):
    result = workers[destination]
    assert str(result["backend"]) == destination
    # The restored state is bit-exact on every backend...
    assert_states_equal(result, part1["state"], "loaded/")
    config = json.loads(str(result["config"]))
    assert config == part1["config"]
    assert config["total_steps"] == STEPS
    assert config["state_layout_version"] == 4
    # ... and the 8 steps trained on `destination` agree with the 8 steps
    # trained here, within float32 rounding of a different op order.
    steps = STEPS - STEPS_PART1
    diffs = assert_states_close(result, uninterrupted["state"], steps,
                                uninterrupted["model"], "trained/")
    loss_diff = assert_losses_close(
        result["fed_losses"], uninterrupted["fed"][STEPS_PART1:], steps)
    report(f"saved on {BACKEND}, 8 steps on {destination} vs on {BACKEND}",
           {**diffs, "fed loss": loss_diff})


# ---------------------------------------------------------------------------
# 4. Golden files: written by saved_models/make_golden.py. Layouts 1-3 by
# keras-soaa 0.1-0.4 (before layout 4), layout 4 by this version.

# Each file's state layout and the controller its optimizer config means,
# written out here so that a regenerated file with another configuration
# fails instead of passing silently.
GOLDEN_FILES = {
    "tensorflow": (1, PaperController(radius_bound=0.9)),
    "jax": (1, PaperController(radius_bound=0.5)),
    "torch": (1, PaperController()),
    "hypergradient_jax": (2, HypergradientController(
        learning_rate=0.2, min_radius=0.5, max_radius=4.0)),
    "gradient_ratio_torch": (3, GradientRatioController(
        learning_rate=0.1, decay=0.8, grow_above=0.4)),
    "layout4_tensorflow": (4, PaperController(radius_bound=0.9)),
    "layout4_jax": (4, HypergradientController(
        learning_rate=0.2, min_radius=0.5, max_radius=4.0)),
    "layout4_torch": (4, GradientRatioController(
        learning_rate=0.1, decay=0.8, grow_above=0.4)),
}
MOVED_TO_CONTROLLERS = ("radius_bound", "radius_learning_rate", "min_radius",
                        "max_radius")


def load_golden(source):
    with np.load(GOLDEN / f"soaa_{source}.npz") as npz:
        arrays = dict(npz)
    info = json.loads((GOLDEN / f"soaa_{source}.json").read_text())
    return arrays, info


def in_current_layout(arrays, info, model, prefix):
    """A golden file's recorded state with the optimizer's variables in the
    order `model`'s optimizer has them. A layout-4 file as it is. Layouts
    1-3: Keras' own variables and the moments by position, `state_layout`
    4 before the moments, the trust-region scalars by name (layouts 2 and 3
    prefixed the controller's: `ratio_actual_average`)."""
    state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
    if info["optimizer_config"].get("state_layout_version", 1) >= 4:
        return state
    old = info["variable_names"]["optimizer"]
    new = [v.name for v in model.optimizer.variables]
    marker, radius = new.index("state_layout"), new.index("radius")
    state = {k: v for k, v in state.items() if k.startswith("weight/")}
    for i, name in enumerate(new):
        if name == "state_layout":
            state[f"optimizer/{i}"] = np.float32(4.0)
            continue
        if i < radius:
            source = i - (i > marker)
        else:
            source = max(j for j, o in enumerate(old) if name in (
                o, o.removeprefix("hypergradient_").removeprefix("ratio_")))
        state[f"optimizer/{i}"] = arrays[f"{prefix}optimizer/{source}"]
    return state


@needs_keras_3_15_files
@pytest.mark.parametrize("source", GOLDEN_FILES)
def test_golden_file_restores_its_state(source):
    arrays, info = load_golden(source)
    layout, controller = GOLDEN_FILES[source]
    path = GOLDEN / f"soaa_{source}.keras"
    assert path.stat().st_size < 100_000
    model = keras.saving.load_model(path)
    optimizer = model.optimizer
    assert isinstance(optimizer, SOAA)

    # Config: the controller's constants moved into the controller; the
    # arguments added since the file was written take their defaults.
    assert info["optimizer_config"].get("state_layout_version", 1) == layout
    assert optimizer.controller == controller
    config = json_round_trip(optimizer.get_config())
    assert config["state_layout_version"] == 4
    saved = dict(info["optimizer_config"], fused=None)
    for key in ("controller", "state_layout_version", *MOVED_TO_CONTROLLERS):
        config.pop(key, None)
        saved.pop(key, None)
    assert config == saved

    # Every weight, m, v and scalar restored bit-exactly, on every backend,
    # in layout 4 whatever layout the file has.
    expected = in_current_layout(arrays, info, model, "restored/")
    assert len(optimizer.variables) == len(
        [k for k in expected if k.startswith("optimizer/")])
    state = w.model_state(model)
    assert set(state) == {k for k in expected
                          if k.startswith(("weight/", "optimizer/"))}
    diffs = assert_states_equal(state, expected)
    report(f"golden {source} restored", diffs)
    assert int(w.to_numpy(optimizer.iterations)) == info["steps_saved"] == 8
    scalars = {name: float(w.to_numpy(v))
               for name, v in optimizer.controller_state().items()}
    scalars["radius"] = float(w.to_numpy(optimizer.radius))
    for name, value in info["scalars"].items():
        name = name.removeprefix("hypergradient_").removeprefix("ratio_")
        if name in scalars:
            assert scalars[name] == value, name
    assert scalars["radius"] not in (1.0, optimizer.initial_radius)  # it moved

    # Inference from the restored weights matches the source backend.
    assert_outputs_close(w.to_numpy(model(arrays["x"])), arrays["predictions"],
                         f"golden {source} predictions on {BACKEND}")


@needs_keras_3_15_files
@pytest.mark.parametrize("source", GOLDEN_FILES)
def test_golden_file_continues_training_as_on_its_backend(source):
    """Training on from the file gives what the version and backend that
    wrote it gave, within float32 rounding (layouts 1-3: keras-soaa 0.4)."""
    arrays, info = load_golden(source)
    model = w.load_for_training(GOLDEN / f"soaa_{source}.keras")
    fed = w.fit(model, arrays["x"], arrays["y"], epochs=3, initial_epoch=2)
    steps = info["steps_continued"]
    assert len(fed) == steps == 4
    expected = in_current_layout(arrays, info, model, "continued/")
    diffs = assert_states_close(w.model_state(model), expected, steps, model)
    loss_diff = assert_losses_close(fed, arrays["continued_fed_losses"], steps)
    report(f"golden {source}, 4 steps on {BACKEND} vs on {source}",
           {**diffs, "fed loss": loss_diff})
    if isinstance(model.optimizer.controller, PaperController):
        assert w.scalar_state(model)["loss_count"] == 12


# ---------------------------------------------------------------------------
# 2. Fault tolerance with Keras' own callbacks.


def test_backup_and_restore_epoch_backups_resume_exactly(workdir, data,
                                                         uninterrupted):
    """A fit that dies mid-epoch and is started again ends as if unbroken.

    With `save_freq="epoch"` the backup is taken at the end of each epoch
    and the restarted `fit` redoes the interrupted epoch from its start, from
    the state at that start: exactly the uninterrupted run.
    """
    x, y, _ = data
    backup_dir = workdir / "backup_epoch"
    model = w.make_model(make_soaa())
    with pytest.raises(Crash):
        w.fit(model, x, y, EPOCHS, callbacks=[
            keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch"),
            CrashAfterStep(10),  # step 3 of epoch 3: a mid-epoch death
        ])
    assert (backup_dir / "latest.weights.h5").exists()

    restarted = w.make_model(make_soaa())  # a new model object, as a new job
    fed = w.fit(restarted, x, y, EPOCHS, callbacks=[
        keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch")])
    diffs = assert_states_equal(w.model_state(restarted), uninterrupted["state"])
    report("BackupAndRestore(save_freq='epoch'), crash at step 10", diffs)
    np.testing.assert_array_equal(fed, uninterrupted["fed"][STEPS_PART1:])
    assert restarted.optimizer.total_steps == STEPS


def test_backup_and_restore_batch_backups_replay_the_interrupted_epoch(
        workdir, data, uninterrupted):
    """`save_freq=<int>` backs up mid-epoch; a restart replays the epoch.

    Keras 3.15's BackupAndRestore records the batch of a mid-epoch backup
    but restarts `fit` at the *start* of that epoch, from the mid-epoch
    state: the batches before the backup are trained twice. SOAA's state
    follows the weights exactly: the restarted run equals "train to the
    backup, then run the interrupted epoch again from its first batch".
    """
    x, y, _ = data
    backup_dir = workdir / "backup_batch"
    model = w.make_model(make_soaa())
    with pytest.raises(Crash):
        # Backups after steps 3, 6 and 9; dies after step 11 (in epoch 3).
        w.fit(model, x, y, EPOCHS, callbacks=[
            keras.callbacks.BackupAndRestore(backup_dir, save_freq=3),
            CrashAfterStep(11),
        ])
    metadata = json.loads((backup_dir / "training_metadata.json").read_text())
    assert metadata == {"epoch": 2, "batch": 0}
    # The backup holds the whole SOAA state after step 9, including the loss
    # observed for step 9 (TrustRegionCallback is listed before it).
    backup = w.make_model(make_soaa())
    backup.optimizer.build(backup.trainable_variables)
    backup.load_weights(backup_dir / "latest.weights.h5")
    assert_states_equal(w.model_state(backup), uninterrupted["each_step"][8])

    restarted = w.make_model(make_soaa())
    w.fit(restarted, x, y, EPOCHS, callbacks=[
        keras.callbacks.BackupAndRestore(backup_dir, save_freq=3)])
    expected = w.make_model(make_soaa())
    w.fit(expected, x, y, EPOCHS, callbacks=[StopAfterStep(9)])
    w.fit(expected, x, y, EPOCHS, initial_epoch=2)
    diffs = assert_states_equal(
        w.model_state(restarted), w.model_state(expected))
    report("BackupAndRestore(save_freq=3), crash at step 11, vs replay", diffs)
    # One batch (step 9's) was trained twice: 17 steps, not 16.
    assert int(w.to_numpy(restarted.optimizer.iterations)) == STEPS + 1
    assert w.scalar_state(restarted)["loss_count"] == STEPS + 1


def test_model_checkpoint_files_hold_the_soaa_state(uninterrupted):
    checkpoints = uninterrupted["checkpoints"]
    each_step = uninterrupted["each_step"]
    # save_freq=6: after steps 6 (epoch 2, batch 2) and 12 (epoch 3, batch 4).
    expected_files = {
        "epoch1.keras": 4, "epoch2.keras": 8, "epoch3.keras": 12,
        "epoch4.keras": 16, "e2_b2.keras": 6, "e3_b4.keras": 12,
    }
    assert sorted(os.listdir(checkpoints)) == sorted(expected_files)
    for name, step in expected_files.items():
        loaded = keras.saving.load_model(checkpoints / name)
        assert isinstance(loaded.optimizer, SOAA)
        assert loaded.optimizer.total_steps == STEPS
        assert_states_equal(w.model_state(loaded), each_step[step - 1])
        assert w.scalar_state(loaded)["loss_count"] == step


def test_mid_epoch_model_checkpoint_resumes_exactly(data, uninterrupted):
    """From the checkpoint after step 6 (batch 2 of epoch 2): finish that
    epoch on its remaining batches, then the last two epochs."""
    x, y, _ = data
    model = keras.saving.load_model(uninterrupted["checkpoints"] / "e2_b2.keras")
    rest = slice(2 * w.BATCH_SIZE, None)
    fed = w.fit(model, x[rest], y[rest], epochs=1)
    fed = w.fit(model, x, y, EPOCHS, initial_epoch=2, fed=fed)
    diffs = assert_states_equal(w.model_state(model), uninterrupted["state"])
    report("ModelCheckpoint after step 6, resumed", diffs)
    np.testing.assert_array_equal(fed, uninterrupted["fed"][6:])


# ---------------------------------------------------------------------------
# 5. State layout version and variable count.


def rewrite_keras_file(source, destination, edit):
    """Copies a .keras zip, passing its config.json through `edit`."""
    with zipfile.ZipFile(source) as zin, zipfile.ZipFile(destination, "w") as zout:
        for item in zin.infolist():
            content = zin.read(item.filename)
            if item.filename == "config.json":
                config = json.loads(content)
                edit(config["compile_config"]["optimizer"]["config"])
                content = json.dumps(config).encode()
            zout.writestr(item, content)
    return destination


def test_newer_state_layout_version_is_refused(workdir, part1, data):
    def set_version(version):
        def edit(optimizer_config):
            assert optimizer_config["state_layout_version"] == 4
            if version is None:
                del optimizer_config["state_layout_version"]
            else:
                optimizer_config["state_layout_version"] = version
        return edit

    newer = rewrite_keras_file(
        part1["path"], workdir / "v5.keras", set_version(STATE_LAYOUT_VERSION + 1))
    with pytest.raises(
        ValueError,
        match=f"state layout version {STATE_LAYOUT_VERSION + 1}.*newer keras-soaa",
    ):
        keras.saving.load_model(newer)
    # The weights of such a file stay usable for inference.
    inference = keras.saving.load_model(newer, compile=False)
    np.testing.assert_array_equal(
        w.to_numpy(inference(data[0])), part1["predictions"])

    # Controls: the same rewrite with version 4, or with no version (files
    # written before the key existed: the state's layout decides), loads
    # with the full state.
    for name, version in (("v4.keras", 4), ("v_none.keras", None)):
        same = rewrite_keras_file(part1["path"], workdir / name, set_version(version))
        loaded = keras.saving.load_model(same)
        assert_states_equal(w.model_state(loaded), part1["state"])


def test_variable_count_mismatch_raises(workdir, part1):
    # Directly: a built SOAA given a store with one variable too few.
    model = w.make_model(make_soaa())
    model.optimizer.build(model.trainable_variables)
    store = {str(i): v for i, v in enumerate(
        w.to_numpy(v) for v in model.optimizer.variables[:-1])}
    with pytest.raises(ValueError, match="saved state has 15 variables of "
                                         "state layout 4, this optimizer has 16"):
        model.optimizer.load_own_variables(store)

    # A .keras file whose config asks for more variables (use_ema adds one
    # per weight) than its state holds: refused, not silently skipped.
    def use_ema(optimizer_config):
        optimizer_config["use_ema"] = True
    edited = rewrite_keras_file(part1["path"], workdir / "ema.keras", use_ema)
    with pytest.raises(ValueError, match="Cannot restore SOAA optimizer"):
        keras.saving.load_model(edited)

    # Weights saved with a float learning rate (a learning_rate variable)
    # loaded into a SOAA with a schedule (none): refused.
    weights = workdir / "part1.weights.h5"
    part1["model"].save_weights(weights)
    schedule = keras.optimizers.schedules.CosineDecay(0.05, decay_steps=16)
    other = w.make_model(SOAA(learning_rate=schedule))
    other.optimizer.build(other.trainable_variables)
    with pytest.raises(ValueError, match="saved state has 16 variables.*this "
                                         "optimizer has 15"):
        other.load_weights(weights)


# ---------------------------------------------------------------------------
# 6. Config round trips: every kind of learning rate, LossScaleOptimizer.


@keras.saving.register_keras_serializable(package="keras_soaa_tests")
def soaa_test_learning_rate():
    """A callable learning rate; registered, so Keras can serialize it."""
    return 0.05


LEARNING_RATES = {
    "float": lambda: 0.05,
    "CosineDecay": lambda: keras.optimizers.schedules.CosineDecay(
        0.08, decay_steps=8, warmup_steps=2, warmup_target=0.1),
    "PiecewiseConstantDecay": lambda: (
        keras.optimizers.schedules.PiecewiseConstantDecay([3, 6],
                                                          [0.08, 0.05, 0.02])),
    "registered_callable": lambda: soaa_test_learning_rate,
}


def save_load_and_continue(workdir, name, optimizer, data, **load_kwargs):
    """fit 2 epochs (T filled in), save, load, then 1 more epoch on both.

    Returns (original model, loaded model) after checking that the loaded
    one restored the full state and trains on exactly as the original.
    """
    x, y, _ = data
    model = w.make_model(optimizer)
    w.fit(model, x, y, epochs=2)
    path = workdir / f"{name}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, **load_kwargs)
    assert type(loaded.optimizer) is type(model.optimizer)
    assert (json_round_trip(loaded.optimizer.get_config())
            == json_round_trip(model.optimizer.get_config()))
    assert_states_equal(w.model_state(loaded), w.model_state(model))
    fed_original = w.fit(model, x, y, epochs=3, initial_epoch=2)
    fed_loaded = w.fit(loaded, x, y, epochs=3, initial_epoch=2)
    diffs = assert_states_equal(w.model_state(loaded), w.model_state(model))
    np.testing.assert_array_equal(fed_loaded, fed_original)
    report(f"{name}: save/load/continue vs original", diffs)
    return model, loaded


@pytest.mark.parametrize("kind", sorted(LEARNING_RATES))
def test_config_round_trip_with_learning_rate(kind, workdir, data):
    learning_rate = LEARNING_RATES[kind]()
    optimizer = SOAA(learning_rate=learning_rate, radius_bound=0.9)
    assert optimizer.total_steps is None
    model, loaded = save_load_and_continue(
        workdir, f"lr_{kind}", optimizer, data)
    # total_steps was filled in by the callback (2 epochs x 4) and saved.
    assert model.optimizer.total_steps == loaded.optimizer.total_steps == 8
    restored = loaded.optimizer._learning_rate
    if kind == "registered_callable":
        assert restored is soaa_test_learning_rate
    elif kind == "float":
        assert float(w.to_numpy(restored)) == np.float32(0.05)
    else:
        assert type(restored) is type(learning_rate)
        assert restored.get_config() == learning_rate.get_config()
    # Optimizer-level round trip too.
    again = SOAA.from_config(loaded.optimizer.get_config())
    assert json_round_trip(again.get_config()) == json_round_trip(
        loaded.optimizer.get_config())


def test_lambda_learning_rate_needs_safe_mode_off(workdir, data):
    """Keras serializes a lambda as bytecode: unsafe, refused by default."""
    x, y, _ = data
    model = w.make_model(SOAA(learning_rate=lambda: 0.05))
    w.fit(model, x, y, epochs=1)
    path = workdir / "lambda.keras"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*lambda.*")
        model.save(path)
    with pytest.raises(ValueError, match="safe_mode=False"):
        keras.saving.load_model(path)
    loaded = keras.saving.load_model(path, safe_mode=False)
    assert loaded.optimizer._learning_rate() == 0.05
    assert loaded.optimizer.total_steps == 4
    assert_states_equal(w.model_state(loaded), w.model_state(model))


def test_loss_scale_optimizer_round_trip(workdir, data):
    optimizer = keras.optimizers.LossScaleOptimizer(
        SOAA(learning_rate=0.05, radius_bound=0.9), initial_scale=2.0**10)
    model, loaded = save_load_and_continue(workdir, "loss_scale", optimizer, data)
    inner = loaded.optimizer.inner_optimizer
    assert isinstance(inner, SOAA)
    assert inner.total_steps == 8
    assert w.scalar_state(loaded)["loss_count"] == 12
    # The loss scaler's own state came back too.
    assert float(w.to_numpy(loaded.optimizer.dynamic_scale)) == 2.0**10


# ---------------------------------------------------------------------------
# 7. Inference-only loading and export.


def test_inference_only_load(part1, data):
    x, _, _ = data
    loaded = keras.saving.load_model(part1["path"], compile=False)
    assert not loaded.compiled
    np.testing.assert_array_equal(w.to_numpy(loaded(x)), part1["predictions"])
    np.testing.assert_array_equal(
        loaded.predict(x, verbose=0), part1["model"].predict(x, verbose=0))


def export_and_predict(model, directory, x):
    """Exports `model` in this backend's format, reloads it, predicts x.

    TensorFlow and JAX: a TF SavedModel (`format="tf_saved_model"`), read
    back with `tf.saved_model.load` (and `keras.layers.TFSMLayer`, a
    TensorFlow-backend layer, on TensorFlow). torch: Keras 3.15's
    tf_saved_model export fails on torch 2.13 for any model (a
    `dynamic_shapes` structure error inside `torch.export`, with Adam too),
    so the torch run exports a `torch.export` program (`format="torch"`)
    with a static input shape (a `None` batch size gets specialized to 1),
    which Keras before 3.15 doesn't have: the torch run skips there.
    """
    if BACKEND in ("tensorflow", "jax"):
        import tensorflow as tf

        model.export(directory, format="tf_saved_model", verbose=False)
        reloaded = tf.saved_model.load(str(directory))  # keep it referenced
        outputs = [reloaded.serve(tf.constant(x)).numpy()]
        if BACKEND == "tensorflow":
            layer = keras.layers.TFSMLayer(directory, call_endpoint="serve")
            outputs.append(w.to_numpy(layer(x)))
        return outputs
    if KERAS_VERSION < (3, 15):
        pytest.skip(f"Keras {keras.version()} has no format='torch' export "
                    "(Keras 3.15+)")
    import torch

    path = directory.with_suffix(".pt2")
    model.export(path, format="torch", verbose=False,
                 input_signature=[keras.InputSpec(shape=x.shape, dtype="float32")])
    program = torch.export.load(str(path))
    return [program.module()(torch.from_numpy(x)).detach().numpy()]


def test_export_for_inference(workdir, part1, data):
    x, _, _ = data
    loaded = keras.saving.load_model(part1["path"])
    outputs = export_and_predict(loaded, workdir / "export", x)
    assert len(outputs) == (2 if BACKEND == "tensorflow" else 1)
    for i, output in enumerate(outputs):
        assert_outputs_close(output, part1["predictions"],
                             f"export ({i}) of this backend's model")


@needs_keras_3_15_files
def test_export_of_a_model_trained_on_another_backend(workdir):
    """The way out of the torch export limit: load the torch-trained golden
    file here and export it (and the TensorFlow one under torch)."""
    source = "tensorflow" if BACKEND == "torch" else "torch"
    arrays, _ = load_golden(source)
    model = keras.saving.load_model(GOLDEN / f"soaa_{source}.keras", compile=False)
    directory = workdir / f"export_{source}"
    shutil.rmtree(directory, ignore_errors=True)
    outputs = export_and_predict(model, directory, arrays["x"])
    assert outputs
    for i, output in enumerate(outputs):
        assert_outputs_close(output, arrays["predictions"],
                             f"export ({i}) of golden {source}")
