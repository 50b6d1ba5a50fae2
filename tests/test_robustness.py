"""Bad input gets a clear error, and nothing is ever lost or corrupted.

Every check runs on the backend of this run (`KERAS_BACKEND`), eagerly and,
where noted, compiled. Expected values come from the float64 NumPy reference
of the spec (`soaa_reference.py`), which skips a variable whose gradient is
not finite; where float32 cannot hold what the spec computes (`g**2` beyond
3.4e38), the documented rule is "skip that variable", which the tests express
by handing the reference a NaN gradient for it.
"""

import json
import math
import warnings
from fractions import Fraction

import keras
import numpy as np
import pytest
from conftest import (
    BACKEND,
    compiled_apply,
    float64_available,
    scalars_of,
    to_numpy,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from keras import ops
from soaa_reference import ReferenceSOAA

from keras_soaa import SOAA, TrustRegionCallback

NAN, INF = math.nan, math.inf
U32 = 2.0**-24  # float32 unit roundoff
TINY32 = 2.0**-126  # smallest normal float32: subnormals may be flushed to 0
FLOAT32_MAX = float(np.finfo(np.float32).max)
DTYPES = ["float32"] + (["float64"] if float64_available() else [])
NO_LOSS_WARNING = "no loss is fed to its trust region"


# --------------------------------------------------------------------------
# Helpers


def snapshot(optimizer, variables):
    """Copies of everything SOAA may change (float64, so exact); builds the
    optimizer on `variables` first if needed (as `apply` would)."""
    if not optimizer.built:
        optimizer.build(variables)
    return dict(
        weights=[to_numpy(v) for v in variables],
        m=[to_numpy(x) for x in optimizer._momentums],
        v=[to_numpy(x) for x in optimizer._velocities],
        scalars=scalars_of(optimizer),
        iterations=int(to_numpy(optimizer.iterations)),
        all=[to_numpy(x) for x in optimizer.variables],
    )


def assert_variable_untouched(before, after, index):
    for key in ("weights", "m", "v"):
        np.testing.assert_array_equal(after[key][index], before[key][index])


def assert_all_finite(optimizer, variables):
    for variable in list(variables) + list(optimizer.variables):
        value = to_numpy(variable)
        assert np.all(np.isfinite(value)), (variable.name, value)


def assert_state_unchanged(before, after):
    assert after["iterations"] == before["iterations"]
    for old, new in zip(before["all"] + before["weights"],
                        after["all"] + after["weights"]):
        np.testing.assert_array_equal(new, old)


def count_no_loss_warnings(record):
    return sum(NO_LOSS_WARNING in str(w.message) for w in record)


def tensors(grads, dtype=None):
    return [None if g is None else ops.convert_to_tensor(g, dtype=dtype)
            for g in grads]


def sync_reference(reference, optimizer, variables):
    """Sets the reference's state to SOAA's (so one step can be compared)."""
    if not optimizer.built:
        optimizer.build(variables)
    reference.weights = [to_numpy(v) for v in variables]
    reference.m = [to_numpy(x) for x in optimizer._momentums]
    reference.v = [to_numpy(x) for x in optimizer._velocities]
    (reference.radius, reference.loss_average, count,
     reference.predicted_reduction,
     reference.previous_predicted_reduction) = scalars_of(optimizer)
    reference.loss_count = int(count)
    reference.iterations = int(to_numpy(optimizer.iterations))


def step_tolerance(size):
    """Relative float32 error bound of one step on a variable of `size`.

    Each element sees ~30 rounded operations, and the two sums in `c` add
    up to `size` roundings each; the factor 2 is a safety margin.
    """
    return (4 * size + 64) * U32


def assert_step_matches(optimizer, variables, reference, before, grads):
    """Compares one step of SOAA with one of the reference, both from the
    same state `before`, each quantity within its float32 error bound."""
    after = snapshot(optimizer, variables)
    t = reference.iterations
    lr = reference.learning_rate
    bc1 = 1 - reference.beta_1**t
    bc2 = 1 - reference.beta_2**t
    predicted_scale = U32 * abs(before["scalars"][3])
    for i, u in enumerate(reference.last_directions):
        if u is None:  # skipped by the reference: must be bit-for-bit kept
            assert_variable_untouched(before, after, i)
            continue
        g = np.asarray(grads[i], dtype=np.float64)
        tol = step_tolerance(g.size)
        decay = lr * (reference.weight_decay or 0.0)
        theta_scale = (np.abs(before["weights"][i]) * (1 + decay)
                       + lr * np.abs(u))
        m_scale = np.abs(before["m"][i]) + np.abs(g)
        v_scale = before["v"][i] + g**2
        for key, expected, scale in (
            ("weights", reference.weights[i], theta_scale),
            ("m", reference.m[i], m_scale),
            ("v", reference.v[i], v_scale),
        ):
            error = np.abs(after[key][i] - expected)
            assert np.all(error <= tol * scale + TINY32), (key, i, error, scale)
        m_hat, v_hat = reference.m[i] / bc1, reference.v[i] / bc2
        predicted_scale += tol * lr * np.sum(
            np.abs(m_hat * u) + 0.5 * v_hat * u**2
        )
    predicted_error = abs(after["scalars"][3] - reference.predicted_reduction)
    assert predicted_error <= predicted_scale + TINY32, (
        predicted_error, predicted_scale)
    assert after["iterations"] == reference.iterations
    assert_all_finite(optimizer, variables)


def assert_observation_matches(optimizer, reference, before_scalars, loss):
    """Compares one observation of SOAA with one of the reference, both from
    the same scalar state, within float32 error bounds of each quantity."""
    radius, average, count, predicted, previous = scalars_of(optimizer)
    old_radius, old_average, _, old_predicted, _ = before_scalars
    assert count == reference.loss_count
    assert predicted == 0.0
    assert abs(previous - old_predicted) <= TINY32  # subnormals may flush
    lower, upper = reference.bounds()
    bound_tol = 64 * U32 * upper
    assert lower - bound_tol <= radius <= upper + bound_tol
    if not np.isfinite(np.float32(loss)):
        assert average == old_average
        assert abs(radius - lower) <= bound_tol
        return
    beta_1 = reference.beta_1
    average_scale = beta_1 * abs(old_average) + (1 - beta_1) * abs(loss)
    assert (abs(average - reference.loss_average)
            <= 4 * U32 * average_scale + TINY32)
    if count == 1:  # the first observation: rho = 0, radius = lower bound
        assert abs(radius - lower) <= bound_tol
        return
    correction = 1 - beta_1**count
    corrected = reference.loss_average / correction
    denominator = max(before_scalars[4], reference.epsilon)
    rho = (corrected - loss) / denominator
    rho_error = (16 * U32 * (abs(corrected) + abs(loss))) / denominator
    rho_error += 4 * U32 * abs(rho)
    radius_tol = old_radius * rho_error + bound_tol
    assert abs(radius - reference.radius) <= radius_tol, (
        radius, reference.radius, radius_tol)


def nan_for(grads, indices):
    """`grads` with the variables at `indices` marked "skip" (NaN)."""
    return [np.full(np.shape(g), np.nan) if i in indices else g
            for i, g in enumerate(grads)]


# --------------------------------------------------------------------------
# Hyperparameters

RULES = {
    "learning_rate": "> 0",
    "beta_1": "in [0, 1)",
    "beta_2": "in [0, 1)",
    "epsilon": "> 0",
    "radius_bound": "in (0, 1)",
    "total_steps": "integer >= 1",
    "initial_radius": "> 0",
    "weight_decay": ">= 0",
}

_NOT_NUMBERS = ["0.5", None, True, False, np.bool_(True), [0.5], 1j]
INVALID_HYPERPARAMETERS = (
    [("learning_rate", v) for v in [
        0.0, 0, -1e-3, np.float64(-0.1), NAN, np.float32("nan"), INF, -INF,
        10**400, "0.01", None, True, False, np.bool_(True), [0.01], 1j,
        np.array(0.01),
    ]]
    + [(name, v) for name in ("beta_1", "beta_2") for v in [
        1.0, 1, 1.5, -0.1, -1e-12, np.float32(1.0), NAN, INF, -INF,
        *_NOT_NUMBERS,
    ]]
    + [("epsilon", v) for v in [
        0.0, -1e-8, np.float64(0), NAN, INF, *_NOT_NUMBERS,
    ]]
    + [("radius_bound", v) for v in [
        0.0, 1.0, -0.5, 1.5, np.float32(0), NAN, INF, *_NOT_NUMBERS,
    ]]
    + [("total_steps", v) for v in [
        0, -5, np.int64(0), 10.5, 10.0, np.float64(10.0), NAN, INF, "100",
        True, False, np.bool_(True), [10], 10**400 * -1,
    ]]
    + [("initial_radius", v) for v in [
        0.0, -1.0, NAN, INF, *_NOT_NUMBERS,
    ]]
    + [("weight_decay", v) for v in [
        -0.1, NAN, INF, "0.01", True, [0.1], 1j,
    ]]
)


def test_invalid_hyperparameters_name_argument_and_valid_range():
    # One test, not one per value: each test pays Keras' session reset.
    assert {a for a, _ in INVALID_HYPERPARAMETERS} == set(RULES)
    for argument, value in INVALID_HYPERPARAMETERS:
        with pytest.raises(ValueError) as info:
            SOAA(**{argument: value})
        message = str(info.value)
        assert f"`{argument}`" in message, (argument, value, message)
        assert RULES[argument] in message, (argument, value, message)
        assert "Received" in message, (argument, value, message)


def test_numpy_scalars_are_accepted_and_config_stays_json():
    optimizer = SOAA(
        learning_rate=np.float32(0.01),
        beta_1=np.float32(0.9),
        beta_2=np.float64(0.99),
        epsilon=np.float32(1e-7),
        radius_bound=np.float16(0.25),
        total_steps=np.int64(10),
        initial_radius=np.int32(2),
        weight_decay=np.float32(0.01),
        clipnorm=np.float32(1.0),
        use_ema=True,
        ema_momentum=np.float64(0.9),
        ema_overwrite_frequency=np.int64(5),
        loss_scale_factor=np.float32(2.0),
        gradient_accumulation_steps=np.int64(2),
    )
    config = optimizer.get_config()
    restored = SOAA.from_config(json.loads(json.dumps(config)))
    assert restored.get_config() == config
    for key, value in config.items():
        assert value is None or type(value) in (int, float, bool, str), key
    assert config["beta_1"] == float(np.float32(0.9))
    assert config["total_steps"] == 10 and type(config["total_steps"]) is int
    assert config["initial_radius"] == 2.0
    # And it trains.
    theta = keras.Variable([1.0, -2.0])
    for _ in range(2):
        optimizer.apply(tensors([[1.0, -2.0]]), [theta])
    assert np.all(np.isfinite(to_numpy(theta)))
    assert not np.array_equal(to_numpy(theta), [1.0, -2.0])


VALID_EDGE_HYPERPARAMETERS = [
    dict(beta_1=0.0, beta_2=0.0),
    dict(beta_1=float(np.nextafter(1.0, 0.0)), beta_2=0.999999),
    dict(radius_bound=1e-9),
    dict(radius_bound=1 - 1e-9),
    dict(total_steps=1),
    dict(total_steps=np.uint8(3)),
    dict(learning_rate=1),
    dict(learning_rate=Fraction(1, 100)),
    dict(learning_rate=1e6),
    dict(initial_radius=1e-6),
    dict(initial_radius=1e6),
    dict(epsilon=1e-30),
    dict(weight_decay=0),
    dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(
        0.1, 10, 0.5)),
]


