"""A trust region judged by the gradients: actual over predicted reduction."""

from keras import ops

from keras_soaa import validation
from keras_soaa.controllers.base import (
    Context,
    LogRadiusController,
    Sum,
    masked_average,
)
from keras_soaa.controllers.registry import register
from keras_soaa.maths import bias_correction


@register("gradient_ratio")
class GradientRatioController(LogRadiusController):
    """`d` moves as in a classic trust region, the ratio read from gradients.

    The previous step's actual reduction, as this step's gradient sees it
    (trapezoid rule), is compared with its predicted one; both are averaged
    over steps before the ratio is taken (`b = 1 - beta_1**(t-1)`; `q_prev /
    b` is the previous Adam direction, `m_prev / b` the previous `m_hat`):

    ```
    A   = decay * A + (1 - decay) * sum(g * q_prev) / b
    P   = decay * P + (1 - decay) * sum(m_prev * q_prev) / b**2
    rho = (1 + A / P) / 2
    log d = clip(log d + kappa * ([rho > grow_above] - [rho < shrink_below]),
                 log(min_radius), log(max_radius))
    ```

    with `kappa = learning_rate` (docs/algorithm.md, "Controllers"). A step
    with a non-finite sum or no prediction (the first) leaves the averages
    as they were. `d` does not
    decay by itself: use it with a decaying learning-rate schedule. Needs no
    loss and no callback.

    Args:
        learning_rate: Float >= 0: `kappa`. Defaults to `0.05`.
        min_radius: Float > 0: the lower bound of `d`. Defaults to `0.1`.
        max_radius: Float >= `min_radius`: its upper bound. Defaults to `10.0`.
        decay: the averages' decay. Defaults to `0.9`.
        shrink_below: `d` shrinks where `rho` is below it. Defaults to `0.1`.
        grow_above: `d` grows where `rho` is above it. Defaults to `0.5`.
    """

    sums = (
        Sum("alignment", "gradient", "previous_direction"),
        Sum("momentum_alignment", "momentum", "previous_direction"),
    )
    state = ("actual_average", "predicted_average")

    def __init__(self, learning_rate=0.05, min_radius=0.1, max_radius=10.0,
                 decay=0.9, shrink_below=0.1, grow_above=0.5):
        super().__init__(learning_rate, min_radius, max_radius)
        self.decay = validation.real(decay, "decay", "in [0, 1)")
        self.shrink_below = validation.real(shrink_below, "shrink_below", "finite")
        self.grow_above = validation.real(grow_above, "grow_above", ">= shrink_below",
                                          low=self.shrink_below)

    def get_config(self):
        """The step and bounds of `log d`, the averages' decay, the thresholds."""
        return {**super().get_config(), "decay": self.decay,
                "shrink_below": self.shrink_below, "grow_above": self.grow_above}

    def update(self, radius, state, sums, context: Context, loss=None):
        """Returns `(radius, state)` after one step (the rule above)."""
        # `b` of the previous step, `t - 1`.
        correction = bias_correction(context.beta_1, context.step - 1.0)
        safe = ops.where(correction > 0.0, correction, 1.0)
        actual = sums.alignment / safe
        predicted = sums.momentum_alignment / ops.square(safe)
        valid = ops.logical_and(
            ops.logical_and(ops.isfinite(actual), ops.isfinite(predicted)),
            predicted > 0.0,
        )
        state = type(state)(
            masked_average(state.actual_average, actual, valid, self.decay),
            masked_average(state.predicted_average, predicted, valid, self.decay),
        )
        has_prediction = state.predicted_average > 0.0
        ratio = ops.divide(
            state.actual_average,
            ops.where(has_prediction, state.predicted_average, 1.0),
        )
        # Before any prediction: between the thresholds, the radius holds.
        rho = ops.where(has_prediction, 0.5 * (1.0 + ratio),
                        0.5 * (self.shrink_below + self.grow_above))
        kappa = self.learning_rate
        step = ops.where(rho > self.grow_above, kappa,
                         ops.where(rho < self.shrink_below, -kappa, 0.0))
        return self.clip(ops.log(radius) + step), state
