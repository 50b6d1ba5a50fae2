"""SOAA's update step and controller against the NumPy reference (docs/algorithm.md)."""

import keras
import numpy as np
import pytest
from conftest import (
    compiled_apply,
    float64_available,
    make_soaa,
    scalars_of,
    to_numpy,
)
from keras import ops
from soaa_reference import ReferenceSOAA

from keras_soaa import SOAA

DTYPES = ["float32"] + (["float64"] if float64_available() else [])


def make_problem(dtype, seed=0):
    """Three variables with gradient streams of very different scales.

    Scale 10 puts elements in the `d * F` branch of `r`, scale 1e-3 in the
    `sqrt(v_hat)` branch; the mixed matrix has both.
    """
    rng = np.random.default_rng(seed)
    shapes_and_scales = [((3, 4), None), ((5,), 1e-3), ((), 10.0)]
    weights = [rng.normal(size=shape) for shape, _ in shapes_and_scales]
    element_scales = [
        np.where(rng.random(shape) < 0.5, 1e-3, 10.0) if scale is None
        else np.full(shape, scale)
        for shape, scale in shapes_and_scales
    ]

    def gradients(step):
        step_rng = np.random.default_rng(seed * 1000 + step)
        return [
            (s * step_rng.normal(size=s.shape)).astype(dtype)
            for s in element_scales
        ]

    return [w.astype(dtype) for w in weights], gradients


def run_against_reference(apply_fn_factory, dtype, steps=40, total_steps=25):
    """Trains SOAA and the reference side by side; returns both.

    The fed losses are chosen (from the reference's state) so that `rho`
    cycles through shrinking, clipped-low, neutral, growing and clipped-high
    regimes; every third step is not observed, so predicted reductions of
    two steps accumulate.
    """
    weights, gradients = make_problem(dtype)
    hyper = dict(
        learning_rate=0.01,
        beta_1=0.8,
        beta_2=0.95,
        radius_bound=0.2,
        total_steps=total_steps,
        initial_radius=1.3,
        weight_decay=0.05,
    )
    optimizer = make_soaa(**hyper)
    variables = [keras.Variable(w, dtype=dtype) for w in weights]
    reference = ReferenceSOAA(weights, **hyper)
    apply = apply_fn_factory(optimizer, variables)
    ratios = [0.5, -2.0, 1.0, 1.1, 40.0, 0.95]
    for step in range(1, steps + 1):
        grads = gradients(step)
        apply(grads)
        reference.step(grads)
        if step % 3 != 0:
            loss = reference.loss_for_ratio(ratios[step % len(ratios)])
            optimizer.observe_loss(loss)
            reference.observe(loss)
    return optimizer, variables, reference


def eager_apply(optimizer, variables):
    return lambda grads: optimizer.apply(
        [ops.convert_to_tensor(g) for g in grads], variables
    )


# Tolerances: the five scalars are float32 by spec, so even float64 weights
# see the radius rounded to float32 (2**-24 relative) and `rho` computed in
# float32; a float32 run adds float32 rounding in every element op.
TOLERANCE = {"float64": 1e-6, "float32": 2e-5}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_correctness_against_reference(dtype, mode):
    factory = eager_apply if mode == "eager" else compiled_apply
    optimizer, variables, reference = run_against_reference(factory, dtype)

    # The case covers what it claims: both branches of r, past total_steps.
    assert reference.fisher_branch_count > 0
    assert reference.sqrt_branch_count > 0
    assert reference.iterations > reference.total_steps
    lower, upper = reference.bounds()
    assert np.isclose(lower, 0.8) and np.isclose(upper, 1.2)

    tol = TOLERANCE[dtype]
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(
            to_numpy(variable), expected, rtol=tol, atol=tol
        )
    for i, expected in enumerate(reference.m):
        np.testing.assert_allclose(
            to_numpy(optimizer._momentums[i]), expected, rtol=tol, atol=tol
        )
    for i, expected in enumerate(reference.v):
        np.testing.assert_allclose(
            to_numpy(optimizer._velocities[i]), expected, rtol=tol, atol=tol
        )
    np.testing.assert_allclose(
        scalars_of(optimizer), reference.scalars(), rtol=2e-5, atol=1e-7
    )
    assert int(to_numpy(optimizer.iterations)) == reference.iterations