def test_valid_edge_hyperparameters_are_accepted():
    for kwargs in VALID_EDGE_HYPERPARAMETERS:
        optimizer = SOAA(**kwargs)
        config = optimizer.get_config()
        json.dumps(config)
        assert SOAA.from_config(config).get_config() == config, kwargs


# --------------------------------------------------------------------------
# Non-finite gradients

SHAPES = [(2, 3), (4,), ()]
SCALES = [1.0, 0.1, 3.0]
# step -> [(variable index, pattern)]: one or all elements, one or several
# variables, every variable at step 5; steps 6 and 8-10 are clean: recovery.
CORRUPTIONS = {
    2: [(0, "one")],
    3: [(1, "all")],
    4: [(0, "one"), (2, "all")],
    5: [(0, "all"), (1, "one"), (2, "one")],
    7: [(1, "one")],
}
STREAM_HYPER = dict(
    learning_rate=0.05, beta_1=0.8, beta_2=0.95, radius_bound=0.2,
    total_steps=8, initial_radius=1.3, weight_decay=0.05,
)


def clean_gradients(step, dtype="float32"):
    rng = np.random.default_rng(100 + step)
    return [(s * rng.normal(size=shape)).astype(dtype)
            for shape, s in zip(SHAPES, SCALES)]


def corrupt(grad, pattern, bad):
    grad = np.array(grad, copy=True)
    flat = grad.reshape(-1)
    if bad == "mixed":
        values = [np.nan, np.inf, -np.inf]
        count = 1 if pattern == "one" else flat.size
        for k in range(count):
            flat[k] = values[k % 3]
    elif pattern == "one":
        flat[0] = bad
    else:
        flat[:] = bad
    return flat.reshape(grad.shape)


