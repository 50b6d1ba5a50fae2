"""`SOAA.update_step` with extreme but legal values.

Huge gradients (in float32 a gradient whose square overflows skips its
variable, documented; in float64 the spec's formulas apply), large
variables whose sums of squares overflow float32 (scaled, not skipped),
tiny, subnormal and zero gradients, and a loss scaled by a million: each
step (and observation) matches the float64 NumPy reference
(`soaa_reference.py`) within its float32 error bound, and the state stays
finite.
"""

import keras
import numpy as np
import pytest
from conftest import float64_available, scalars_of, to_numpy
from robustness_checks import (
    assert_all_finite,
    assert_observation_matches,
    assert_step_matches,
    assert_variable_untouched,
    nan_for,
    snapshot,
    sync_reference,
    tensors,
)
from soaa_reference import ReferenceSOAA

from keras_soaa import SOAA

DTYPES = ["float32"] + (["float64"] if float64_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_gradients(dtype):
    """float32: a gradient whose square overflows (|g| > ~1.8e19) skips its
    variable (documented); the others and later steps go on. float64: the
    same stream is computed by the spec's formulas (no skip)."""
    weights = [np.array([1.0, -1.0, 0.5]), np.array([2.0, 0.1]),
               np.array(0.3)]
    variables = [keras.Variable(w, dtype=dtype) for w in weights]
    optimizer = SOAA(learning_rate=0.1, total_steps=10)
    reference = ReferenceSOAA(weights, learning_rate=0.1)
    stream = [
        [[0.5, 0.1, -0.2], [1.0, 2.0], 0.5],
        [[1e30, 1.0, 1.0], [1e-30, 0.5], 1e30],
        [[1e20, -1e20, 1e20], [1.0, -1.0], -1e25],
        [[-1e30, 1e-30, 1.0], [1e18, 1e18], 1.0],
        [[0.5, 0.1, -0.2], [1.0, 2.0], 0.5],
    ]
    for raw in stream:
        grads = [np.asarray(g, dtype=dtype) for g in raw]
        overflow = {i for i, g in enumerate(grads)
                    if dtype == "float32" and np.max(np.abs(g)) > 1.8e19}
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads), variables)
        reference.step(nan_for(grads, overflow))
        after = snapshot(optimizer, variables)
        for i in overflow:
            assert_variable_untouched(before, after, i)
        assert_all_finite(optimizer, variables)
        for i in set(range(3)) - overflow:
            np.testing.assert_allclose(after["weights"][i],
                                       reference.weights[i], rtol=2e-5)
            np.testing.assert_allclose(after["v"][i], reference.v[i],
                                       rtol=2e-5)
        np.testing.assert_allclose(after["scalars"][3],
                                   reference.predicted_reduction, rtol=2e-5)


def test_large_variable_with_large_gradients_is_not_skipped():
    """g ~ 1e19 on 1000 elements: every g**2 fits in float32 but their sum
    (1e41) does not; SOAA scales the sums in c, so the step is computed."""
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=1000)]
    variables = [keras.Variable(weights[0], dtype="float32")]
    optimizer = SOAA(learning_rate=0.1, total_steps=10)
    reference = ReferenceSOAA([to_numpy(variables[0])], learning_rate=0.1)
    for _ in range(2):
        grad = (1e19 * rng.uniform(0.5, 1.0, size=1000)
                * rng.choice([-1, 1], size=1000)).astype("float32")
        optimizer.apply(tensors([grad]), variables)
        reference.step([grad])
        assert_all_finite(optimizer, variables)
        np.testing.assert_allclose(to_numpy(variables[0]),
                                   reference.weights[0], rtol=1e-5)
        np.testing.assert_allclose(to_numpy(optimizer._velocities[0]),
                                   reference.v[0], rtol=1e-5)
        np.testing.assert_allclose(
            float(to_numpy(optimizer.predicted_reduction)),
            reference.predicted_reduction, rtol=1e-4)


def test_tiny_and_zero_gradients_match_reference():
    weights = [np.array([1.0, -1.0]), np.array([0.5, 2.0, -3.0]),
               np.array([[0.2, 0.4]])]
    variables = [keras.Variable(w, dtype="float32") for w in weights]
    optimizer = SOAA(learning_rate=0.1, total_steps=10)
    reference = ReferenceSOAA(weights, learning_rate=0.1, total_steps=10)
    stream = [
        [[0.0, 0.0], [1e-30, 1e-30, -1e-30], [[1e-30, 1.0]]],
        [[0.0, 0.0], [1e-35, 0.0, 1e-38], [[0.0, 1e-30]]],
        [[0.5, -0.5], [0.0, 0.0, 0.0], [[1e-30, 0.0]]],
        [[0.0, 0.0], [1e-30, 1e-30, 1e-30], [[0.0, 0.0]]],
    ]
    for step, raw in enumerate(stream, start=1):
        grads = [np.asarray(g, dtype="float32") for g in raw]
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads), variables)
        reference.step(grads)
        after = snapshot(optimizer, variables)
        if step <= 2:  # zero gradients from the start: nothing moves
            np.testing.assert_array_equal(after["weights"][0],
                                          before["weights"][0])
            np.testing.assert_array_equal(after["m"][0], 0.0)
        assert_all_finite(optimizer, variables)
        for i in range(3):
            np.testing.assert_allclose(after["weights"][i],
                                       reference.weights[i], rtol=1e-6)
            # atol: subnormal float32 gradients may be flushed to zero.
            np.testing.assert_allclose(after["m"][i], reference.m[i],
                                       rtol=1e-5, atol=1e-37)
        np.testing.assert_allclose(after["scalars"][3],
                                   reference.predicted_reduction,
                                   rtol=1e-5, atol=1e-12)
        optimizer.observe_loss(float(step))
        reference.observe(float(step))


def test_loss_scaled_by_a_million():
    """loss = 1e6 * |theta|**2 / 2: gradients ~1e6, losses ~1e6. Every
    step matches the reference from the same state; the radius stays finite
    and within its bounds. (A float32 loss average cannot resolve changes
    below ~1e-7 * loss, so the radius is compared with the float32 error
    bound of rho, not exactly: see the README's robustness notes.)"""
    theta = keras.Variable([1.0, -2.0, 0.5])
    optimizer = SOAA(learning_rate=0.05, total_steps=10)
    reference = ReferenceSOAA([to_numpy(theta)], learning_rate=0.05,
                              total_steps=10)
    for _ in range(10):
        sync_reference(reference, optimizer, [theta])
        value = to_numpy(theta)
        loss = float(1e6 * np.sum(value**2) / 2)
        grads = [(1e6 * value).astype("float32")]
        before = snapshot(optimizer, [theta])
        optimizer.apply(tensors(grads), [theta])
        reference.step(grads)
        assert_step_matches(optimizer, [theta], reference, before, grads)
        before_scalars = scalars_of(optimizer)
        loss = float(np.float32(loss))
        optimizer.observe_loss(loss)
        reference.observe(loss)
        assert_observation_matches(optimizer, reference, before_scalars, loss)
    # SOAA's steps scale like g / (c * g**2): a 1e6 times larger loss takes
    # ~1e6 times smaller steps (the Fisher branch of r), here below float32's
    # resolution of theta for two of three weights. Finite, never NaN.
    assert_all_finite(optimizer, [theta])