def test_radius_visits_every_regime():
    """The reference run moves the radius inside and onto both bounds."""
    radii, bounds = [], []
    weights, gradients = make_problem("float32")
    reference = ReferenceSOAA(
        weights, learning_rate=0.01, beta_1=0.8, beta_2=0.95,
        radius_bound=0.2, total_steps=25, initial_radius=1.3,
    )
    for step, rho in zip(range(1, 13), [0.5, -2.0, 1.0, 1.1, 40.0, 0.95] * 2):
        reference.step(gradients(step))
        bounds.append(reference.bounds())
        reference.observe(reference.loss_for_ratio(rho))
        radii.append(reference.radius)
    on_lower = [np.isclose(r, lo) for r, (lo, _) in zip(radii, bounds)]
    on_upper = [np.isclose(r, hi) for r, (_, hi) in zip(radii, bounds)]
    inside = [not (a or b) for a, b in zip(on_lower, on_upper)]
    assert any(on_lower) and any(on_upper) and any(inside)


def test_single_step_worked_example():
    """The spec's worked example, checked by hand."""
    dtype = "float64" if float64_available() else "float32"
    theta = keras.Variable([1.0, -2.0], dtype=dtype)
    optimizer = SOAA(learning_rate=0.1, total_steps=10)
    optimizer.apply([ops.convert_to_tensor([1.0, -2.0], dtype=dtype)], [theta])
    np.testing.assert_allclose(to_numpy(theta), [0.95, -1.975], rtol=1e-7)
    np.testing.assert_allclose(
        to_numpy(optimizer.predicted_reduction), 0.075, rtol=1e-6
    )
    optimizer.observe_loss(2.5)  # loss(theta0) = |theta0|**2 / 2
    np.testing.assert_allclose(
        scalars_of(optimizer), [1.0, 0.25, 1.0, 0.0, 0.075], rtol=1e-6
    )


def test_first_observation_sets_radius_to_lower_bound():
    """rho = 0 on the first observation, whatever float32 rounding does."""
    for loss in [2.5, 0.3, 7.77, 1e-3, 123.456]:
        theta = keras.Variable([1.0, -2.0])
        optimizer = SOAA(learning_rate=0.1, total_steps=10, initial_radius=1.5)
        optimizer.apply([ops.convert_to_tensor([1.0, -2.0])], [theta])
        optimizer.observe_loss(loss)
        assert float(to_numpy(optimizer.radius)) == 1.0, loss


def test_observe_loss_accepts_scalar_tensor():
    theta = keras.Variable([1.0])
    optimizer = SOAA(total_steps=5)
    optimizer.apply([ops.convert_to_tensor([1.0])], [theta])
    optimizer.observe_loss(ops.convert_to_tensor(0.5))
    assert float(to_numpy(optimizer.loss_count)) == 1.0


def test_observe_loss_rejects_non_scalar():
    theta = keras.Variable([1.0])
    optimizer = SOAA(total_steps=5)
    optimizer.apply([ops.convert_to_tensor([1.0])], [theta])
    with pytest.raises(ValueError, match="scalar"):
        optimizer.observe_loss(np.ones(3))
    np.testing.assert_array_equal(
        scalars_of(optimizer)[:3], [1.0, 0.0, 0.0]
    )


def test_non_finite_gradient_leaves_variable_and_state_unchanged():
    good = keras.Variable([1.0, 2.0])
    bad = keras.Variable([3.0, 4.0])
    optimizer = SOAA(learning_rate=0.1, total_steps=10, weight_decay=0.1)
    optimizer.apply(
        [ops.convert_to_tensor([0.5, 0.5]), ops.convert_to_tensor([0.5, 0.5])],
        [good, bad],
    )
    bad_before = to_numpy(bad)
    bad_m_before = to_numpy(optimizer._momentums[1])
    bad_v_before = to_numpy(optimizer._velocities[1])
    predicted_before = float(to_numpy(optimizer.predicted_reduction))
    reference = ReferenceSOAA(
        [to_numpy(good)], learning_rate=0.1, total_steps=10, weight_decay=0.1
    )
    reference.m[0] = to_numpy(optimizer._momentums[0])
    reference.v[0] = to_numpy(optimizer._velocities[0])
    reference.iterations = 1

    optimizer.apply(
        [
            ops.convert_to_tensor([0.25, -0.5]),
            ops.convert_to_tensor([np.nan, 1.0]),
        ],
        [good, bad],
    )
    reference.step([np.array([0.25, -0.5])])

    np.testing.assert_array_equal(to_numpy(bad), bad_before)
    np.testing.assert_array_equal(
        to_numpy(optimizer._momentums[1]), bad_m_before
    )
    np.testing.assert_array_equal(
        to_numpy(optimizer._velocities[1]), bad_v_before
    )
    np.testing.assert_allclose(to_numpy(good), reference.weights[0], rtol=1e-6)
    np.testing.assert_allclose(
        float(to_numpy(optimizer.predicted_reduction)) - predicted_before,
        reference.predicted_reduction,
        rtol=1e-5,
    )