def initial_weights():
    rng = np.random.default_rng(7)
    return [rng.normal(size=shape).astype("float32") for shape in SHAPES]


@pytest.mark.parametrize("pattern", ["one", "all"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF, "mixed"])
def test_non_finite_gradients_skip_exactly_those_variables(bad, pattern):
    check_non_finite_gradients_skip_exactly_those_variables(bad, pattern)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_gradients_skip_when_beta_1_exceeds_beta_2(bad):
    """With `beta_1 > beta_2` the step decides from the sums themselves
    (`SOAA.update_step`), not from the new moments: the same skips."""
    check_non_finite_gradients_skip_exactly_those_variables(
        bad, "one", beta_1=0.9, beta_2=0.5
    )


def check_non_finite_gradients_skip_exactly_those_variables(bad, pattern, **betas):
    hyper = dict(STREAM_HYPER, **betas)
    weights = initial_weights()
    variables = [keras.Variable(w) for w in weights]
    optimizer = SOAA(**hyper)
    optimizer.build(variables)
    reference = ReferenceSOAA(weights, **hyper)
    ratios = [0.5, 2.0, -1.0, 1.0, 30.0]
    for step in range(1, 11):
        grads = clean_gradients(step)
        corrupted = [i for i, _ in CORRUPTIONS.get(step, [])]
        for i, where in CORRUPTIONS.get(step, []):
            grads[i] = corrupt(grads[i], "all" if where == "all" else pattern,
                               bad)
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads), variables)
        reference.step(grads)
        after = snapshot(optimizer, variables)
        for i in corrupted:
            assert_variable_untouched(before, after, i)
        for i in set(range(3)) - set(corrupted):
            assert not np.array_equal(after["weights"][i],
                                      before["weights"][i])
        if len(corrupted) == 3:  # nothing predicted, but the step counts
            assert after["scalars"][3] == before["scalars"][3]
        assert after["iterations"] == step
        assert_all_finite(optimizer, variables)
        np.testing.assert_allclose(
            after["scalars"][3], reference.predicted_reduction,
            rtol=2e-5, atol=1e-7,
        )
        if step % 2 == 0:
            loss = reference.loss_for_ratio(ratios[step % len(ratios)])
            optimizer.observe_loss(loss)
            reference.observe(loss)
    # Recovered: SOAA followed the reference (which skips) all along.
    final = snapshot(optimizer, variables)
    for key in ("weights", "m", "v"):
        for got, expected in zip(final[key], getattr(
                reference, "weights" if key == "weights" else key)):
            np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(final["scalars"], reference.scalars(),
                               rtol=2e-5, atol=1e-7)


def test_bad_gradients_compiled_match_reference_and_warn_once():
    """One compiled `apply` (XLA / jax.jit / torch.compile) through a stream of
    NaN, +-inf, float32-overflowing, tiny and zero gradients, with a float16
    variable; `total_steps` is None and no loss is observed: exactly one
    warning, at trace time."""
    weights = initial_weights() + [np.array([1.0, -0.5, 2.0], "float16")]
    variables = [keras.Variable(w) for w in weights]
    hyper = dict(learning_rate=0.05, beta_1=0.8, beta_2=0.95,
                 initial_radius=1.3)
    optimizer = SOAA(**hyper)
    reference = ReferenceSOAA(weights, **hyper)
    stream = {
        2: {0: ("one", NAN), 3: ("one", INF)},
        3: {1: ("all", -INF)},
        4: {0: ("value", 1e30), 2: ("value", 1e-30)},  # 1e30**2 overflows
        5: {0: ("all", NAN), 1: ("one", INF), 2: ("one", -INF),
            3: ("all", NAN)},
        6: {1: ("value", 0.0), 3: ("value", 300.0)},  # 300**2 > float16 max
        7: {0: ("value", -1e25)},
    }
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        apply = compiled_apply(optimizer, variables)
        for step in range(1, 10):
            grads = clean_gradients(step) + [
                np.array([0.5, -1.0, 2.0], "float16") * step
            ]
            skipped = []
            for i, (kind, value) in stream.get(step, {}).items():
                if kind == "value":
                    grads[i] = np.full_like(grads[i], value)
                    if abs(value) > 1e19 and grads[i].dtype == np.float32:
                        skipped.append(i)  # documented: g**2 overflows
                else:
                    grads[i] = corrupt(grads[i], kind, value)
                    skipped.append(i)
            before = snapshot(optimizer, variables)
            apply(grads)
            reference.step(nan_for(grads, skipped))
            after = snapshot(optimizer, variables)
            for i in skipped:
                assert_variable_untouched(before, after, i)
            assert_all_finite(optimizer, variables)
            # The float16 weight is rounded once per step: compare the step.
            error = np.abs(after["weights"][3] - reference.weights[3])
            ulp = np.spacing(np.abs(reference.weights[3]).astype(np.float16))
            assert np.all(error <= ulp.astype(np.float64)), (error, ulp)
            reference.weights[3] = after["weights"][3]
    assert count_no_loss_warnings(record) == 1
    final = snapshot(optimizer, variables)
    assert final["iterations"] == 9
    assert optimizer._momentums[3].dtype == "float32"
    for key, expected in (("weights", reference.weights), ("m", reference.m),
                          ("v", reference.v)):
        for i in range(3):
            np.testing.assert_allclose(final[key][i], expected[i],
                                       rtol=2e-5, atol=2e-5)
    for key, expected in (("m", reference.m), ("v", reference.v)):
        np.testing.assert_allclose(final[key][3], expected[3], rtol=2e-5)
    np.testing.assert_allclose(final["scalars"][3],
                               reference.predicted_reduction, rtol=2e-5)


def test_global_clipnorm_spreads_one_nan_to_every_variable():
    """Keras' global clipping divides every gradient by the global norm,
    which is NaN: so every variable skips the step (documented)."""
    variables = [keras.Variable([1.0, 2.0]), keras.Variable([3.0, -4.0])]
    optimizer = SOAA(learning_rate=0.1, global_clipnorm=1.0, total_steps=10)
    reference = ReferenceSOAA([[1.0, 2.0], [3.0, -4.0]], learning_rate=0.1)

    def clip(grads):
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads))
        return [g * 1.0 / max(norm, 1.0) for g in grads]

    stream = [
        [np.array([3.0, 0.0]), np.array([0.0, 4.0])],
        [np.array([np.nan, 1.0]), np.array([0.5, 0.5])],
        [np.array([0.2, 0.1]), np.array([-0.3, 0.4])],
    ]
    for grads in stream:
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads, "float32"), variables)
        reference.step(clip(grads))
        after = snapshot(optimizer, variables)
        if np.isnan(grads[0][0]):
            for i in range(2):
                assert_variable_untouched(before, after, i)
            assert after["scalars"][3] == before["scalars"][3]
        assert_all_finite(optimizer, variables)
    assert int(to_numpy(optimizer.iterations)) == 3
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)


