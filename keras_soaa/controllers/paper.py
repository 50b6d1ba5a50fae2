"""The paper's controller: the radius follows observed over predicted loss reduction."""

from keras import ops

from keras_soaa.controllers.base import (
    Controller,
    Settings,
    TrustRegionState,
    average_loss,
    rollover,
)
from keras_soaa.controllers.registry import register
from keras_soaa.maths import bias_correction


def radius_bounds(iterations, total_steps: int, radius_bound: float):
    """Returns `(lower, upper)` bounds of the radius after `iterations` steps.

    The exponent `e = min(t - 1, T) / T` runs from 0 at the first step to 1 at
    step `T + 1` and stays there (the spec's clamp past `T`), so the bounds
    narrow from `[1, 2]` to `[1 - radius_bound, 1 + radius_bound]`.
    """
    t = ops.cast(iterations, "float32")
    exponent = ops.divide(
        ops.minimum(ops.maximum(t - 1.0, 0.0), float(total_steps)),
        float(total_steps),
    )
    lower = ops.power(1.0 - radius_bound, exponent)
    upper = 1.0 + ops.power(radius_bound, exponent)
    return lower, upper


@register("paper")
class PaperController(Controller):
    """The paper's controller: `d` follows observed / predicted loss reduction.

    After every observed loss `loss` (the `k`-th finite one), with `t` the
    step count, `T = total_steps`, `gamma = radius_bound`:

    ```
    loss_average = beta_1 * loss_average + (1 - beta_1) * loss
    rho = (loss_average / (1 - beta_1**k) - loss)
          / max(previous_predicted_reduction, epsilon)
    e   = min(t - 1, T) / T
    d   = min(1 + gamma**e, max((1 - gamma)**e, rho * d))
    ```

    and the reduction predicted since the previous observation becomes the
    one the next is judged against. A non-finite loss is not averaged in
    and sets `d` to its lower bound. Needs the losses
    (`keras_soaa.TrustRegionCallback` or `SOAA.observe_loss`) and
    `total_steps`.
    """

    adapts_from_losses = True
    needs_total_steps = True
    state_layout_version = 1

    def observe(self, state: TrustRegionState, loss, iterations,
                settings: Settings) -> TrustRegionState:
        """Returns the state after observing `loss` (the rule above)."""
        is_finite, safe_loss, average, count = average_loss(
            state, loss, settings.beta_1
        )
        # On the first observation the bias-corrected average *is* the loss;
        # in float32, `average / (1 - beta_1)` misses it by a rounding error
        # that, divided by `epsilon` below, would throw the radius to a
        # random bound.
        corrected_average = ops.where(
            ops.less_equal(count, 1.0),
            safe_loss,
            average / bias_correction(settings.beta_1, ops.maximum(count, 1.0)),
        )
        rho = (corrected_average - safe_loss) / ops.maximum(
            state.previous_predicted_reduction, settings.epsilon
        )
        lower, upper = radius_bounds(
            iterations, settings.total_steps, settings.radius_bound
        )
        radius = ops.where(
            is_finite, ops.minimum(upper, ops.maximum(lower, rho * state.radius)),
            lower,
        )
        return rollover(state, radius, average, count)