def test_non_finite_loss_keeps_average_and_drops_radius_to_lower_bound():
    theta = keras.Variable([1.0, -2.0])
    optimizer = SOAA(learning_rate=0.1, total_steps=4)
    reference = ReferenceSOAA([[1.0, -2.0]], learning_rate=0.1, total_steps=4)
    for loss in [2.5, 2.0, np.nan, np.inf, 1.0]:
        grad = [to_numpy(theta)]
        optimizer.apply([ops.convert_to_tensor(g) for g in grad], [theta])
        reference.step(grad)
        optimizer.observe_loss(loss)
        reference.observe(loss)
        assert np.all(np.isfinite(scalars_of(optimizer)))
        np.testing.assert_allclose(
            scalars_of(optimizer), reference.scalars(), rtol=1e-5, atol=1e-7
        )
    assert reference.loss_count == 3


def test_learning_rate_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)
    weights, gradients = make_problem("float32")
    optimizer = SOAA(learning_rate=schedule, total_steps=6)
    variables = [keras.Variable(w) for w in weights]
    reference = ReferenceSOAA(weights, total_steps=6)
    for step in range(1, 7):
        lr = 0.1 * 0.5 ** ((step - 1) / 2)
        grads = gradients(step)
        optimizer.apply([ops.convert_to_tensor(g) for g in grads], variables)
        reference.step(grads, learning_rate=lr)
        optimizer.observe_loss(1.0 / step)
        reference.observe(1.0 / step)
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=2e-5)


def test_callable_learning_rate():
    theta = keras.Variable([1.0, -2.0])
    optimizer = SOAA(learning_rate=lambda: 0.1)
    optimizer.apply([ops.convert_to_tensor([1.0, -2.0])], [theta])
    np.testing.assert_allclose(to_numpy(theta), [0.95, -1.975], rtol=1e-6)


def test_weight_decay_exclusion():
    decayed = keras.Variable([2.0])
    excluded = keras.Variable([2.0], name="exclude")
    optimizer = SOAA(learning_rate=0.5, weight_decay=0.1)
    optimizer.exclude_from_weight_decay(var_names=["exclude"])
    zero = ops.convert_to_tensor([0.0])
    optimizer.apply([zero, zero], [decayed, excluded])
    np.testing.assert_allclose(to_numpy(decayed), [2.0 - 0.5 * 0.1 * 2.0])
    np.testing.assert_allclose(to_numpy(excluded), [2.0])


def single_step_with(grad, **kwargs):
    """One step on `theta = [1, 1]`: returns the new weights."""
    theta = keras.Variable([1.0, 1.0])
    SOAA(learning_rate=0.1, **kwargs).apply(
        [ops.convert_to_tensor(grad)], [theta]
    )
    return to_numpy(theta)


def reference_single_step(grad):
    reference = ReferenceSOAA([[1.0, 1.0]], learning_rate=0.1)
    reference.step([np.asarray(grad, dtype=np.float64)])
    return reference.weights[0]


def test_clip_norm():
    clipped = np.array([3.0, 4.0]) / 5.0 * 0.5
    np.testing.assert_allclose(
        single_step_with([3.0, 4.0], clipnorm=0.5),
        reference_single_step(clipped),
        rtol=1e-6,
    )


def test_clip_value():
    np.testing.assert_allclose(
        single_step_with([3.0, -0.1], clipvalue=0.5),
        reference_single_step([0.5, -0.1]),
        rtol=1e-6,
    )