def test_clipnorm_and_clipvalue_with_non_finite_gradients():
    """Per-variable clipping keeps a NaN a NaN (skip); `clipnorm` turns an
    inf into NaN (inf / inf: skip); `clipvalue` turns +-inf into +-clipvalue,
    a finite gradient that is applied: the rule holds after clipping."""
    grads = [np.array([np.nan, 1.0]), np.array([np.inf, -np.inf]),
             np.array([3.0, -0.1])]
    cases = {
        "clipnorm": (dict(clipnorm=1.0),
                     [None, None, np.array([3.0, -0.1]) / np.hypot(3, 0.1)]),
        "clipvalue": (dict(clipvalue=0.5),
                      [None, np.array([0.5, -0.5]), np.array([0.5, -0.1])]),
    }
    for clip_kwargs, clipped in cases.values():
        variables = [keras.Variable([1.0, 2.0]) for _ in range(3)]
        optimizer = SOAA(learning_rate=0.1, total_steps=5, **clip_kwargs)
        reference = ReferenceSOAA([[1.0, 2.0]] * 3, learning_rate=0.1)
        optimizer.apply(tensors(grads, "float32"), variables)
        reference.step([np.full(2, np.nan) if c is None else c
                        for c in clipped])
        after = snapshot(optimizer, variables)
        for i, c in enumerate(clipped):
            if c is None:
                np.testing.assert_array_equal(after["weights"][i], [1.0, 2.0])
                np.testing.assert_array_equal(after["m"][i], [0.0, 0.0])
                np.testing.assert_array_equal(after["v"][i], [0.0, 0.0])
            np.testing.assert_allclose(after["weights"][i],
                                       reference.weights[i], rtol=1e-6)
        assert_all_finite(optimizer, variables)


def test_gradient_accumulation_with_a_nan_micro_batch():
    variables = [keras.Variable([1.0, -2.0]), keras.Variable([0.5])]
    optimizer = SOAA(learning_rate=0.1, gradient_accumulation_steps=2,
                     total_steps=5)
    reference = ReferenceSOAA([[1.0, -2.0], [0.5]], learning_rate=0.1)
    micro = [
        [[1.0, 1.0], [0.5]], [[3.0, -1.0], [np.nan]],  # var 1 skips
        [[0.5, 0.0], [1.0]], [[0.5, 2.0], [-3.0]],  # both recover
    ]
    for k in range(0, 4, 2):
        before = snapshot(optimizer, variables)
        for grads in micro[k:k + 2]:
            optimizer.apply(tensors(grads, "float32"), variables)
        reference.step([(np.array(a) + np.array(b)) / 2
                        for a, b in zip(*micro[k:k + 2])])
        after = snapshot(optimizer, variables)
        if k == 0:
            assert_variable_untouched(before, after, 1)
        assert_all_finite(optimizer, variables)  # accumulators reset too
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)


def test_non_finite_learning_rate_skips_every_variable():
    rates = iter([0.1, NAN, INF, 0.1])
    variables = [keras.Variable([1.0, -2.0]), keras.Variable([[0.5, 3.0]])]
    optimizer = SOAA(learning_rate=lambda: next(rates), total_steps=9)
    reference = ReferenceSOAA([[1.0, -2.0], [[0.5, 3.0]]])
    for step, lr in enumerate([0.1, NAN, INF, 0.1], start=1):
        grads = [np.array([0.3, -0.2]) * step, np.array([[1.0, -1.0]])]
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads, "float32"), variables)
        after = snapshot(optimizer, variables)
        if math.isfinite(lr):
            reference.step(grads, learning_rate=lr)
        else:
            reference.step(nan_for(grads, {0, 1}))
            for i in range(2):
                assert_variable_untouched(before, after, i)
            np.testing.assert_array_equal(after["scalars"], before["scalars"])
        assert after["iterations"] == step
        assert_all_finite(optimizer, variables)
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)


class TriggeredNanGradient(keras.layers.Layer):
    """`x @ kernel + bias + offset`, where `offset`'s gradient is NaN on the
    batches whose 4th input column is 1 (the loss stays finite there)."""

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(3, 1), initializer=keras.initializers.Constant(0.3),
            name="kernel")
        self.bias = self.add_weight(shape=(1,), initializer="zeros",
                                    name="bias")
        self.offset = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(0.5),
            name="offset")

    def call(self, inputs):
        features, trigger = inputs[:, :3], ops.max(inputs[:, 3])
        s = self.offset
        # sqrt(0) on trigger batches: value 0, derivative inf * 0 = NaN.
        nan_gradient = ops.sqrt(s * trigger - s * trigger + (1.0 - trigger))
        return ops.matmul(features, self.kernel) + self.bias + s + nan_gradient


