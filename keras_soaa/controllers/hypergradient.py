"""Hypergradient descent on `log d`: the radius follows the gradients."""

from keras import ops

from keras_soaa.controllers.base import (
    Controller,
    Settings,
    Sum,
    clip_log_radius,
    require_initial_radius_within_bounds,
)
from keras_soaa.controllers.registry import register


def cosine(sums):
    """`cos(g, q_prev)` from the step's sums; 0 where a norm is 0 or not finite."""
    norms = ops.sqrt(sums.gradient_sq) * ops.sqrt(sums.direction_sq)
    value = ops.divide(sums.alignment, ops.where(norms > 0.0, norms, 1.0))
    return ops.where(ops.isfinite(value), ops.clip(value, -1.0, 1.0), 0.0)


@register("hypergradient")
class HypergradientController(Controller):
    """`d` grows while the gradient keeps pointing along the last step.

    After every step, with `q_prev` the previous step's Adam direction and
    `kappa = radius_learning_rate` (hypergradient descent, Baydin et al.
    2018, on `log d`):

    ```
    cos   = sum(g * q_prev) / (sqrt(sum(g**2)) * sqrt(sum(q_prev**2)))
    log d = clip(log d + kappa * cos, log(min_radius), log(max_radius))
    ```

    The cosine is 0 when a norm is 0 or a sum is not finite, which leaves
    `d` where it is. Needs no loss and no callback; observed losses only
    feed the logs.
    """

    sums = (
        Sum("alignment", "gradient", "previous_direction"),
        Sum("gradient_sq", "gradient", "gradient"),
        Sum("direction_sq", "previous_direction", "previous_direction"),
    )
    state_layout_version = 2

    def validate(self, settings: Settings):
        """Requires `initial_radius` within `[min_radius, max_radius]`."""
        require_initial_radius_within_bounds(self, settings)

    def adapt(self, radius, state, sums, iterations, settings: Settings):
        """Returns `(radius, state)` after one step (the rule above)."""
        log_radius = ops.log(radius) + settings.radius_learning_rate * cosine(sums)
        return clip_log_radius(log_radius, settings), state
