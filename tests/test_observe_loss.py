"""`SOAA.observe_loss`: the losses it takes, refuses and how it feeds them.

Non-finite losses (NaN, +-inf, or finite ones beyond float32) follow the
spec: not averaged in, the radius to its lower bound, the predicted
reduction handed on; extreme finite losses keep the state finite and
within the radius bounds; anything that is not one real scalar, and a call
before `build` or without `total_steps`, raises a `ValueError` and changes
nothing. Checked against the float64 NumPy reference (`soaa_reference.py`),
eagerly and compiled (XLA, the `jax.jit` stateless twin, `torch.compile`).
"""

import math

import keras
import numpy as np
import pytest
from conftest import BACKEND, scalars_of, to_numpy
from keras import ops
from robustness_checks import INF, NAN, assert_state_unchanged, snapshot, tensors
from soaa_reference import ReferenceSOAA

from keras_soaa import SOAA

FLOAT32_MAX = float(np.finfo(np.float32).max)


def built_optimizer(**kwargs):
    theta = keras.Variable([1.0, -2.0])
    optimizer = SOAA(learning_rate=0.1, total_steps=6, **kwargs)
    optimizer.apply(tensors([[1.0, -2.0]]), [theta])
    return optimizer, theta


def test_non_finite_losses_follow_the_spec():
    """NaN, +-inf (Python, NumPy, tensors), and finite losses beyond float32
    (the state is float32: they become +-inf) are not averaged in; radius to
    the lower bound, p_prev <- p_cur, p_cur <- 0. A NaN first loss too."""
    theta = keras.Variable([1.0, -2.0])
    optimizer = SOAA(learning_rate=0.1, total_steps=6)
    reference = ReferenceSOAA([[1.0, -2.0]], learning_rate=0.1, total_steps=6)
    losses = [
        NAN, 2.5, 2.0, NAN, INF, -INF, np.float32("nan"), np.float64(-np.inf),
        ops.convert_to_tensor(np.inf), ops.convert_to_tensor(np.nan),
        1e300, -1e300, np.float64(1e39), 1.5, 1.2,
    ]
    for loss in losses:
        grad = [to_numpy(theta)]
        optimizer.apply(tensors(grad, "float32"), [theta])
        reference.step(grad)
        before = scalars_of(optimizer)
        optimizer.observe_loss(loss)
        value = float(np.float32(to_numpy(loss)))  # what float32 state sees
        reference.observe(value)
        after = scalars_of(optimizer)
        assert np.all(np.isfinite(after))
        if not np.isfinite(value):
            assert after[1] == before[1] and after[2] == before[2]
            assert after[3] == 0.0 and after[4] == before[3]
            assert after[0] == pytest.approx(reference.bounds()[0], rel=1e-6)
        np.testing.assert_allclose(after, reference.scalars(), rtol=1e-5,
                                   atol=1e-7)
    assert reference.loss_count == 4 and scalars_of(optimizer)[2] == 4


BAD_LOSSES = [
    "abc", b"1.0", "1.0", None, True, False, np.bool_(False), [1.0], [],
    [1.0, 2.0], (1.0,), [[1.0]], np.ones(3), np.ones((1, 1)), 1 + 2j,
    np.complex64(1), {"loss": 1.0}, object(), np.array("1.0"),
    np.array([True]),
]


def test_bad_loss_inputs_are_rejected_and_change_nothing():
    optimizer, theta = built_optimizer()
    optimizer.observe_loss(2.5)
    before = snapshot(optimizer, [theta])
    for loss in BAD_LOSSES:
        with pytest.raises(ValueError, match="Argument `loss` must be one real scalar"):
            optimizer.observe_loss(loss)
        assert_state_unchanged(before, snapshot(optimizer, [theta]))


