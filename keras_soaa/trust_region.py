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

from keras_soaa import maths
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


def observe_for_logs(state: TrustRegionState, loss, beta_1: float):
    """Returns the state after `loss` for a controller that ignores losses.

    The gradient-driven controllers average and count losses for the logs
    and roll the predicted reductions over as `observe` does; the radius
    stays.
    """
    _, _, average, count = _average_loss(state, loss, beta_1)
    return TrustRegionState(
        radius=state.radius,
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

    # The per-step sums it adds up over the variables, and the running
    # averages it keeps between steps (none).
    sums_type = HypergradientSums
    averages_type = None

    def __call__(self, state: TrustRegionState, loss, iterations):
        """Returns the state after observing `loss` (radius unchanged)."""
        return observe_for_logs(state, loss, self.beta_1)

    def step_sums(self, gradient, m, v, scalars, epsilon):
        """One variable's `HypergradientSums` (from the old moments)."""
        return maths.hypergradient_sums(
            gradient, maths.previous_step_quotient(m, v, scalars, epsilon)
        )

    def adapt(self, radius, averages, sums: HypergradientSums, iterations):
        """Returns `(radius, averages)` after one step (`hypergradient_radius`)."""
        del iterations  # the cosine needs no bias correction
        return hypergradient_radius(
            radius, sums, radius_learning_rate=self.radius_learning_rate,
            min_radius=self.min_radius, max_radius=self.max_radius,
        ), averages


class RatioSums(NamedTuple):
    """Sums over the variables of one step (`maths.ratio_sums`)."""

    alignment: object  # sum(g * q_prev)
    momentum_alignment: object  # sum(m_prev * q_prev)


class RatioAverages(NamedTuple):
    """The gradient-ratio controller's running averages (EMAs, `RATIO_DECAY`)."""

    actual: object  # of sum(g * u_prev), u_prev the Adam direction
    predicted: object  # of sum(m_hat_prev * u_prev)


# The gradient-ratio controller's constants (issue 17; README "Trust-region
# controllers"): the decay of its averages and its thresholds on rho, set
# from rho's distribution at Adam's tuned rate with d = 1 (median 0.27, 90%
# between 0.1 and 0.5 on digits, the quadratic and breast cancer).
RATIO_DECAY = 0.9
SHRINK_BELOW = 0.1
GROW_ABOVE = 0.5


def gradient_ratio(averages: RatioAverages, sums: RatioSums, iterations,
                   beta_1: float):
    """Returns `(rho, averages)`: the smoothed gradient ratio after one step.

    With `u_prev = m_hat_prev / (sqrt(v_hat_prev) + epsilon)` the previous
    step's Adam direction, that step reduced the loss by about `1/2
    (m_hat_prev + g) . u_prev` (times `eta * d`; the trapezoid rule, with
    the gradient before the step estimated by `m_hat_prev`), and was
    predicted to reduce it by `m_hat_prev . u_prev` (the model's linear
    term; its Fisher term is `eta * d * sqrt(v_hat) / 2` of it): `rho = 1/2
    (1 + g . u_prev / m_hat_prev . u_prev)`. Both dot products are averaged
    over steps (`RATIO_DECAY`) before their ratio is taken, so minibatch
    noise averages out. The sums come with `q_prev = (1 - beta_1^(t-1))
    u_prev` and `m_prev = (1 - beta_1^(t-1)) m_hat_prev`, corrected here. A
    step with a non-finite sum or no prediction (the first) leaves the
    averages as they were.
    """
    correction = bias_correction(beta_1, ops.cast(iterations, "float32"))
    safe = ops.where(correction > 0.0, correction, 1.0)
    actual = sums.alignment / safe
    predicted = sums.momentum_alignment / ops.square(safe)
    valid = ops.logical_and(
        ops.logical_and(ops.isfinite(actual), ops.isfinite(predicted)),
        predicted > 0.0,
    )
    decay = RATIO_DECAY
    averages = RatioAverages(
        actual=ops.where(valid, decay * averages.actual + (1 - decay) * actual,
                         averages.actual),
        predicted=ops.where(
            valid, decay * averages.predicted + (1 - decay) * predicted,
            averages.predicted,
        ),
    )
    has_prediction = averages.predicted > 0.0
    ratio = ops.divide(
        averages.actual, ops.where(has_prediction, averages.predicted, 1.0)
    )
    # Before any prediction: between the thresholds, the radius holds.
    rho = ops.where(has_prediction, 0.5 * (1.0 + ratio),
                    0.5 * (SHRINK_BELOW + GROW_ABOVE))
    return rho, averages


class GradientRatioController(NamedTuple):
    """A trust region judged by the gradients: actual over predicted reduction.

    After every step, `gradient_ratio` compares the reduction the previous
    step achieved (read from this step's gradient) with the one it
    predicted, averaged over steps; the radius then moves as in a classic
    trust region: `log d -= radius_learning_rate` when `rho < SHRINK_BELOW`,
    `+= radius_learning_rate` when `rho > GROW_ABOVE`, clipped to
    `[min_radius, max_radius]`. No loss and no callback needed; observed
    losses only feed the logs, as with `HypergradientController`.
    """

    radius_learning_rate: float
    min_radius: float
    max_radius: float
    beta_1: float

    sums_type = RatioSums
    averages_type = RatioAverages

    def __call__(self, state: TrustRegionState, loss, iterations):
        """Returns the state after observing `loss` (radius unchanged)."""
        return observe_for_logs(state, loss, self.beta_1)

    def step_sums(self, gradient, m, v, scalars, epsilon):
        """One variable's `RatioSums` (from the old moments)."""
        return maths.ratio_sums(
            gradient, m, maths.previous_step_quotient(m, v, scalars, epsilon)
        )

    def adapt(self, radius, averages: RatioAverages, sums: RatioSums, iterations):
        """Returns `(radius, averages)` after one step.

        `iterations` is the step count before this step (`t - 1`).
        """
        rho, averages = gradient_ratio(averages, sums, iterations, self.beta_1)
        step = ops.where(
            rho > GROW_ABOVE, self.radius_learning_rate,
            ops.where(rho < SHRINK_BELOW, -self.radius_learning_rate, 0.0),
        )
        log_radius = ops.clip(ops.log(radius) + step, math.log(self.min_radius),
                              math.log(self.max_radius))
        return ops.exp(log_radius), averages
