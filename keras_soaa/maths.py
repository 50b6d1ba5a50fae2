"""SOAA's arithmetic: pure `keras.ops` functions, one per quantity of docs/algorithm.md.

The leaf of the package: it imports nothing from `keras_soaa`. `SOAA.update_step`
and the backend fast paths compute a step through it, in this order:

```
scalars   = step_scalars(...)                     # eta, 1 - beta^t, d
new_m, new_v = moments(m, v, g, beta_1, beta_2)
sums      = curvature_sums(new_m, new_v)           # sum(m^2), sum(v)
c, sum_v_hat_eps = curvature_scale(sums, n, scalars, epsilon)
q         = step_direction(new_m, new_v, c, scalars, epsilon)
theta     = new_weight(theta, q, scalars, weight_decay, dtype)
ok        = is_finite_step(c, sum_v_hat_eps, scalars)
totals    = step_sums(controller.sums, g, m, v, scalars, epsilon, predicted)
```

where `predicted(kind)` gives `prediction(kind, g, new_m, new_v, q, scalars)`,
only for a controller that reads it. With `beta_1 <=
beta_2`, `ok = moments_are_finite(new_v, scalars)` right after `moments` is the
same decision, known before the sums.

The bias corrections are folded into scalars (`m_hat`, `v_hat`, `u` are never
arrays): with `a = d / (1 - beta_1^t)`, the step is `u = a * q`. Functions take
one variable's arrays, or, where they only combine per-variable scalars
(`curvature_scale`, `predicted_reduction`, `is_finite_step`), vectors of them,
as the fused paths call them for many variables at once.
"""

from typing import NamedTuple

import keras
from keras import ops

# The operand of a controller's `Sum` that is the step's predicted reduction.
PREDICTED_REDUCTION = "predicted_reduction"
# ... and the one that is its predicted reduction on the batch it was computed
# from (that batch's gradient in place of the momentum).
BATCH_PREDICTED_REDUCTION = "batch_predicted_reduction"
PREDICTIONS = (PREDICTED_REDUCTION, BATCH_PREDICTED_REDUCTION)

# `S` of the overflow guard: a power of two, so scaling by it is exact where
# the result is normal; `S**2` is normal in float32.
OVERFLOW_SCALE = 2.0**-32

# Largest finite 16-bit floats (updated in float32, rounded once at the end).
LARGEST_FINITE = {"float16": 65504.0, "bfloat16": 3.3895313892515355e38}


class StepScalars(NamedTuple):
    """The scalars of one step, in the compute dtype of its variables."""

    learning_rate: object
    beta_1_correction: object  # 1 - beta_1^t
    beta_2_correction: object  # 1 - beta_2^t
    radius: object  # d
    previous_beta_2_correction: object  # 1 - beta_2^(t-1); 1 at t = 1


class CurvatureSums(NamedTuple):
    """`sum(new_m**2) * scale` and `sum(new_v) * scale` of one variable.

    `scale` is `OVERFLOW_SCALE**2` (`curvature_sums`).
    """

    sum_m_sq: object
    sum_v: object
    scale: object


def bias_correction(beta: float, step):
    """Returns `1 - beta**step` in the dtype of `step`, accurate in float32.

    From the Python float `1 - beta`, not `beta` rounded to float32
    (docs/algorithm.md, "Numerical details").
    """
    one_minus_beta = ops.convert_to_tensor(1.0 - beta, dtype=step.dtype)
    return -ops.expm1(step * ops.log1p(-one_minus_beta))


def step_scalars(learning_rate, iterations, radius, beta_1, beta_2, dtype):
    """Returns the `StepScalars` of step `t = iterations + 1` in `dtype`."""
    previous_step = ops.cast(iterations, dtype)
    step = previous_step + 1
    return StepScalars(
        learning_rate=ops.cast(learning_rate, dtype),
        beta_1_correction=bias_correction(beta_1, step),
        beta_2_correction=bias_correction(beta_2, step),
        radius=ops.cast(radius, dtype),
        # At t = 1, v = 0 and any nonzero value gives q_prev = 0.
        previous_beta_2_correction=ops.where(
            previous_step > 0, bias_correction(beta_2, previous_step), 1.0),
    )