def test_bad_loss_tensors_are_rejected_and_change_nothing():
    optimizer, theta = built_optimizer()
    before = snapshot(optimizer, [theta])
    for loss in [
        ops.ones((1,)), ops.ones((2, 2)), ops.zeros((0,)),
        ops.convert_to_tensor(True), ops.convert_to_tensor([1.0, np.nan]),
    ]:
        with pytest.raises(ValueError, match="Argument `loss` must be one real scalar"):
            optimizer.observe_loss(loss)
        assert_state_unchanged(before, snapshot(optimizer, [theta]))


def test_observe_loss_misuse_before_build_or_without_total_steps():
    optimizer = SOAA(total_steps=3)
    with pytest.raises(ValueError, match="before the optimizer was built"):
        optimizer.observe_loss(1.0)
    optimizer, theta = built_optimizer()
    optimizer.total_steps = None
    before = snapshot(optimizer, [theta])
    with pytest.raises(ValueError, match="total_steps"):
        optimizer.observe_loss(1.0)
    assert_state_unchanged(before, snapshot(optimizer, [theta]))


def test_extreme_finite_losses_keep_state_finite():
    theta = keras.Variable([1.0, -2.0])
    optimizer = SOAA(learning_rate=0.1, total_steps=12)
    reference = ReferenceSOAA([[1.0, -2.0]], learning_rate=0.1,
                              total_steps=12)
    for loss in [1e30, -1e30, FLOAT32_MAX, FLOAT32_MAX, -FLOAT32_MAX, 3e38,
                 1e-30, 0.0, -5.0, 1e10, 7.0]:
        grad = [to_numpy(theta)]
        optimizer.apply(tensors(grad, "float32"), [theta])
        reference.step(grad)
        before = scalars_of(optimizer)
        optimizer.observe_loss(loss)
        reference.observe(loss)
        after = scalars_of(optimizer)
        assert np.all(np.isfinite(after)), (loss, after)
        lower, upper = reference.bounds()
        assert lower * (1 - 1e-6) <= after[0] <= upper * (1 + 1e-6)
        # Every loss here is representable in float32, so it counts.
        assert after[2] == before[2] + 1
        np.testing.assert_allclose(after[1], reference.loss_average,
                                   rtol=1e-6)
        np.testing.assert_allclose(after[0], reference.radius, rtol=1e-5)


def test_non_finite_losses_compiled():
    """`observe_loss` compiled (tf.function XLA, jax.jit of the stateless
    twin, torch.compile) with NaN and infinite losses."""
    variables = [keras.Variable([1.0, -2.0])]
    optimizer = SOAA(learning_rate=0.1, total_steps=6)
    optimizer.build(variables)
    reference = ReferenceSOAA([[1.0, -2.0]], learning_rate=0.1, total_steps=6)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        step = tf.function(optimizer.observe_loss, jit_compile=True)
        observe = lambda loss: step(tf.constant(loss, tf.float32))  # noqa: E731
    elif BACKEND == "jax":
        import jax

        stateless = jax.jit(optimizer.stateless_observe_loss)

        def observe(loss):
            values = stateless([v.value for v in optimizer.variables],
                               np.float32(loss))
            for variable, value in zip(optimizer.variables, values):
                variable.assign(value)
    else:
        import torch

        step = torch.compile(optimizer.observe_loss)
        observe = lambda loss: step(torch.tensor(loss, dtype=torch.float32))  # noqa: E731
    for step_number, loss in enumerate(
            [2.5, NAN, 2.0, INF, -INF, 1.5, NAN, 1.0], start=1):
        grad = [np.array([1.0, -2.0]) / step_number]
        optimizer.apply(tensors(grad, "float32"), variables)
        reference.step(grad)
        before = scalars_of(optimizer)
        observe(loss)
        reference.observe(loss)
        after = scalars_of(optimizer)
        assert np.all(np.isfinite(after))
        if not math.isfinite(loss):
            assert after[1] == before[1] and after[2] == before[2]
        np.testing.assert_allclose(after, reference.scalars(), rtol=1e-5,
                                   atol=1e-7)
    assert scalars_of(optimizer)[2] == 4
