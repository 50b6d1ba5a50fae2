"""Hypergradient descent on `log d`: the radius follows the gradients."""

from keras import ops

from keras_soaa.controllers.base import Context, LogRadiusController, Sum
from keras_soaa.controllers.registry import register


def cosine(sums):
    """`cos(g, q_prev)` from the step's sums; 0 where a norm is 0 or not finite."""
    norms = ops.sqrt(sums.gradient_sq) * ops.sqrt(sums.direction_sq)
    value = ops.divide(sums.alignment, ops.where(norms > 0.0, norms, 1.0))
    return ops.where(ops.isfinite(value), ops.clip(value, -1.0, 1.0), 0.0)


@register("hypergradient")
class HypergradientController(LogRadiusController):
    """`d` grows while the gradient keeps pointing along the last step.

    After every step, with `q_prev` the previous step's Adam direction and
    `kappa = learning_rate` (hypergradient descent, Baydin et al. 2018, on
    `log d`; docs/algorithm.md, "Controllers"):

    ```
    cos   = sum(g * q_prev) / (sqrt(sum(g**2)) * sqrt(sum(q_prev**2)))
    log d = clip(log d + kappa * cos, log(min_radius), log(max_radius))
    ```

    The cosine is 0 when a norm is 0 or a sum is not finite, which leaves
    `d` where it is. Needs no loss and no callback.

    Args:
        learning_rate: Float >= 0: `kappa`. Defaults to `0.05`.
        min_radius: Float > 0: the lower bound of `d`. Defaults to `0.1`.
        max_radius: Float >= `min_radius`: its upper bound. Defaults to `10.0`.
    """

    sums = (
        Sum("alignment", "gradient", "previous_direction"),
        Sum("gradient_sq", "gradient", "gradient"),
        Sum("direction_sq", "previous_direction", "previous_direction"),
    )

    def update(self, radius, state, sums, context: Context, loss=None):
        """Returns `(radius, state)` after one step (the rule above)."""
        return self.clip(ops.log(radius) + self.learning_rate * cosine(sums)), state