def moments(m, v, gradient, beta_1: float, beta_2: float):
    """Returns Adam's new moments `(new_m, new_v)` (not bias-corrected)."""
    new_m = ops.add(m, ops.multiply(ops.subtract(gradient, m), 1 - beta_1))
    new_v = ops.add(v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - beta_2))
    return new_m, new_v


def curvature_sums(new_m, new_v) -> CurvatureSums:
    """Returns `sum(new_m**2)` and `sum(new_v)`, both scaled by `S**2`.

    docs/algorithm.md, "Overflow guard". `S = OVERFLOW_SCALE`, a power of
    two: the terms `(new_m * S)**2` and `new_v * S**2` are the plain ones
    scaled exactly (where they stay normal), so `c` is the plain sums' ratio
    to the last bit, with no branch and no extra pass; and every term of the
    `v` sum is below 2e19, so, with `beta_1 <= beta_2` (`m**2 <= v * (1 -
    beta_1) / (1 - beta_2)`), neither sum overflows while `new_v` is finite.
    """
    return CurvatureSums(
        ops.sum(ops.square(ops.multiply(new_m, OVERFLOW_SCALE))),
        ops.sum(ops.multiply(new_v, OVERFLOW_SCALE**2)),
        ops.full((), OVERFLOW_SCALE**2, new_v.dtype),
    )


def curvature_scale(sums: CurvatureSums, size, scalars: StepScalars, epsilon):
    """Returns `(c, sum(v_hat + epsilon) * scale)`.

    `c = 1 + sum(m_hat**2) / sum(v_hat + epsilon)`, from the sums of the new
    moments with the bias corrections applied to the sums.
    """
    sum_v_hat_eps = ops.add(ops.divide(sums.sum_v, scalars.beta_2_correction),
                            ops.multiply(ops.multiply(size, epsilon), sums.scale))
    c = 1 + ops.divide(
        ops.divide(sums.sum_m_sq, ops.square(scalars.beta_1_correction)), sum_v_hat_eps)
    return c, sum_v_hat_eps


def step_direction(new_m, new_v, curvature_scale, scalars: StepScalars, epsilon):
    """Returns `q = new_m / (r + epsilon)`, `r = max(d * c * v_hat, sqrt(v_hat))`.

    The maximum is a `where`: Keras 3.15's torch `maximum` computes float64 in
    float32. A NaN in `d * F` propagates.
    """
    b2c = scalars.beta_2_correction
    sqrt_v_hat = ops.multiply(ops.sqrt(new_v), ops.rsqrt(b2c))
    scaled_fisher = ops.multiply(new_v, scalars.radius * curvature_scale / b2c)
    denominator = ops.where(ops.greater_equal(sqrt_v_hat, scaled_fisher),
                            sqrt_v_hat, scaled_fisher)
    return ops.divide(new_m, ops.add(denominator, epsilon))


def new_weight(theta, direction, scalars: StepScalars, weight_decay, dtype):
    """Returns `theta - eta * weight_decay * theta - eta * u` in `dtype`.

    `weight_decay` is `None` for a variable that is not decayed. A 16-bit
    weight saturates instead of rounding to inf (spec, "Non-finite steps").
    """
    lr = scalars.learning_rate
    if weight_decay is not None:
        theta = ops.subtract(theta, theta * ops.cast(weight_decay, theta.dtype) * lr)
    step_scale = scalars.radius / scalars.beta_1_correction  # a
    new_theta = ops.subtract(theta, ops.multiply(direction, lr * step_scale))
    largest = LARGEST_FINITE.get(keras.backend.standardize_dtype(dtype))
    if largest is not None:
        new_theta = ops.clip(new_theta, -largest, largest)
    return ops.cast(new_theta, dtype)


def predicted_reduction_sums(new_m, new_v, direction):
    """Returns `(sum(new_m * q), sum(new_v * q * q))` of one variable.

    With the gradient `g` in place of `new_m`: `batch_predicted_reduction`'s.

    `new_v * q` first: `q**2` underflows float32 when `v` is huge
    (docs/algorithm.md, "Numerical details").
    """
    return (ops.sum(ops.multiply(new_m, direction)),
            ops.sum(ops.multiply(ops.multiply(new_v, direction), direction)))


