# ruff: noqa: D205, D209
"""The same-batch trust-region test, predicted from the batch's own gradient.

A research candidate. The same-batch controller (`keras_soaa.controllers.
same_batch`) compares the reduction a step made on its batch, `before -
after`, with the step's prediction `eta * sum(m_hat * u - v_hat * u**2 / 2)`,
which holds the momentum `m_hat`. On that batch the step's first-order
reduction is `eta * sum(g * u)` instead: with noisy gradients `g . u` is far
larger than `m_hat . u`, so the ratio sits above the growth threshold and the
radius climbs. Here the prediction is the one of the batch's own quadratic
model,

```
p_B = eta * sum(g * u - v_hat * u**2 / 2)
    = eta * (a * sum(g * q) - a**2 / (2 * (1 - beta_2**t)) * sum(new_v * q**2))
```

(`u = a * q`, `a = d / (1 - beta_1**t)`, docs/algorithm.md), so the ratio
measures only how far the diagonal Fisher is from the batch's curvature along
the step. It costs one more reduction, `sum(g * q)`, per variable per step.

`BatchPredictionSOAA` is SOAA's portable step with that prediction in place
of `PREDICTED_REDUCTION` (always `fused=False`); `install()` adds the rows
`soaa_sbg` and `soaa_sbg_cosine` (the same-batch controller's constants, fixed
before any run) to the benchmark's table; `candidates.py` runs them.
"""

import os
import sys

import keras
from keras import ops

import keras_soaa
from keras_soaa import maths
from keras_soaa.controllers import SameBatchController

HERE = os.path.dirname(os.path.abspath(__file__))


def batch_predicted_reduction(gradient, new_v, direction, scalars):
    """`p_B = eta * sum(g * u - v_hat * u**2 / 2)` of one variable (float32)."""
    gradient_alignment, curvature = maths.predicted_reduction_sums(
        gradient, new_v, direction)
    # `maths.predicted_reduction` divides its first sum by 1 - beta_1**t once
    # more, for `m_hat`; `g` is not bias-corrected.
    return maths.predicted_reduction(
        ops.multiply(gradient_alignment, scalars.beta_1_correction), curvature,
        scalars)


@keras.saving.register_keras_serializable(package="keras_soaa_research")
class BatchPredictionSOAA(keras_soaa.SOAA):
    """SOAA whose predicted reduction is the batch's own, `p_B` (module docstring).

    Args:
        fused: only `None` or `False`: the step is always the portable one.
        **kwargs: SOAA's arguments.
    """

    def __init__(self, fused=False, **kwargs):
        if fused not in (None, False):
            raise ValueError("BatchPredictionSOAA has no fused path: `fused` must "
                             f"be None or False. Received: fused={fused!r}")
        super().__init__(fused=False, **kwargs)

    def update_step(self, gradient, variable, learning_rate):
        """SOAA's step (`SOAA.update_step`), predicting with `p_B`."""
        if 0 in tuple(variable.shape):
            return
        m_variable, v_variable = self._moments_of(variable)
        dtype = m_variable.dtype
        scalars = maths.step_scalars(learning_rate, self.iterations, self.radius,
                                     self.beta_1, self.beta_2, dtype)
        gradient = ops.cast(gradient, dtype)
        m, v, old_theta = map(ops.convert_to_tensor, (m_variable, v_variable, variable))
        new_m, new_v = maths.moments(m, v, gradient, self.beta_1, self.beta_2)
        sums = maths.curvature_sums(new_m, new_v)
        size = ops.cast(ops.size(new_v), dtype)
        c, sum_v_hat_eps = maths.curvature_scale(sums, size, scalars, self.epsilon)
        direction = maths.step_direction(new_m, new_v, c, scalars, self.epsilon)
        new_theta = maths.new_weight(ops.cast(old_theta, dtype), direction, scalars,
                                     self._weight_decay_of(variable), variable.dtype)
        is_finite = maths.is_finite_step(c, sum_v_hat_eps, scalars)
        totals = maths.step_sums(
            self.controller.sums, gradient, m, v, scalars, self.epsilon,
            lambda: batch_predicted_reduction(gradient, new_v, direction, scalars))
        for total, value in zip(self._sums, totals):
            self.assign_add(total, maths.finite_or_zero(
                ops.cast(value, "float32"), is_finite))
        self.assign(m_variable, ops.where(is_finite, new_m, m))
        self.assign(v_variable, ops.where(is_finite, new_v, v))
        self.assign(variable, ops.where(is_finite, new_theta, old_theta))


LABELS = {"soaa_sbg": "SOAA same-batch (batch prediction)",
          "soaa_sbg_cosine": "SOAA same-batch (batch prediction) + cosine"}


def install():
    """Adds `soaa_sbg` and `soaa_sbg_cosine` to the benchmark's
    `optimizers.OPTIMIZERS` (call it before `compare.main`)."""
    if os.path.join(HERE, "..", "benchmarks") not in sys.path:
        sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    import optimizers

    for name, color, schedule in (("soaa_sbg", "darkgreen", False),
                                  ("soaa_sbg_cosine", "olive", True)):
        optimizers.OPTIMIZERS[name] = optimizers.Optimizer(
            name, LABELS[name], color,
            lambda lr, steps, model, schedule=schedule: BatchPredictionSOAA(
                learning_rate=optimizers.cosine(lr, steps) if schedule else lr,
                controller=SameBatchController()),
            schedule=schedule, radius_bounds=optimizers.constant_bounds("same_batch"))