def test_nan_gradient_batch_inside_fit_matches_reference():
    rng = np.random.default_rng(5)
    batch, batches, epochs = 8, 4, 3
    features = rng.normal(size=(batch * batches, 3))
    trigger = np.zeros((batch * batches, 1))
    trigger[batch:2 * batch] = 1.0  # the second batch of every epoch
    x = np.concatenate([features, trigger], axis=1).astype("float32")
    y = (features @ [[1.0], [-2.0], [0.5]] + 0.7).astype("float32")
    hyper = dict(learning_rate=0.05, beta_1=0.8, beta_2=0.95)

    keras.utils.set_random_seed(0)
    layer = TriggeredNanGradient()
    model = keras.Sequential([keras.Input((4,)), layer])
    optimizer = SOAA(**hyper)
    model.compile(optimizer=optimizer, loss="mse")

    class WatchOffset(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.unchanged = []

        def _state(self):
            if hasattr(self.model, "jax_state_sync"):
                self.model.jax_state_sync()
            if not optimizer.built:  # TF builds it at the first step
                return [to_numpy(layer.offset), None, None,
                        to_numpy(layer.kernel)]
            i = 2  # offset: the 3rd trainable variable
            return [to_numpy(x) for x in (
                layer.offset, optimizer._momentums[i],
                optimizer._velocities[i], layer.kernel)]

        def on_train_batch_begin(self, batch, logs=None):
            self.before = self._state()

        def on_train_batch_end(self, batch, logs=None):
            after = self._state()
            same = [b is not None and np.array_equal(a, b)
                    for a, b in zip(after, self.before)]
            # (offset, its m and its v all kept; kernel kept)
            self.unchanged.append((all(same[:3]), same[3]))

    watch = WatchOffset()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=batch, epochs=epochs,
                            shuffle=False, verbose=0,
                            callbacks=[TrustRegionCallback(), watch])
    assert count_no_loss_warnings(record) == 0

    # The reference: the same linear model and MSE, by hand, in float64.
    reference = ReferenceSOAA(
        [np.full((3, 1), 0.3), np.zeros(1), np.array(0.5)],
        total_steps=epochs * batches, **hyper)
    for _ in range(epochs):
        for b in range(batches):
            rows = slice(b * batch, (b + 1) * batch)
            kernel, bias, offset = reference.weights
            out = features[rows] @ kernel + bias + offset
            out = out + np.sqrt(1.0 - trigger[rows][0, 0])
            residual = out - y[rows]
            delta = 2 * residual / batch
            d_offset = np.sum(delta) if trigger[rows][0, 0] == 0 else np.nan
            loss = float(np.mean(residual**2))
            reference.step([features[rows].T @ delta, delta.sum(axis=0),
                            np.array(d_offset)])
            reference.observe(loss)

    # On trigger batches: offset (and its m, v) kept, the kernel trained.
    assert watch.unchanged == [
        (b == 1, False) for _ in range(epochs) for b in range(batches)
    ]
    assert all(np.isfinite(history.history["loss"]))
    assert_all_finite(optimizer, model.trainable_variables)
    assert int(to_numpy(optimizer.iterations)) == epochs * batches
    for variable, expected in zip(model.trainable_variables,
                                  reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_allclose(scalars_of(optimizer), reference.scalars(),
                               rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------
# Losses fed to observe_loss


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
        with pytest.raises(ValueError, match="`observe_loss` takes one real"):
            optimizer.observe_loss(loss)
        assert_state_unchanged(before, snapshot(optimizer, [theta]))


def test_bad_loss_tensors_are_rejected_and_change_nothing():
    optimizer, theta = built_optimizer()
    before = snapshot(optimizer, [theta])
    for loss in [
        ops.ones((1,)), ops.ones((2, 2)), ops.zeros((0,)),
        ops.convert_to_tensor(True), ops.convert_to_tensor([1.0, np.nan]),
    ]:
        with pytest.raises(ValueError, match="`observe_loss` takes one real"):
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


# --------------------------------------------------------------------------
# Misuse


def make_data(samples=32):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(samples, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype("float32")
    return x, y


def make_model(optimizer, jit_compile="auto", hidden=0):
    keras.utils.set_random_seed(1)
    layers = [keras.Input((3,))]
    if hidden:
        layers.append(keras.layers.Dense(hidden, name="hidden"))
    layers.append(keras.layers.Dense(1, name="out"))
    model = keras.Sequential(layers)
    model.compile(optimizer=optimizer, loss="mse", jit_compile=jit_compile)
    return model


def test_callback_refuses_other_optimizers_before_any_step():
    x, y = make_data()
    for optimizer in [
        keras.optimizers.Adam(),
        keras.optimizers.SGD(),
        keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
    ]:
        model = make_model(optimizer, jit_compile=False)
        weights = [to_numpy(w) for w in model.weights]
        with pytest.raises(ValueError, match="only works with the `keras_soaa"):
            model.fit(x, y, epochs=1, verbose=0,
                      callbacks=[TrustRegionCallback()])
        for before, w in zip(weights, model.weights):
            np.testing.assert_array_equal(to_numpy(w), before)


def test_fit_without_callback_warns_exactly_once():
    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    ours = [w for w in record if NO_LOSS_WARNING in str(w.message)]
    assert len(ours) == 1
    assert issubclass(ours[0].category, UserWarning)
    message = str(ours[0].message)
    assert "TrustRegionCallback" in message and "total_steps" in message
    assert float(to_numpy(optimizer.radius)) == 1.0  # indeed never adapted


def test_fit_with_callback_and_custom_loops_do_not_warn():
    x, y = make_data()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_model(SOAA(learning_rate=0.05), jit_compile=False).fit(
            x, y, batch_size=8, epochs=1, verbose=0,
            callbacks=[TrustRegionCallback()])
        make_model(keras.optimizers.LossScaleOptimizer(SOAA()),
                   jit_compile=False).fit(
            x, y, batch_size=8, epochs=1, verbose=0,
            callbacks=[TrustRegionCallback()])
        # A custom loop: total_steps set, observe_loss after each apply.
        theta = keras.Variable([1.0, -2.0])
        optimizer = SOAA(learning_rate=0.1, total_steps=5)
        for _ in range(5):
            loss = float(np.sum(to_numpy(theta) ** 2) / 2)
            optimizer.apply(tensors([to_numpy(theta)], "float32"), [theta])
            optimizer.observe_loss(loss)
    assert count_no_loss_warnings(record) == 0
    # A custom loop that never observes: warned, once.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        optimizer = SOAA(learning_rate=0.1)
        for _ in range(5):
            optimizer.apply(tensors([to_numpy(theta)], "float32"), [theta])
    assert count_no_loss_warnings(record) == 1


def test_unknown_total_steps_in_fit_is_refused_before_training():
    x, y = make_data()

    def batches(repeat=False):
        while True:
            for i in range(4):
                yield x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]
            if not repeat:
                return

    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer, jit_compile=False)
    weights = [to_numpy(w) for w in model.weights]
    with pytest.raises(ValueError, match="total_steps.*steps_per_epoch"):
        model.fit(batches(), epochs=2, verbose=0,
                  callbacks=[TrustRegionCallback()])
    for before, w in zip(weights, model.weights):
        np.testing.assert_array_equal(to_numpy(w), before)
    assert int(to_numpy(optimizer.iterations)) == 0
    assert optimizer.total_steps is None
    # Telling fit the epoch length, or SOAA the run length, fixes it.
    model.fit(batches(repeat=True), steps_per_epoch=4, epochs=2, verbose=0,
              callbacks=[TrustRegionCallback()])
    assert optimizer.total_steps == 8
    assert float(to_numpy(optimizer.loss_count)) == 8
    optimizer = SOAA(learning_rate=0.05, total_steps=20)
    model = make_model(optimizer, jit_compile=False)
    model.fit(batches(), epochs=1, verbose=0,
              callbacks=[TrustRegionCallback()])
    assert optimizer.total_steps == 20
    assert float(to_numpy(optimizer.loss_count)) == 4


def test_fit_twice_and_resumed_fit_continue_the_schedule():
    """The first `fit` sets `total_steps`; later fits (resumed with
    `initial_epoch` or not) keep it, `t` and the loss count keep counting,
    and the radius stays within the bounds at `t` (final ones past T)."""
    x, y = make_data()
    gamma = 0.2
    optimizer = SOAA(learning_rate=0.05, radius_bound=gamma)
    model = make_model(optimizer)

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.radii = []

        def on_train_batch_end(self, batch, logs=None):
            # Through `self.model`, as a Keras callback reads variables
            # during a JAX `fit` (the access syncs the training state).
            t = int(to_numpy(self.model.optimizer.iterations))
            self.radii.append((t, float(logs["radius"])))

    record = Record()
    callbacks = [TrustRegionCallback(), record]
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
    assert optimizer.total_steps == 8
    model.fit(x, y, batch_size=8, epochs=4, initial_epoch=2, verbose=0,
              callbacks=callbacks)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=callbacks)
    assert optimizer.total_steps == 8
    assert int(to_numpy(optimizer.iterations)) == 20
    assert float(to_numpy(optimizer.loss_count)) == 20
    assert [t for t, _ in record.radii] == list(range(1, 21))
    for t, radius in record.radii:
        e = min(t - 1, 8) / 8
        lower, upper = (1 - gamma) ** e, 1 + gamma**e
        assert lower * (1 - 1e-6) <= radius <= upper * (1 + 1e-6), (t, radius)
    assert_all_finite(optimizer, model.trainable_variables)
    # A fresh optimizer resumed at initial_epoch: T covers the whole run.
    fresh = SOAA(learning_rate=0.05)
    make_model(fresh).fit(x, y, batch_size=8, epochs=4, initial_epoch=2,
                          verbose=0, callbacks=[TrustRegionCallback()])
    assert fresh.total_steps == 16
    assert int(to_numpy(fresh.iterations)) == 8


