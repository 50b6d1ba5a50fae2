"""A trust region judged by the gradients: actual over predicted reduction."""

from keras import ops

from keras_soaa.controllers.base import (
    Controller,
    Settings,
    Sum,
    clip_log_radius,
    masked_average,
    require_initial_radius_within_bounds,
)
from keras_soaa.controllers.registry import register
from keras_soaa.maths import bias_correction


@register("gradient_ratio")
class GradientRatioController(Controller):
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

    with `kappa = radius_learning_rate`. A step with a non-finite sum or no
    prediction (the first) leaves the averages as they were. `d` does not
    decay by itself: use it with a decaying learning-rate schedule. Needs no
    loss and no callback.

    Args:
        decay: the averages' decay. Defaults to `0.9`.
        shrink_below: `d` shrinks where `rho` is below it. Defaults to `0.1`.
        grow_above: `d` grows where `rho` is above it. Defaults to `0.5`.
    """

    sums = (
        Sum("alignment", "gradient", "previous_direction"),
        Sum("momentum_alignment", "momentum", "previous_direction"),
    )
    state = ("actual_average", "predicted_average")
    variable_prefix = "ratio"

    def __init__(self, decay=0.9, shrink_below=0.1, grow_above=0.5):
        self.decay = float(decay)
        self.shrink_below = float(shrink_below)
        self.grow_above = float(grow_above)

    def get_config(self):
        """The averages' decay and the two thresholds."""
        return {"decay": self.decay, "shrink_below": self.shrink_below,
                "grow_above": self.grow_above}

    def validate(self, settings: Settings):
        """Requires `initial_radius` within `[min_radius, max_radius]`."""
        require_initial_radius_within_bounds(self, settings)

    def adapt(self, radius, state, sums, iterations, settings: Settings):
        """Returns `(radius, state)` after one step (the rule above).

        `iterations` is the step count before this step (`t - 1`).
        """
        correction = bias_correction(settings.beta_1, ops.cast(iterations, "float32"))
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
        kappa = settings.radius_learning_rate
        step = ops.where(rho > self.grow_above, kappa,
                         ops.where(rho < self.shrink_below, -kappa, 0.0))
        return clip_log_radius(ops.log(radius) + step, settings), state
