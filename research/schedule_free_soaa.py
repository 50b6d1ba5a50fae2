# ruff: noqa: D205, D209
"""SOAA under schedule-free averaging (Defazio et al. 2024): a research candidate.

`ScheduleFreeSOAA` is SOAA's step with no momentum (base `beta_1 = 0`: `m_hat
= g`) as the base optimizer of schedule-free averaging, modelled on Keras'
`ScheduleFreeAdamW` and optax's `schedule_free` wrapper (whose recommended base
optimizer has no momentum). The weights are the interpolated point `y`, where
the gradient is taken; the `momentum` slot holds schedule-free's `z` (a copy of
the weights at `build`); the averaged point `x`, the one to evaluate, is
`averaged_point(variable)`. For a variable at step `t`, with `beta_1` the
interpolation constant (0.9) and `d` the controller's radius:

```
v     = beta_2 * v + (1 - beta_2) * g**2
v_hat = v / (1 - beta_2**t)
c     = 1 + sum(g**2) / sum(v_hat + epsilon)        # sums over this variable
u     = d * g / (maximum(d * c * v_hat, sqrt(v_hat)) + epsilon)
z     = z - lr * weight_decay * z - lr * u           # decay if set, as SOAA's
x_old = (y - (1 - beta_1) * z_old) / beta_1
x     = (1 - w_t) * x_old + w_t * z
y     = (1 - beta_1) * z + beta_1 * x
```

`w_t = t**r / sum(i**r for i <= t)` weighs step `t`'s `z` by `t**r` in the
average (the schedule-free paper's polynomial weighting): `r = 0` (the
default, Keras' `ScheduleFreeAdamW`) is the uniform average `w_t = 1/t`;
`r = 1` gives `2 / (t + 1)`, `r = 2` gives `6 t / ((t + 1)(2 t + 1))`, which
lag less behind a moving minimum.

SOAA's arithmetic (`keras_soaa.maths`, base `beta_1 = 0`) and its skip rule:
a variable whose gradient is not finite keeps `y`, `z` and `v`. Always the
portable step (`fused=False`). `self.beta_1` stays the interpolation constant,
which the paper controller's loss average also reads.

The controller's sums are those SOAA's step with base `beta_1 = 0` computes:
`g`, `v` before the step, and the predicted reduction `lr * sum(g * u - v_hat
* u**2 / 2)` of the base step (the move of `z`), so any controller moves the
base step's radius. SOAA's `momentum` operand is then the previous gradient
(and `previous_direction` the previous Adam direction), which the
schedule-free state does not hold: for a controller that reads either (the
hypergradient, the gradient ratio) one more slot per variable,
`previous_gradient`, keeps it. With the paper controller the variables are
exactly SOAA's. A gradient-driven controller's `Context.beta_1` is the base
step's, 0.

`install()` adds `sf_soaa` (the paper controller), `sf_soaa_hd` (the
hypergradient) and `sf_soaa_r1`, `sf_soaa_r2` (the paper controller, `r = 1`
and `2`) to the benchmark's optimizer table, for one run;
`candidates.py` runs `benchmarks/compare.py` with them:

    python research/candidates.py --full --set calibration \
        --optimizers sf_soaa,sf_soaa_hd,adam --out DIR
"""

import os
import sys

import keras
from keras import ops

import keras_soaa
from keras_soaa import _keras_internals as internals
from keras_soaa import controllers, maths
from keras_soaa.optimizer import _controller_update

HERE = os.path.dirname(os.path.abspath(__file__))
# SOAA's controller-sum operands that, with base `beta_1 = 0`, are built from
# the previous gradient.
PREVIOUS_GRADIENT_OPERANDS = ("momentum", "previous_direction")
# w_t = t**r / sum(i**r for i <= t), in closed form, by r.
AVERAGE_WEIGHTS = {
    0: lambda t: 1.0 / t,
    1: lambda t: 2.0 / (t + 1.0),
    2: lambda t: 6.0 * t / ((t + 1.0) * (2.0 * t + 1.0)),
}


