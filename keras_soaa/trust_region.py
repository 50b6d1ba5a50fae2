"""The trust-region controller of SOAA: how the radius reacts to an observed loss.

The controller is a pure function of the five scalar state values of the
optimizer and one observed loss, written in `keras.ops` so that it runs on
every backend, eagerly or inside a compiled function. `PaperController`
binds it to the optimizer's hyperparameters: the optimizer hands it out
(`SOAA.controller()`) to whoever feeds losses, and it doubles as the key of
their compiled step.
"""

import math
from typing import NamedTuple

from keras import ops

from keras_soaa.maths import bias_correction


class TrustRegionState(NamedTuple):
    """The scalar state of the controller (all float32 scalars)."""

    radius: object
    loss_average: object
    loss_count: object
    predicted_reduction: object
    previous_predicted_reduction: object


# The names of the optimizer's scalar variables, in the order they are
# created and saved: part of the saved state layout.
STATE_NAMES = TrustRegionState._fields


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


def _average_loss(state: TrustRegionState, loss, beta_1: float):
    """Returns `(is_finite, safe_loss, loss_average, loss_count)` after `loss`.

    A non-finite loss leaves the average and the count as they were.
    """
    is_finite = ops.isfinite(loss)
    safe_loss = ops.where(is_finite, loss, 0.0)
    count = state.loss_count + ops.cast(is_finite, "float32")
    average = ops.where(
        is_finite,
        beta_1 * state.loss_average + (1.0 - beta_1) * safe_loss,
        state.loss_average,
    )
    return is_finite, safe_loss, average, count


def observe(
    state: TrustRegionState,
    loss,
    iterations,
    *,
    total_steps: int,
    radius_bound: float,
    beta_1: float,
    epsilon: float,
) -> TrustRegionState:
    """Returns the controller state after observing one training loss.

    Args:
        state: the current `TrustRegionState`.
        loss: a float32 scalar, the training loss of the step(s) applied since
            the previous observation, computed at the weights before them.
        iterations: the optimizer's step count, already incremented by the
            step(s) that `loss` belongs to.
        total_steps: `T`, the step at which the radius bounds stop narrowing.
        radius_bound: `gamma`, the final half-width of the radius bounds.
        beta_1: decay rate of the loss average (the optimizer's `beta_1`).
        epsilon: floor of the predicted reduction in the ratio `rho`.

    A non-finite `loss` is not averaged in: the radius drops to its lower
    bound and the predicted reductions roll over as usual.
    """
    is_finite, safe_loss, average, count = _average_loss(state, loss, beta_1)
    # On the first observation the bias-corrected average *is* the loss; in
    # float32, `average / (1 - beta_1)` misses it by a rounding error that,
    # divided by `epsilon` below, would throw the radius to a random bound.
    is_first = ops.less_equal(count, 1.0)
    corrected_average = ops.where(
        is_first,
        safe_loss,
        average / bias_correction(beta_1, ops.maximum(count, 1.0)),
    )
    rho = (corrected_average - safe_loss) / ops.maximum(
        state.previous_predicted_reduction, epsilon
    )

    lower, upper = radius_bounds(iterations, total_steps, radius_bound)
    adapted_radius = ops.minimum(upper, ops.maximum(lower, rho * state.radius))
    radius = ops.where(is_finite, adapted_radius, lower)

    return TrustRegionState(
        radius=radius,
        loss_average=average,
        loss_count=count,
        predicted_reduction=ops.zeros_like(state.predicted_reduction),
        previous_predicted_reduction=state.predicted_reduction,
    )


class PaperController(NamedTuple):
    """The paper's controller (`observe`) for one set of hyperparameters.

    Hashable and comparable, so a compiled controller step can be cached per
    configuration. Call it as `controller(state, loss, iterations)`.
    """

    total_steps: int
    radius_bound: float
    beta_1: float
    epsilon: float

    def __call__(self, state: TrustRegionState, loss, iterations):
        """Returns the state after observing `loss` (see `observe`)."""
        return observe(state, loss, iterations, **self._asdict())


class HypergradientSums(NamedTuple):
    """Sums over the variables of one step (`maths.hypergradient_sums`)."""

    alignment: object  # sum(g * q_prev)
    gradient_sq: object  # sum(g**2)
    quotient_sq: object  # sum(q_prev**2)


def hypergradient_radius(
    radius, sums: HypergradientSums, *, radius_learning_rate: float,
    min_radius: float, max_radius: float,
):
    """Returns the radius after one step of hypergradient descent on `log d`.

    `log d += radius_learning_rate * cos(g_t, u_{t-1})`, clipped to
    `[log min_radius, log max_radius]`: the radius grows while successive
    steps agree (the loss still falls along the last direction) and shrinks
    when they oppose (it overshot). The cosine is 0 when a norm is 0 or a sum
    is not finite, which leaves the radius where it is.
    """
    norms = ops.sqrt(sums.gradient_sq) * ops.sqrt(sums.quotient_sq)
    cosine = ops.divide(sums.alignment, ops.where(norms > 0.0, norms, 1.0))
    cosine = ops.where(ops.isfinite(cosine), ops.clip(cosine, -1.0, 1.0), 0.0)
    log_radius = ops.log(radius) + radius_learning_rate * cosine
    return ops.exp(
        ops.clip(log_radius, math.log(min_radius), math.log(max_radius))
    )


class HypergradientController(NamedTuple):
    """A radius that follows the gradients, not the losses (no callback needed).

    After every step, `hypergradient_radius` moves `d` by the cosine between
    the step's gradient and the previous step's direction (hypergradient
    descent, Baydin et al. 2018, on `log d`). Observed losses are averaged
    and counted for the logs and roll the predicted reductions over; they do
    not move the radius. Hashable, like `PaperController`.
    """

    radius_learning_rate: float
    min_radius: float
    max_radius: float
    beta_1: float

    def __call__(self, state: TrustRegionState, loss, iterations):
        """Returns the state after observing `loss` (radius unchanged)."""
        _, _, average, count = _average_loss(state, loss, self.beta_1)
        return TrustRegionState(
            radius=state.radius,
            loss_average=average,
            loss_count=count,
            predicted_reduction=ops.zeros_like(state.predicted_reduction),
            previous_predicted_reduction=state.predicted_reduction,
        )

    def adapt(self, radius, sums: HypergradientSums):
        """Returns the radius after one step (see `hypergradient_radius`)."""
        return hypergradient_radius(
            radius, sums, radius_learning_rate=self.radius_learning_rate,
            min_radius=self.min_radius, max_radius=self.max_radius,
        )