def test_none_gradients_in_apply():
    weights = [np.array([1.0, -2.0]), np.array([0.5, 0.5, 0.5]),
               np.array(3.0)]
    variables = [keras.Variable(w, dtype="float32") for w in weights]
    hyper = dict(learning_rate=0.1, weight_decay=0.1)
    optimizer = SOAA(total_steps=10, **hyper)
    reference = ReferenceSOAA(weights, **hyper)
    stream = [
        [[0.5, 1.0], [1.0, -1.0, 0.5], 2.0],
        [[0.5, 1.0], None, 2.0],
        [None, None, -1.0],
        [[0.1, 0.2], [1.0, 1.0, 1.0], None],
    ]
    for grads in stream:
        before = snapshot(optimizer, variables) if optimizer.built else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras: "Gradients do not exist"
            optimizer.apply(
                [None if g is None else ops.convert_to_tensor(g, "float32")
                 for g in grads], variables)
        reference.step([np.nan if g is None else np.asarray(g)
                        for g in grads])
        after = snapshot(optimizer, variables)
        for i, g in enumerate(grads):
            if g is None:
                assert_variable_untouched(before, after, i)
        assert_all_finite(optimizer, variables)
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)
    # No gradient at all: Keras refuses, nothing changes.
    before = snapshot(optimizer, variables)
    with pytest.raises(ValueError, match="No gradients"):
        optimizer.apply([None, None, None], variables)
    assert_state_unchanged(before, snapshot(optimizer, variables))


class WithUnusedWeight(keras.layers.Layer):
    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(3, 1), name="kernel")
        self.unused = self.add_weight(
            shape=(2,), initializer="ones", name="unused")

    def call(self, inputs):
        return ops.matmul(inputs, self.kernel)


def test_variable_unused_by_the_loss_in_fit():
    """TF and torch give it no gradient (None: filtered by Keras), JAX a
    zero one: either way it stays exactly as it was, its moments zero."""
    x, y = make_data()
    keras.utils.set_random_seed(2)
    layer = WithUnusedWeight()
    model = keras.Sequential([keras.Input((3,)), layer])
    optimizer = SOAA(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    kernel = to_numpy(layer.kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras: "Gradients do not exist"
        model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[TrustRegionCallback()])
    i = 1  # kernel, unused: the order the optimizer was built in
    np.testing.assert_array_equal(to_numpy(layer.unused), [1.0, 1.0])
    np.testing.assert_array_equal(to_numpy(optimizer._momentums[i]), 0.0)
    np.testing.assert_array_equal(to_numpy(optimizer._velocities[i]), 0.0)
    assert not np.array_equal(to_numpy(layer.kernel), kernel)
    assert_all_finite(optimizer, model.trainable_variables)


def test_layer_frozen_before_compile():
    x, y = make_data()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(4, name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.layers[0].trainable = False
    optimizer = SOAA(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    frozen = [to_numpy(w) for w in model.layers[0].weights]
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[TrustRegionCallback()])
    for before, w in zip(frozen, model.layers[0].weights):
        np.testing.assert_array_equal(to_numpy(w), before)
    assert len(optimizer._momentums) == 2  # the output layer's kernel, bias
    assert_all_finite(optimizer, model.trainable_variables)


def test_layer_frozen_between_fits():
    """Re-compiling with the same SOAA works on TF and torch: the frozen
    layer and its moments stay as they were. Keras' JAX trainer refuses an
    optimizer built on more variables (before any step: nothing changes);
    there, compile with a new SOAA."""
    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer, hidden=4)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[TrustRegionCallback()])
    hidden = model.get_layer("hidden")
    hidden.trainable = False
    model.compile(optimizer=optimizer, loss="mse")
    before = snapshot(optimizer, model.weights)
    frozen_indices = [0, 1]  # hidden kernel and bias come first
    if BACKEND == "jax":
        with pytest.raises(ValueError, match="compile with a new optimizer"):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                      callbacks=[TrustRegionCallback()])
        assert_state_unchanged(before, snapshot(optimizer, model.weights))
        optimizer = SOAA(learning_rate=0.05)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[TrustRegionCallback()])
        frozen_indices = []
    else:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[TrustRegionCallback()])
        assert int(to_numpy(optimizer.iterations)) == 8
    after = snapshot(optimizer, model.weights)
    for w, old in zip(hidden.weights, before["weights"]):
        np.testing.assert_array_equal(to_numpy(w), old)
    for i in frozen_indices:
        np.testing.assert_array_equal(after["m"][i], before["m"][i])
        np.testing.assert_array_equal(after["v"][i], before["v"][i])
    out = model.get_layer("out")
    assert not np.array_equal(to_numpy(out.kernel),
                              before["weights"][2])
    assert_all_finite(optimizer, model.trainable_variables)


# --------------------------------------------------------------------------
# 16-bit variables