def predicted_reduction(alignment, curvature, scalars: StepScalars):
    """Returns `eta * sum(m_hat * u - v_hat * u**2 / 2)` as float32.

    `a / b1c * alignment - a**2 / (2 * b2c) * curvature`, from
    `predicted_reduction_sums`; the second term is at most half the first's, so
    no digits are lost (docs/algorithm.md, "Numerical details").
    """
    step_scale = scalars.radius / scalars.beta_1_correction  # a
    return ops.cast(ops.multiply(scalars.learning_rate, ops.subtract(
        ops.multiply(alignment, step_scale / scalars.beta_1_correction),
        ops.multiply(curvature,
                     ops.square(step_scale) / (2.0 * scalars.beta_2_correction)),
    )), "float32")


def batch_predicted_reduction(gradient_alignment, curvature, scalars: StepScalars):
    """Returns `eta * sum(g * u - v_hat * u**2 / 2)` as float32.

    The reduction the step's quadratic model predicts on the batch whose
    gradient `g` it was computed from (docs/algorithm.md, "Controllers"),
    from `predicted_reduction_sums(g, new_v, q)`: `predicted_reduction` with
    `g`, which is not bias-corrected, in place of `m_hat`.
    """
    return predicted_reduction(
        ops.multiply(gradient_alignment, scalars.beta_1_correction), curvature,
        scalars)


# Each prediction from its `predicted_reduction_sums` (and the step's scalars).
FROM_SUMS = {PREDICTED_REDUCTION: predicted_reduction,
             BATCH_PREDICTED_REDUCTION: batch_predicted_reduction}


def prediction(kind, gradient, new_m, new_v, direction, scalars: StepScalars):
    """One variable's `PREDICTED_REDUCTION` or `BATCH_PREDICTED_REDUCTION`."""
    aligned = new_m if kind == PREDICTED_REDUCTION else gradient
    return FROM_SUMS[kind](
        *predicted_reduction_sums(aligned, new_v, direction), scalars)


def is_finite_step(curvature_scale, sum_v_hat_eps, scalars: StepScalars):
    """The spec's skip rule: True where a variable's step is applied.

    The sums `c` needs are finite exactly when `g` holds no NaN or inf and
    `g**2` did not overflow; with them and a finite learning rate the step is
    bounded, so nothing else decides whether `m`, `v` and `theta` are written.
    """
    return ops.logical_and(
        ops.logical_and(ops.isfinite(curvature_scale), ops.isfinite(sum_v_hat_eps)),
        ops.isfinite(scalars.learning_rate))


def moments_are_finite(new_v, scalars: StepScalars):
    """`is_finite_step` decided from `new_v` alone, where `beta_1 <= beta_2`.

    True where every `new_v` and the learning rate are finite: a bad `g`
    makes some `new_v` non-finite; with every `new_v` finite the sums are,
    and `beta_1 <= beta_2` bounds `c <= 1 + 1 / ((1 - beta_1) * (1 - beta_2))`.
    """
    return ops.logical_and(ops.all(ops.isfinite(new_v)),
                           ops.isfinite(scalars.learning_rate))


def previous_direction(m, v, scalars: StepScalars, epsilon):
    """Returns `q_prev = m / (sqrt(v / (1 - beta_2^(t-1))) + epsilon)`.

    From the moments before this step: the previous Adam direction times
    `1 - beta_1^(t-1)` > 0, which cancels from the hypergradient's cosine.
    Zero at `t = 1`.
    """
    scale = ops.rsqrt(scalars.previous_beta_2_correction)
    return ops.divide(m, ops.add(ops.multiply(ops.sqrt(v), scale), epsilon))


def step_sums(sums, gradient, m, v, scalars: StepScalars, epsilon, predicted):
    """One variable's values of a controller's `sums`, each `(name, left, right)`.

    `sum(left * right)` from `g` and the moments before the step, or
    `predicted(kind)` for a kind of `PREDICTIONS`. Only what `sums` reads is
    computed.
    """
    operands = {"gradient": gradient, "momentum": m, "velocity": v}
    if any("previous_direction" in s[1:] for s in sums):
        operands["previous_direction"] = previous_direction(m, v, scalars, epsilon)
    return tuple(
        predicted(s[1]) if s[1] in PREDICTIONS
        else ops.sum(ops.multiply(operands[s[1]], operands[s[2]])) for s in sums)


def finite_or_zero(value, is_finite):
    """`value` where `is_finite` and it is finite, else 0 (for `p_cur`)."""
    return ops.where(ops.logical_and(is_finite, ops.isfinite(value)), value, 0.0)
