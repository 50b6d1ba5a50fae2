"""The classical trust-region test, on the batch the step was computed from."""

from keras import ops

from keras_soaa import validation
from keras_soaa.controllers.base import (
    BATCH_PREDICTED_REDUCTION,
    Context,
    Controller,
    Sum,
    clip_radius,
    require_within_bounds,
)
from keras_soaa.controllers.registry import register


@register("same_batch")
class SameBatchController(Controller):
    """`d` follows the reduction a step made on its own batch.

    The trust-region test of Nocedal & Wright (Algorithm 4.1), measured on
    one batch: the loss of the batch a step was computed from, at the weights
    before the step and right after it, against the reduction that batch's
    own quadratic model predicted, `p = eta * sum(g * u - v_hat * u**2 / 2)`
    with that batch's gradient `g` (docs/algorithm.md, "Controllers").
    Comparing one batch with itself leaves out the batch-to-batch differences
    that swamp the paper's ratio; predicting with `g` rather than the
    momentum leaves out the step's bias towards its own batch, so `rho`
    measures how well the diagonal Fisher models that batch's curvature
    along the step. After each observed pair `(before, after)`:

    ```
    rho   = (before - after) / p
    d     = d * grow                if rho > grow_above
    d     = d * shrink              if rho < shrink_below (or `after` is not finite)
    d     = clip(d, min_radius, max_radius)
    ```

    `d` is left alone where `before` is not finite or the step predicted no
    reduction on its batch (`p <= 0`: a skipped step, or a step that does
    not descend on that batch). `TrustRegionCallback` measures it in
    `fit` on every `every`-th batch, at the cost of one more forward pass of
    that batch; in a custom loop, call `SOAA.observe_step(before, after)`.

    Args:
        every: Integer >= 1: `TrustRegionCallback` tests every `every`-th
            batch. Defaults to `4`.
        shrink_below: Float: `rho` below it shrinks `d`. Defaults to `0.25`.
        grow_above: Float >= `shrink_below`: `rho` above it grows `d`.
            Defaults to `0.75`.
        shrink: Float in `(0, 1]`: the factor of a shrink. Defaults to `0.5`.
        grow: Float >= 1: the factor of a growth. Defaults to `1.25`.
        min_radius: Float > 0: the lower bound of `d`. Defaults to `0.01`.
        max_radius: Float >= `min_radius`: its upper bound. Defaults to `100.0`.
    """

    sums = (Sum("predicted_reduction", BATCH_PREDICTED_REDUCTION),)
    state = ("step_prediction",)
    needs_loss_pair = True

    def __init__(self, every=4, shrink_below=0.25, grow_above=0.75, shrink=0.5,
                 grow=1.25, min_radius=0.01, max_radius=100.0):
        self.every = validation.positive_int(every, "every")
        self.shrink_below = validation.real(shrink_below, "shrink_below", "finite")
        self.grow_above = validation.real(grow_above, "grow_above", ">= shrink_below",
                                          low=self.shrink_below)
        self.shrink = validation.real(shrink, "shrink", "in (0, 1]")
        self.grow = validation.real(grow, "grow", ">= 1", low=1.0)
        self.min_radius = validation.real(min_radius, "min_radius", "> 0")
        self.max_radius = validation.real(max_radius, "max_radius", ">= min_radius",
                                          low=self.min_radius)

    def get_config(self):
        """Every constructor argument."""
        names = ("every", "shrink_below", "grow_above", "shrink", "grow",
                 "min_radius", "max_radius")
        return {name: getattr(self, name) for name in names}

    def validate(self, initial_radius: float):
        """Requires `min_radius <= initial_radius <= max_radius`."""
        require_within_bounds(self, initial_radius)

    def update(self, radius, state, sums, context: Context, loss=None):
        """After a step, keeps its prediction; after a pair, the rule above."""
        if loss is None:
            return radius, type(state)(sums.predicted_reduction)
        prediction = state.step_prediction
        rho = (loss.before - loss.after) / ops.where(prediction > 0.0, prediction, 1.0)
        factor = ops.where(
            ops.logical_or(rho < self.shrink_below, ops.logical_not(
                ops.isfinite(loss.after))), self.shrink,
            ops.where(rho > self.grow_above, self.grow, 1.0))
        informative = ops.logical_and(ops.isfinite(loss.before), prediction > 0.0)
        moved = clip_radius(self, ops.log(radius * factor))
        return ops.where(informative, moved, radius), state