@keras.saving.register_keras_serializable(package="keras_soaa_research")
class ScheduleFreeSOAA(keras_soaa.SOAA):
    """SOAA's momentum-free step under schedule-free averaging (module docstring).

    Args:
        learning_rate: as SOAA's. Defaults to `0.0025` (ScheduleFreeAdamW's).
        beta_1: Float in `(0, 1)`: the interpolation constant of `y` between
            `z` and `x`, and the paper controller's loss-average decay.
            Defaults to `0.9`.
        averaging_power: `0`, `1` or `2`: `r` of the average's weights
            `t**r`. Defaults to `0` (uniform).
        fused: only `None` or `False`: the step is always the portable one.
        **kwargs: SOAA's other arguments.
    """

    def __init__(self, learning_rate=0.0025, beta_1=0.9, fused=False,
                 averaging_power=0, **kwargs):
        if fused not in (None, False):
            raise ValueError("ScheduleFreeSOAA has no fused path: `fused` must be "
                             f"None or False. Received: fused={fused!r}")
        if not 0.0 < float(beta_1) < 1.0:
            raise ValueError("Argument `beta_1` (the interpolation constant) must "
                             f"be in (0, 1). Received: beta_1={beta_1!r}")
        if averaging_power not in AVERAGE_WEIGHTS:
            raise ValueError("Argument `averaging_power` must be 0, 1 or 2. "
                             f"Received: averaging_power={averaging_power!r}")
        super().__init__(learning_rate=learning_rate, beta_1=beta_1, fused=False,
                         **kwargs)
        self.averaging_power = averaging_power

    def get_config(self):
        """SOAA's configuration and `averaging_power`."""
        return {**super().get_config(), "averaging_power": self.averaging_power}

    def _keeps_previous_gradient(self):
        return any(operand in PREVIOUS_GRADIENT_OPERANDS
                   for s in self.controller.sums for operand in s[1:])

    def build(self, var_list):
        """SOAA's variables, `z` (the `momentum` slot) set to the weights; a
        `previous_gradient` slot per variable if the controller reads one."""
        if self.built:
            return
        super().build(var_list)
        for z, variable in zip(self._momentums, var_list):
            if z is not None:
                # A copy: on JAX a shared buffer would be donated twice by `fit`.
                self.assign(z, ops.copy(ops.cast(variable, z.dtype)))
        self._previous_gradients = [None] * len(var_list)
        if self._keeps_previous_gradient():
            self._previous_gradients = [None if z is None else self.add_variable(
                shape=variable.shape, dtype=z.dtype,
                name=z.name.removesuffix("_momentum") + "_previous_gradient",
                layout=internals.variable_layout(variable),
            ) for z, variable in zip(self._momentums, var_list)]

    def averaged_point(self, variable):
        """The averaged point `x = (y - (1 - beta_1) * z) / beta_1` of a
        trained variable `y`, in its `z`'s dtype."""
        z, _ = self._moments_of(variable)
        y = ops.cast(variable, z.dtype)
        return ops.divide(ops.subtract(y, ops.multiply(z, 1.0 - self.beta_1)),
                          self.beta_1)

    def update_step(self, gradient, variable, learning_rate):
        """One schedule-free step of SOAA's momentum-free base step."""
        if 0 in tuple(variable.shape):
            return
        index = internals.variable_index(self, variable)
        z_variable, v_variable = self._momentums[index], self._velocities[index]
        previous_variable = self._previous_gradients[index]
        dtype = z_variable.dtype
        scalars = maths.step_scalars(learning_rate, self.iterations, self.radius,
                                     0.0, self.beta_2, dtype)
        gradient = ops.cast(gradient, dtype)
        z, v = map(ops.convert_to_tensor, (z_variable, v_variable))
        y = ops.cast(ops.convert_to_tensor(variable), dtype)

        # Base beta_1 = 0: new_m = g + (g - g) * 1 = g exactly.
        new_m, new_v = maths.moments(gradient, v, gradient, 0.0, self.beta_2)
        is_finite = maths.moments_are_finite(new_v, scalars)
        new_m, new_v = (ops.where(is_finite, new_m, ops.zeros_like(new_m)),
                        ops.where(is_finite, new_v, v))
        sums = maths.curvature_sums(new_m, new_v)
        size = ops.cast(ops.size(new_v), dtype)
        c, sum_v_hat_eps = maths.curvature_scale(sums, size, scalars, self.epsilon)
        # beta_1 = 0 <= beta_2 bounds c: the same decision as `moments_are_finite`.
        is_finite = ops.logical_and(
            is_finite, maths.is_finite_step(c, sum_v_hat_eps, scalars))
        direction = maths.step_direction(new_m, new_v, c, scalars, self.epsilon)
        new_z = maths.new_weight(z, direction, scalars,
                                 self._weight_decay_of(variable), dtype)

        beta = self.beta_1
        weight = AVERAGE_WEIGHTS[self.averaging_power](
            ops.cast(self.iterations, dtype) + 1.0)  # w_t
        x_old = ops.divide(ops.subtract(y, ops.multiply(z, 1.0 - beta)), beta)
        x_new = ops.add(ops.multiply(x_old, 1.0 - weight), ops.multiply(new_z, weight))
        new_y = ops.add(ops.multiply(new_z, 1.0 - beta), ops.multiply(x_new, beta))
        largest = maths.LARGEST_FINITE.get(keras.backend.standardize_dtype(
            variable.dtype))
        if largest is not None:
            new_y = ops.clip(new_y, -largest, largest)

        totals = maths.step_sums(
            self.controller.sums, gradient,
            None if previous_variable is None else ops.convert_to_tensor(
                previous_variable),
            v, scalars, self.epsilon,
            lambda kind: maths.prediction(kind, gradient, new_m, new_v, direction,
                                          scalars))
        for total, value in zip(self._sums, totals):
            self.assign_add(total, maths.finite_or_zero(
                ops.cast(value, "float32"), is_finite))
        if previous_variable is not None:
            self.assign(previous_variable, ops.where(
                is_finite, gradient, ops.convert_to_tensor(previous_variable)))
        self.assign(v_variable, new_v)
        self.assign(z_variable, ops.where(is_finite, new_z, z))
        self.assign(variable, ops.cast(ops.where(is_finite, new_y, y), variable.dtype))

    def _after_step(self):
        # SOAA's, with the base step's beta_1 (0) in the context: the gradient
        # ratio's bias correction of `m` is then 1, as for SOAA with beta_1 = 0.
        if self.controller.needs_loss:
            return
        context = controllers.Context(
            ops.cast(self.iterations, "float32") + 1.0, self.total_steps, 0.0,
            self.epsilon)
        self._assign_controller_values(_controller_update(
            self.controller, context, self._controller_values()))