def test_global_clip_norm():
    theta = [keras.Variable([1.0]), keras.Variable([1.0])]
    optimizer = SOAA(learning_rate=0.1, global_clipnorm=1.0)
    optimizer.apply(
        [ops.convert_to_tensor([3.0]), ops.convert_to_tensor([4.0])], theta
    )
    reference = ReferenceSOAA([[1.0], [1.0]], learning_rate=0.1)
    reference.step([np.array([0.6]), np.array([0.8])])
    for variable, expected in zip(theta, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)


def test_loss_scale_factor():
    np.testing.assert_allclose(
        single_step_with([300.0, -10.0], loss_scale_factor=100.0),
        reference_single_step([3.0, -0.1]),
        rtol=1e-6,
    )


def test_ema():
    theta = keras.Variable([1.0, -2.0])
    optimizer = SOAA(learning_rate=0.1, use_ema=True, ema_momentum=0.5)
    reference = ReferenceSOAA([[1.0, -2.0]], learning_rate=0.1)
    average = None
    for _ in range(3):
        grad = [to_numpy(theta)]
        optimizer.apply([ops.convert_to_tensor(grad[0])], [theta])
        reference.step(grad)
        w = reference.weights[0]
        average = w if average is None else 0.5 * average + 0.5 * w
    np.testing.assert_allclose(to_numpy(theta), reference.weights[0], rtol=1e-6)
    optimizer.finalize_variable_values([theta])
    np.testing.assert_allclose(to_numpy(theta), average, rtol=1e-6)


def test_gradient_accumulation():
    theta = keras.Variable([1.0, -2.0])
    optimizer = SOAA(learning_rate=0.1, gradient_accumulation_steps=2)
    reference = ReferenceSOAA([[1.0, -2.0]], learning_rate=0.1)
    optimizer.apply([ops.convert_to_tensor([1.0, 1.0])], [theta])
    np.testing.assert_array_equal(to_numpy(theta), [1.0, -2.0])
    assert float(to_numpy(optimizer.predicted_reduction)) == 0.0
    optimizer.apply([ops.convert_to_tensor([3.0, -1.0])], [theta])
    reference.step([np.array([2.0, 0.0])])
    np.testing.assert_allclose(to_numpy(theta), reference.weights[0], rtol=1e-6)
    np.testing.assert_allclose(
        float(to_numpy(optimizer.predicted_reduction)),
        reference.predicted_reduction,
        rtol=1e-5,
    )


def test_scalar_state_layout():
    theta = keras.Variable([1.0])
    optimizer = SOAA(initial_radius=0.7)
    optimizer.build([theta])
    names = [v.name for v in optimizer.variables]
    # State layout 4 (docs/algorithm.md, "State"): `state_layout` before the
    # moments; after them the radius, the paper controller's sum and state.
    assert names[1:3] == ["learning_rate", "state_layout"]
    assert names[-5:] == [
        "radius",
        "predicted_reduction",
        "loss_average",
        "loss_count",
        "previous_predicted_reduction",
    ]
    scalars = [optimizer.variables[2], *optimizer.variables[-5:]]
    assert all(v.dtype == "float32" for v in scalars)
    assert all(v.aggregation == "only_first_replica" for v in scalars)
    np.testing.assert_array_equal(
        scalars_of(optimizer), np.float32([0.7, 0, 0, 0, 0])
    )


def test_stateless_observe_loss_matches_observe_loss():
    thetas = [keras.Variable([1.0, -2.0]), keras.Variable([1.0, -2.0])]
    stateful, stateless = SOAA(total_steps=5), SOAA(total_steps=5)
    for optimizer, theta in zip((stateful, stateless), thetas):
        optimizer.apply([ops.convert_to_tensor([0.5, 1.0])], [theta])
    stateful.observe_loss(2.0)
    new_values = stateless.stateless_observe_loss(
        [v.value for v in stateless.variables], 2.0
    )
    np.testing.assert_array_equal(
        scalars_of(stateless), [1.0, 0.0, 0.0, scalars_of(stateful)[4], 0.0]
    )  # untouched: the stateless call only returns the new values
    for variable, value in zip(stateless.variables, new_values):
        variable.assign(value)
    np.testing.assert_array_equal(scalars_of(stateless), scalars_of(stateful))
