"""The paper's controller: the radius follows observed over predicted loss reduction."""

from keras import ops

from keras_soaa import validation
from keras_soaa.controllers.base import PREDICTED_REDUCTION, Context, Controller, Sum
from keras_soaa.controllers.registry import register
from keras_soaa.maths import bias_correction


def radius_bounds(step, total_steps: int, radius_bound: float):
    """Returns `(lower, upper)` bounds of the radius at step `t = step`.

    The exponent `e = min(t - 1, T) / T` runs from 0 at the first step to 1 at
    step `T + 1` and stays there (the clamp past `T`, docs/algorithm.md), so
    the bounds narrow from `[1, 2]` to `[1 - radius_bound, 1 + radius_bound]`.
    """
    exponent = ops.divide(
        ops.minimum(ops.maximum(step - 1.0, 0.0), float(total_steps)),
        float(total_steps),
    )
    lower = ops.power(1.0 - radius_bound, exponent)
    upper = 1.0 + ops.power(radius_bound, exponent)
    return lower, upper


@register("paper")
class PaperController(Controller):
    """The paper's controller: `d` follows observed / predicted loss reduction.

    After every observed loss `loss` (the `k`-th finite one), at step `t`,
    with `T = total_steps`, `gamma = radius_bound` and `p` the reduction the
    steps since the previous observation predicted (docs/algorithm.md,
    "The paper's controller"):

    ```
    loss_average = beta_1 * loss_average + (1 - beta_1) * loss
    rho = (loss_average / (1 - beta_1**k) - loss)
          / max(previous_predicted_reduction, epsilon)
    e   = min(t - 1, T) / T
    d   = min(1 + gamma**e, max((1 - gamma)**e, rho * d))
    previous_predicted_reduction = p
    ```

    A non-finite loss is not averaged in and sets `d` to its lower bound.
    Needs the losses (`keras_soaa.TrustRegionCallback` in `fit`, or
    `SOAA.observe_loss`) and SOAA's `total_steps`.

    Args:
        radius_bound: Float in `(0, 1)`: the bounds on `d` narrow from
            `[1, 2]` to `[1 - radius_bound, 1 + radius_bound]` over
            `total_steps`. Defaults to `0.1`.
    """

    sums = (Sum("predicted_reduction", PREDICTED_REDUCTION),)
    state = ("loss_average", "loss_count", "previous_predicted_reduction")
    needs_loss = True
    needs_total_steps = True

    def __init__(self, radius_bound=0.1):
        self.radius_bound = validation.real(radius_bound, "radius_bound", "in (0, 1)")

    def get_config(self):
        """`radius_bound`."""
        return {"radius_bound": self.radius_bound}

    def update(self, radius, state, sums, context: Context, loss=None):
        """Returns `(radius, state)` after observing `loss` (the rule above)."""
        is_finite = ops.isfinite(loss)
        safe_loss = ops.where(is_finite, loss, 0.0)
        count = state.loss_count + ops.cast(is_finite, "float32")
        average = ops.where(
            is_finite,
            context.beta_1 * state.loss_average + (1.0 - context.beta_1) * safe_loss,
            state.loss_average,
        )
        # On the first observation the bias-corrected average *is* the loss;
        # in float32, `average / (1 - beta_1)` misses it by a rounding error
        # that, divided by `epsilon` below, would throw the radius to a
        # random bound (docs/algorithm.md, "Numerical details").
        corrected_average = ops.where(
            ops.less_equal(count, 1.0),
            safe_loss,
            average / bias_correction(context.beta_1, ops.maximum(count, 1.0)),
        )
        rho = (corrected_average - safe_loss) / ops.maximum(
            state.previous_predicted_reduction, context.epsilon
        )
        lower, upper = radius_bounds(context.step, context.total_steps,
                                     self.radius_bound)
        radius = ops.where(
            is_finite, ops.minimum(upper, ops.maximum(lower, rho * radius)), lower
        )
        return radius, type(state)(average, count, sums.predicted_reduction)