LABELS = {"sf_soaa": "schedule-free SOAA", "sf_soaa_hd": "schedule-free SOAA-HD",
          "sf_soaa_r1": "schedule-free SOAA, t-weighted",
          "sf_soaa_r2": "schedule-free SOAA, t²-weighted"}


def install():
    """Adds `sf_soaa`, `sf_soaa_hd` and the weighted averages `sf_soaa_r1`,
    `sf_soaa_r2` to the benchmark's `optimizers.OPTIMIZERS` (call it before
    `compare.main`)."""
    if os.path.join(HERE, "..", "benchmarks") not in sys.path:
        sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    import optimizers

    rows = (
        optimizers.Optimizer(
            "sf_soaa", LABELS["sf_soaa"], "darkmagenta",
            lambda lr, steps, model: ScheduleFreeSOAA(learning_rate=lr),
            radius_bounds=optimizers.paper_bounds),
        optimizers.Optimizer(
            "sf_soaa_hd", LABELS["sf_soaa_hd"], "deeppink",
            lambda lr, steps, model: ScheduleFreeSOAA(
                learning_rate=lr, controller="hypergradient"),
            radius_bounds=optimizers.constant_bounds("hypergradient")),
        *(optimizers.Optimizer(
            f"sf_soaa_r{power}", LABELS[f"sf_soaa_r{power}"], color,
            lambda lr, steps, model, power=power: ScheduleFreeSOAA(
                learning_rate=lr, averaging_power=power),
            radius_bounds=optimizers.paper_bounds)
          for power, color in ((1, "mediumorchid"), (2, "orchid"))),
    )
    for row in rows:
        optimizers.OPTIMIZERS[row.name] = row