SIXTEEN_BIT_GRADIENTS = {
    "float16": [
        [300.0, -1.0, 1e-3, 1000.0],  # 300**2 and 1000**2 overflow float16
        [60000.0, 2.0, -3.0, 0.5],  # near float16's max, 65504
        [np.nan, 1.0, 1.0, 1.0],  # skipped
        [1e-4, -60000.0, 0.0, 7.0],
        [0.1, 0.2, 0.3, 0.4],
    ],
    "bfloat16": [
        [300.0, -1.0, 1e-3, 1000.0],
        [1e30, 2.0, -3.0, 0.5],  # (1e30)**2 overflows float32: skipped
        [1e15, -1e12, 0.0, 7.0],
        [np.inf, 1.0, 1.0, 1.0],  # skipped
        [0.1, 0.2, 0.3, 0.4],
    ],
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_variables_keep_float32_moments_and_match_reference(dtype):
    """m and v of 16-bit variables are float32 and the update is computed in
    float32: the only 16-bit rounding is the new weight's (at most one ulp
    from the float64 reference step)."""
    weights = np.array([1.0, -2.0, 0.5, 3.0])
    variable = keras.Variable(weights, dtype=dtype)
    hyper = dict(learning_rate=0.01, weight_decay=0.01)
    optimizer = SOAA(total_steps=10, **hyper)
    optimizer.build([variable])
    assert optimizer._momentums[0].dtype == "float32"
    assert optimizer._velocities[0].dtype == "float32"
    reference = ReferenceSOAA([to_numpy(variable)], **hyper)
    for raw in SIXTEEN_BIT_GRADIENTS[dtype]:
        grad = ops.cast(ops.convert_to_tensor(np.float32(raw)), dtype)
        g = to_numpy(grad)
        skip = not np.all(np.isfinite(g)) or np.max(np.abs(g)) > 1e19
        before = snapshot(optimizer, [variable])
        reference.weights = [before["weights"][0]]  # the rounded weight
        optimizer.apply([grad], [variable])
        reference.step([np.full(4, np.nan)] if skip else [g])
        after = snapshot(optimizer, [variable])
        assert variable.dtype == dtype
        assert_all_finite(optimizer, [variable])
        if skip:
            assert_variable_untouched(before, after, 0)
            continue
        ulp = np.abs(to_numpy(ops.cast(reference.weights[0], dtype))) * (
            2.0**-10 if dtype == "float16" else 2.0**-7) + 1e-7
        assert np.all(np.abs(after["weights"][0] - reference.weights[0])
                      <= ulp), (after["weights"][0], reference.weights[0])
        np.testing.assert_allclose(after["m"][0], reference.m[0], rtol=1e-5)
        np.testing.assert_allclose(after["v"][0], reference.v[0], rtol=1e-5)


def test_float16_weight_that_would_overflow_saturates():
    """Finite sums decide the step (spec, "Non-finite steps"): the step is
    applied, and a 16-bit weight that would round to inf keeps its dtype's
    largest value; the other element and the moments follow the reference."""
    variable = keras.Variable([65504.0, 1.0], dtype="float16")
    optimizer = SOAA(learning_rate=100.0, total_steps=5)
    reference = ReferenceSOAA([to_numpy(variable)], learning_rate=100.0)
    optimizer.apply([ops.convert_to_tensor([-1.0, 1.0], "float16")],
                    [variable])  # 65504 + 100 * 0.5 would round to inf
    reference.step([np.array([-1.0, 1.0])])
    after = snapshot(optimizer, [variable])
    assert reference.weights[0][0] > 65504.0
    np.testing.assert_array_equal(after["weights"][0][0], 65504.0)
    np.testing.assert_allclose(after["weights"][0][1], reference.weights[0][1],
                               rtol=2.0**-10)
    np.testing.assert_allclose(after["m"][0], reference.m[0], rtol=1e-6)
    np.testing.assert_allclose(after["v"][0], reference.v[0], rtol=1e-6)
    np.testing.assert_allclose(after["scalars"][3],
                               reference.predicted_reduction, rtol=1e-5)
    assert after["iterations"] == 1
    assert_all_finite(optimizer, [variable])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_model_fit(dtype):
    """Targets of ~200 give gradients whose squares overflow float16."""
    x, y = make_data()
    keras.utils.set_random_seed(4)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(8, activation="relu", dtype=dtype),
        keras.layers.Dense(1, dtype=dtype),
    ])
    optimizer = SOAA(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, 100 * y, batch_size=8, epochs=6, verbose=0,
                        callbacks=[TrustRegionCallback()])
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(w.dtype == dtype for w in model.weights)
    assert all(m.dtype == "float32" for m in optimizer._momentums)
    # v <= (1 - beta_2**t) max g**2: some g**2 overflowed float16 (65504).
    largest_v = max(float(np.max(to_numpy(v))) for v in optimizer._velocities)
    assert largest_v / (1 - 0.999**24) > 65504
    assert_all_finite(optimizer, model.trainable_variables)


# --------------------------------------------------------------------------
# Extreme but legal values


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


# --------------------------------------------------------------------------
# Property-based: random shapes, hyperparameters and streams vs the reference

PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture,
                           HealthCheck.too_slow],
)


def log_uniform(low, high):
    return st.floats(math.log10(low), math.log10(high)).map(
        lambda e: float(10.0**e))


shapes_strategy = st.lists(
    st.lists(st.integers(0, 3), max_size=2).map(tuple),
    min_size=1, max_size=3,
)
corruption_strategy = st.sampled_from(
    [None, None, None, ("one", NAN), ("all", INF), ("one", -INF),
     ("all", NAN), ("one", "mixed")])


def make_arrays(shapes, scales, seed):
    rng = np.random.default_rng(seed)
    arrays = []
    for shape, scale in zip(shapes, scales):
        arrays.append(dict(
            theta=rng.normal(size=shape).astype("float32"),
            m=(0.5 * scale * rng.normal(size=shape)).astype("float32"),
            v=((scale * rng.normal(size=shape)) ** 2).astype("float32"),
        ))
    return arrays


def random_gradients(shapes, scales, corruptions, rng):
    grads = []
    for shape, scale, corruption in zip(shapes, scales, corruptions):
        g = (scale * rng.normal(size=shape)).astype("float32")
        if corruption is not None and g.size:
            g = corrupt(g, *corruption)
        grads.append(g)
    return grads


