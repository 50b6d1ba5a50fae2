"""Checks shared by the robustness tests: nothing is ever lost or corrupted.

`snapshot` copies everything SOAA may change, and the `assert_*` checks
compare two snapshots, or one step or loss observation of SOAA with one of
the float64 NumPy reference of the spec (`soaa_reference.py`) from the same
state, within float32 error bounds. The reference skips a variable whose
gradient is not finite; where float32 cannot hold what the spec computes
(`g**2` beyond 3.4e38), the documented rule is "skip that variable", which
the tests express by handing the reference a NaN gradient for it (`nan_for`).
`make_data` and `make_model` are the small regression of the `fit` tests.
"""

import math

import keras
import numpy as np
from conftest import scalars_of, to_numpy
from keras import ops

NAN, INF = math.nan, math.inf
U32 = 2.0**-24  # float32 unit roundoff
TINY32 = 2.0**-126  # smallest normal float32: subnormals may be flushed to 0
NO_LOSS_WARNING = "no loss is fed to its controller"


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
        m_scale = np.abs(before["m"][i]) + np.abs(g)
        v_scale = before["v"][i] + g**2
        # u's relative error follows v's through r (as in the predicted
        # reduction's bound below): `v + (g**2 - v) * (1 - beta_2)` cancels
        # where g**2 << v at small beta_2, leaving v an error of `tol` times
        # `v_scale`, not times v.
        k = 1 + v_scale / np.maximum(reference.v[i], TINY32)
        theta_scale = (np.abs(before["weights"][i]) * (1 + decay)
                       + lr * np.abs(u) * k)
        for key, expected, scale in (
            ("weights", reference.weights[i], theta_scale),
            ("m", reference.m[i], m_scale),
            ("v", reference.v[i], v_scale),
        ):
            error = np.abs(after[key][i] - expected)
            assert np.all(error <= tol * scale + TINY32), (key, i, error, scale)
        m_hat, v_hat = reference.m[i] / bc1, reference.v[i] / bc2
        # p = lr * sum(m_hat * u - v_hat * u**2 / 2), from SOAA's new m and v,
        # whose errors are up to `tol` times their scales above (not times
        # m and v: `v + (g**2 - v) * (1 - beta_2)` cancels where g**2 << v),
        # and from u, whose relative error follows v's through r (`k`).
        k = 1 + v_scale / np.maximum(reference.v[i], TINY32)
        predicted_scale += tol * lr * np.sum(
            m_scale / bc1 * np.abs(u) + k * (np.abs(m_hat * u) + v_hat * u**2)
            + 0.5 * v_scale / bc2 * u**2
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
