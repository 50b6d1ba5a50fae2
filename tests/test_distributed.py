"""Distributed and mixed-precision training give the single-device answer.

The distribution setups run in fresh processes (tests/distributed_worker.py):
devices must be configured before TensorFlow or JAX starts. They do not
depend on this process' backend, so each runs in exactly one of the three
per-backend test runs (spread to balance their time), not three times.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import BACKEND, to_numpy
from fed_losses import FedLossRecorder

from keras_soaa import SOAA

WORKER = Path(__file__).resolve().parent / "distributed_worker.py"
TIMEOUT_S = 300

# setup -> its single-device baseline.
BASELINE = {
    "tf_mirrored": "tf_single",
    "tf_multi_worker": "tf_single_loop",
    "jax_data_parallel": "jax_single",
    "jax_model_parallel": "jax_single",
}
SETUPS_OF_THIS_RUN = {
    "tensorflow": ["tf_mirrored"],
    "jax": ["jax_data_parallel", "jax_model_parallel"],
    "torch": ["tf_multi_worker"],
}[BACKEND]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(setup, output, extra_env=None, controller="paper"):
    env = dict(os.environ, SOAA_CONTROLLER=controller, **(extra_env or {}))
    if setup in ("tf_single", "jax_single"):
        env["KERAS_BACKEND"] = "tensorflow" if setup == "tf_single" else "jax"
        setup = "single"
    return subprocess.Popen(
        [sys.executable, str(WORKER), setup, str(output)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def finish(process):
    try:
        out, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        out, _ = process.communicate()
        raise AssertionError(f"worker timed out:\n{out[-3000:]}") from None
    assert process.returncode == 0, out[-5000:]


def run_setup(setup, tmp_path, controller="paper"):
    """Runs `setup`; returns the result of every process it started."""
    if setup != "tf_multi_worker":
        output = tmp_path / f"{setup}.npz"
        finish(start_worker(setup, output, controller=controller))
        return [np.load(output)]
    ports = [free_port() for _ in range(2)]
    workers, outputs = [], []
    for index in range(2):
        tf_config = {
            "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
            "task": {"type": "worker", "index": index},
        }
        outputs.append(tmp_path / f"worker{index}.npz")
        workers.append(
            start_worker(setup, outputs[-1],
                         {"TF_CONFIG": json.dumps(tf_config)}, controller)
        )
    for worker in workers:
        finish(worker)
    return [np.load(output) for output in outputs]


# The gradient-driven controllers adapt the radius inside the step (sums
# over the variables): checked on one setup per backend's run.
CASES = [(setup, "paper") for setup in SETUPS_OF_THIS_RUN] + [
    (SETUPS_OF_THIS_RUN[0], "hypergradient"),
    (SETUPS_OF_THIS_RUN[0], "gradient_ratio"),
]


@pytest.mark.multiprocess
@pytest.mark.parametrize("setup, controller", CASES)
def test_distributed_training_matches_single_device(setup, controller, tmp_path):
    (baseline,) = run_setup(BASELINE[setup], tmp_path, controller)
    results = run_setup(setup, tmp_path, controller)
    for result in results:  # one per worker process
        # Same global batches; only the all-reduce's summation order differs.
        np.testing.assert_allclose(
            result["weights"], baseline["weights"], rtol=1e-5, atol=1e-6
        )
        # The trust-region scalars are updated once per step, not once per
        # replica: a double update would double the predicted reductions
        # and the loss count.
        np.testing.assert_allclose(
            result["scalars"], baseline["scalars"], rtol=1e-5, atol=1e-7
        )
        assert int(result["iterations"]) == int(baseline["iterations"]) == 12
        np.testing.assert_allclose(
            result["radii"], baseline["radii"], rtol=1e-5
        )
        if controller != "paper":  # the case covers what it claims
            assert len(np.unique(np.round(baseline["radii"], 6))) > 3
        print(f"{setup}: max weight deviation from single device "
              f"{np.max(np.abs(result['weights'] - baseline['weights'])):.2e}")


# --- Mixed precision (in this process, on its backend) ---------------------


def fit_with_policy(policy, loss_scale_optimizer_scale=None, controller="paper"):
    """Trains a small MLP under `policy`; returns what SOAA saw and did."""
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        rng = np.random.default_rng(0)
        x = rng.normal(size=(256, 8)).astype("float32")
        y = np.tanh(x @ rng.normal(size=(8, 2))).astype("float32")
        model = keras.Sequential([
            keras.Input((8,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(2),
            keras.layers.Activation("linear", dtype="float32"),
        ])
        soaa = SOAA(learning_rate=0.01, controller=controller)
        optimizer = soaa
        if loss_scale_optimizer_scale is not None:
            optimizer = keras.optimizers.LossScaleOptimizer(
                soaa, initial_scale=loss_scale_optimizer_scale
            )
        model.compile(optimizer=optimizer, loss="mse")
        recorder = FedLossRecorder()
        radii = []
        trace = keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: radii.append(logs["radius"])
        )
        history = model.fit(
            x, y, batch_size=32, epochs=4, shuffle=False, verbose=0,
            callbacks=[recorder, trace],
        )
        return dict(model=model, soaa=soaa, fed=np.array(recorder.fed),
                    radii=np.array(radii), losses=history.history["loss"])
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


@pytest.fixture(scope="module")
def float32_run():
    return fit_with_policy("float32")


# Tolerances from the formats: float16 keeps 11 significant bits (5e-4
# relative per rounding), bfloat16 8 bits (4e-3).
@pytest.mark.parametrize(
    "policy,loss_tolerance,radius_tolerance",
    [("mixed_float16", 0.01, 0.01), ("mixed_bfloat16", 0.03, 0.02)],
)
def test_mixed_precision_tracks_float32(
    float32_run, policy, loss_tolerance, radius_tolerance
):
    run = fit_with_policy(policy)
    if policy == "mixed_float16":
        assert isinstance(
            run["model"].optimizer, keras.optimizers.LossScaleOptimizer
        )
    assert np.all(np.isfinite(run["losses"]))
    # The controller is fed the unscaled loss (a scaled one is 32768x).
    np.testing.assert_allclose(
        run["fed"], float32_run["fed"], rtol=loss_tolerance
    )
    np.testing.assert_allclose(
        run["radii"], float32_run["radii"], atol=radius_tolerance
    )
    # Moments and trust-region arithmetic stay float32.
    soaa = run["soaa"]
    state = [v for v in soaa.variables if v.name != "iteration"]
    assert len(state) > 5 and all(v.dtype == "float32" for v in state)


@pytest.mark.parametrize("controller", ["hypergradient", "gradient_ratio"])
def test_mixed_precision_gradient_controller_tracks_float32(controller):
    reference = fit_with_policy("float32", controller=controller)
    run = fit_with_policy("mixed_float16", controller=controller)
    assert np.all(np.isfinite(run["losses"]))
    assert np.ptp(reference["radii"]) > 0.05  # the radius moved
    np.testing.assert_allclose(run["radii"], reference["radii"], atol=0.02)
    state = [v for v in run["soaa"].variables if v.name != "iteration"]
    assert all(v.dtype == "float32" for v in state)


def test_steps_skipped_by_loss_scaler_keep_trust_region_coherent(float32_run):
    # A huge initial scale overflows float16: the first steps are skipped
    # (the scaler halves the scale each time) until gradients are finite.
    run = fit_with_policy("mixed_float16", loss_scale_optimizer_scale=2.0**40)
    soaa = run["soaa"]
    applied = int(to_numpy(soaa.iterations))
    batches = len(float32_run["radii"])
    assert 0 < applied < batches  # some steps were skipped, some applied
    # One observation per applied step: the losses of skipped batches (at
    # the same weights) joined the next applied step's observation.
    assert len(run["fed"]) == applied
    assert float(to_numpy(soaa.loss_count)) == applied
    scalars = [float(to_numpy(getattr(soaa, name))) for name in (
        "radius", "loss_average", "predicted_reduction",
        "previous_predicted_reduction")]
    assert np.all(np.isfinite(scalars))
    assert scalars[3] > 0  # judged against a real prediction, not 0
    assert 1 - soaa.controller.radius_bound - 1e-6 <= scalars[0] <= 2.0
    assert np.all(np.isfinite(run["fed"]))
    assert run["losses"][-1] < run["losses"][0]