@PROPERTY_SETTINGS
@given(
    shapes=shapes_strategy,
    data=st.data(),
    learning_rate=log_uniform(1e-4, 1.0),
    beta_1=st.one_of(st.sampled_from([0.0, 0.9]), st.floats(0.0, 0.999)),
    beta_2=st.one_of(st.sampled_from([0.0, 0.999]), st.floats(0.0, 0.9999)),
    epsilon=log_uniform(1e-12, 1e-3),
    weight_decay=st.one_of(st.none(), st.floats(0.0, 0.1)),
    radius=st.floats(0.05, 3.0),
    t=st.integers(1, 500),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_one_step_matches_reference(
        shapes, data, learning_rate, beta_1, beta_2, epsilon, weight_decay,
        radius, t, seed):
    scales = [data.draw(log_uniform(1e-4, 1e4)) for _ in shapes]
    corruptions = [data.draw(corruption_strategy) for _ in shapes]
    arrays = make_arrays(shapes, scales, seed)
    lr32 = float(np.float32(learning_rate))
    wd32 = None if weight_decay is None else float(np.float32(weight_decay))
    hyper = dict(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    variables = [keras.Variable(a["theta"]) for a in arrays]
    optimizer = SOAA(learning_rate=learning_rate, weight_decay=weight_decay,
                     total_steps=10, **hyper)
    optimizer.build(variables)
    for i, a in enumerate(arrays):
        optimizer._momentums[i].assign(a["m"])
        optimizer._velocities[i].assign(a["v"])
    optimizer.radius.assign(radius)
    optimizer.predicted_reduction.assign(0.25)
    optimizer.iterations.assign(t - 1)
    reference = ReferenceSOAA([a["theta"] for a in arrays],
                              learning_rate=lr32, weight_decay=wd32, **hyper)
    sync_reference(reference, optimizer, variables)
    grads = random_gradients(shapes, scales, corruptions,
                             np.random.default_rng(seed + 1))
    before = snapshot(optimizer, variables)
    optimizer.apply(tensors(grads), variables)
    reference.step(grads)
    assert_step_matches(optimizer, variables, reference, before, grads)


@PROPERTY_SETTINGS
@given(
    radius=st.floats(0.05, 3.0),
    average=st.floats(-1e3, 1e3),
    count=st.integers(0, 200),
    predicted=st.floats(-10.0, 10.0),
    previous=st.one_of(st.floats(-1.0, 10.0), log_uniform(1e-12, 1e-3)),
    t=st.integers(0, 400),
    total_steps=st.integers(1, 300),
    radius_bound=st.floats(1e-3, 0.999),
    beta_1=st.one_of(st.just(0.0), st.floats(0.0, 0.999)),
    epsilon=log_uniform(1e-12, 1e-2),
    loss=st.one_of(st.floats(-1e3, 1e3, width=32),
                   st.sampled_from([NAN, INF, -INF])),
)
def test_property_one_observation_matches_reference(
        radius, average, count, predicted, previous, t, total_steps,
        radius_bound, beta_1, epsilon, loss):
    theta = keras.Variable([1.0])
    hyper = dict(total_steps=total_steps, radius_bound=radius_bound,
                 beta_1=beta_1, epsilon=epsilon)
    optimizer = SOAA(**hyper)
    optimizer.build([theta])
    for variable, value in zip(
            [optimizer.radius, optimizer.loss_average, optimizer.loss_count,
             optimizer.predicted_reduction,
             optimizer.previous_predicted_reduction],
            [radius, average, count, predicted, previous]):
        variable.assign(value)
    optimizer.iterations.assign(t)
    reference = ReferenceSOAA([[1.0]], **hyper)
    sync_reference(reference, optimizer, [theta])
    before = scalars_of(optimizer)
    optimizer.observe_loss(loss)
    reference.observe(loss)
    assert np.all(np.isfinite(scalars_of(optimizer)))
    assert_observation_matches(optimizer, reference, before, loss)


@PROPERTY_SETTINGS
@given(
    shapes=shapes_strategy,
    data=st.data(),
    learning_rate=log_uniform(1e-3, 0.3),
    beta_1=st.floats(0.0, 0.99),
    beta_2=st.floats(0.0, 0.999),
    epsilon=log_uniform(1e-10, 1e-4),
    radius_bound=st.floats(0.01, 0.9),
    total_steps=st.integers(1, 8),
    initial_radius=st.floats(0.1, 3.0),
    weight_decay=st.one_of(st.none(), st.floats(0.0, 0.1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_streams_keep_every_invariant(
        shapes, data, learning_rate, beta_1, beta_2, epsilon, radius_bound,
        total_steps, initial_radius, weight_decay, seed):
    """A stream of steps (some with non-finite gradients) and observations
    (some of non-finite losses): every step and observation matches the
    reference from the same state, skipped variables are kept bit for bit,
    the state stays finite and the radius within its bounds."""
    scales = [data.draw(log_uniform(1e-3, 1e3)) for _ in shapes]
    steps = data.draw(st.integers(2, 6))
    hyper = dict(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                 radius_bound=radius_bound, total_steps=total_steps,
                 initial_radius=initial_radius)
    arrays = make_arrays(shapes, scales, seed)
    variables = [keras.Variable(a["theta"]) for a in arrays]
    optimizer = SOAA(learning_rate=learning_rate, weight_decay=weight_decay,
                     **hyper)
    reference = ReferenceSOAA(
        [a["theta"] for a in arrays],
        learning_rate=float(np.float32(learning_rate)),
        weight_decay=(None if weight_decay is None
                      else float(np.float32(weight_decay))), **hyper)
    optimizer.build(variables)
    rng = np.random.default_rng(seed + 1)
    finite_losses = 0
    for _ in range(steps):
        corruptions = [data.draw(corruption_strategy) for _ in shapes]
        grads = random_gradients(shapes, scales, corruptions, rng)
        sync_reference(reference, optimizer, variables)
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads), variables)
        reference.step(grads)
        assert_step_matches(optimizer, variables, reference, before, grads)
        kind = data.draw(st.sampled_from(
            [None, "ratio", "ratio", "ratio", NAN, INF, -INF]))
        if kind is None:
            continue
        sync_reference(reference, optimizer, variables)
        if kind != "ratio":
            loss = kind
        elif reference.loss_count == 0 or beta_1 < 1e-3:
            loss = float(np.float32(data.draw(st.floats(-10.0, 10.0))))
        else:
            rho = data.draw(st.floats(-3.0, 3.0))
            loss = float(np.float32(reference.loss_for_ratio(rho)))
        finite_losses += math.isfinite(loss)
        before_scalars = scalars_of(optimizer)
        optimizer.observe_loss(loss)
        reference.observe(loss)
        assert_observation_matches(optimizer, reference, before_scalars, loss)
    assert int(to_numpy(optimizer.iterations)) == steps
    assert scalars_of(optimizer)[2] == finite_losses
    assert_all_finite(optimizer, variables)

