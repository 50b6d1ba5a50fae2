"""The research candidate `research/batch_prediction.py`: the same-batch test
predicted from the batch's own gradient, against the float64 reference."""

import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import compiled_apply, to_numpy
from soaa_reference import ReferenceSOAA
from test_benchmark import TINY
from test_optimizer import make_problem

from keras_soaa.controllers import SameBatchController

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "research"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import batch_prediction  # noqa: E402
import optimizers  # noqa: E402
import runner  # noqa: E402
from batch_prediction import BatchPredictionSOAA  # noqa: E402

CONSTANTS = dict(min_radius=0.5, max_radius=2.0)


def batch_prediction_of(reference, grads, learning_rate):
    """`eta * sum(g * u - v_hat * u**2 / 2)` of the reference's last step."""
    v_hat_scale = 1 - reference.beta_2**reference.iterations
    return learning_rate * sum(
        np.sum(g * u - 0.5 * v / v_hat_scale * u**2)
        for g, u, v in zip(grads, reference.last_directions, reference.v))


def test_steps_are_soaas_and_the_prediction_is_the_batchs():
    weights, gradients = make_problem("float32")
    variables = [keras.Variable(w) for w in weights]
    optimizer = BatchPredictionSOAA(learning_rate=0.01,
                                    controller=SameBatchController(**CONSTANTS))
    reference = ReferenceSOAA(weights, learning_rate=0.01, **CONSTANTS)
    apply = compiled_apply(optimizer, variables)
    radii = []
    for step, ratio in enumerate([1.0, 0.1, 0.5, 1.0, 1.0], start=1):
        grads = gradients(step)
        apply(grads)
        reference.step(grads)
        expected = batch_prediction_of(reference, grads, 0.01)
        prediction = float(to_numpy(optimizer.controller_state()["step_prediction"]))
        assert prediction == pytest.approx(expected, rel=2e-5), step
        # Not the momentum's prediction: the two differ after the first step.
        if step > 1:
            assert abs(expected - reference.step_prediction) > 1e-3 * abs(expected)
        optimizer.observe_step(3.0, 3.0 - ratio * expected)
        reference.step_prediction = expected
        reference.observe_step(3.0, 3.0 - ratio * expected)
        radii.append(float(to_numpy(optimizer.radius)))
        assert radii[-1] == pytest.approx(reference.radius, rel=1e-6)
    # Grow, shrink, stay, grow, grow.
    np.testing.assert_allclose(radii, [1.25, 0.625, 0.625, 0.78125, 0.9765625],
                               rtol=1e-6)
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=2e-5, atol=2e-5)


def test_always_portable():
    assert BatchPredictionSOAA(fused=None).fused is False
    with pytest.raises(ValueError, match="fused"):
        BatchPredictionSOAA(fused=True)


@pytest.fixture
def installed():
    """`install()`'s rows in the benchmark's table for one test."""
    table = dict(optimizers.OPTIMIZERS)
    batch_prediction.install()
    yield
    optimizers.OPTIMIZERS.clear()
    optimizers.OPTIMIZERS.update(table)


@pytest.mark.parametrize("name", ["soaa_sbg", "soaa_sbg_cosine"])
def test_benchmark_rows_run_with_the_same_batch_test(installed, name):
    """The rows train in the benchmark's runner, the callback feeding pairs."""
    assert optimizers.label(name) == batch_prediction.LABELS[name]
    records = runner.sweep(TINY, name, [0.1], [0])["0.1"]
    assert records[0]["final_loss"] is not None
    assert len(records[0]["radius"]) == TINY.steps
    assert len(set(records[0]["radius"])) > 1  # the test moved the radius
