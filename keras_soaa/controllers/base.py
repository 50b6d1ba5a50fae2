"""What a trust-region controller is (`Controller`), and the pieces they share.

SOAA creates a controller's variables (zeros) after its own, `sums` then
`state` in declaration order: part of the saved state, so they must not
change between a save and a load.
"""

import functools
import json
import math
from collections import namedtuple
from typing import NamedTuple

from keras import ops

from keras_soaa import maths
from keras_soaa.compile import read_value


class TrustRegionState(NamedTuple):
    """SOAA's five scalars that every controller shares (float32)."""

    radius: object
    loss_average: object
    loss_count: object
    predicted_reduction: object
    previous_predicted_reduction: object


class Settings(NamedTuple):
    """The optimizer's hyperparameters a controller may read (see `SOAA`)."""

    beta_1: float
    epsilon: float
    total_steps: int | None
    radius_bound: float
    initial_radius: float
    radius_learning_rate: float
    min_radius: float
    max_radius: float


# The operands a `Sum` multiplies, for one variable of one step: its
# gradient, its moments before this step's update, and the previous step's
# Adam direction `m / (sqrt(v / (1 - beta_2^(t-1))) + epsilon)` (0 at t = 1).
OPERANDS = ("gradient", "momentum", "velocity", "previous_direction")


class Sum(NamedTuple):
    """One per-step sum a controller reads: `sum(left * right)`, all variables."""

    name: str
    left: str
    right: str


class Controller:
    """Base class of SOAA's trust-region controllers.

    A controller decides how SOAA's radius `d` moves, in pure `keras.ops`
    (every backend, eager or compiled). Subclass it, declare `sums` and
    `state` if the radius follows the gradients, override `adapt` and/or
    `observe`, and decorate it with `keras_soaa.controllers.register(name)`
    (which also registers it for Keras serialization). Its own constants
    are `__init__` arguments returned by `get_config`; the optimizer's
    hyperparameters come as `settings`. The portable step and every fast
    path compute `sums` from the declaration alone.

    Class attributes:
        sums: the `Sum`s `adapt` receives, in this order.
        state: names of the scalars `adapt` receives and returns.
        variable_prefix: prefix of their variable names (default: `name`).
        adapts_from_losses: whether the radius moves only with observed
            losses (SOAA warns when it trains without any).
        needs_total_steps: whether `observe` needs `settings.total_steps`.
        state_layout_version: the state layout SOAA saves with it.
    """

    name: str | None = None  # set by `register`
    sums: tuple[Sum, ...] = ()
    state: tuple[str, ...] = ()
    variable_prefix: str | None = None
    adapts_from_losses = False
    needs_total_steps = False
    state_layout_version = 3

    def validate(self, settings: Settings):
        """Raises `ValueError` naming an argument that does not suit it."""

    def observe(self, state: TrustRegionState, loss, iterations,
                settings: Settings) -> TrustRegionState:
        """Returns the state after one observed `loss` (float32 scalar).

        `iterations` is the step count, including the step(s) `loss`
        belongs to. By default the loss is averaged and counted for the
        logs and the radius stays.
        """
        _, _, average, count = average_loss(state, loss, settings.beta_1)
        return rollover(state, state.radius, average, count)

    def adapt(self, radius, state: tuple, sums: tuple, iterations,
              settings: Settings):
        """Returns `(radius, state)` after one step, from its `sums`.

        `sums` and `state` are named tuples of float32 scalars, fields
        as declared; `iterations` is the step count before the step.
        """
        return radius, state

    def get_config(self) -> dict:
        """The controller's own constants (its `__init__` arguments)."""
        return {}

    @classmethod
    def from_config(cls, config: dict):
        """Creates the controller from `get_config()`."""
        return cls(**config)

    def variable_names(self) -> tuple[str, ...]:
        """The names of the variables of `sums` then `state`."""
        prefix = self.variable_prefix or self.name or type(self).__name__.lower()
        names = (*(s.name for s in self.sums), *self.state)
        return tuple(f"{prefix}_{name}" for name in names)

    # Equal configurations are equal controllers: a controller (with the
    # optimizer's settings) keys the compiled functions that run it.
    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), json.dumps(self.get_config(), sort_keys=True)))

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class Observer(NamedTuple):
    """`controller.observe` with the optimizer's settings bound.

    Hashable: it keys the compiled step of whoever feeds losses. Call it as
    `observer(state, loss, iterations)`.
    """

    controller: Controller
    settings: Settings

    def __call__(self, state: TrustRegionState, loss, iterations):
        """Returns the state after observing `loss`."""
        return self.controller.observe(state, loss, iterations, self.settings)


@functools.cache
def named_tuple(names: tuple[str, ...]):
    """A named tuple type with fields `names` (the type of `sums`, `state`)."""
    return namedtuple("Values", names)


def adapt(controller: Controller, radius, sums, state, iterations,
          settings: Settings):
    """Runs `controller.adapt` on the optimizer's variables; clears `sums`.

    `radius` is the radius variable, `sums` and `state` the variables of the
    controller's `sums` and `state`. Nothing to do without `sums`.
    """
    if not controller.sums:
        return
    new_radius, new_state = controller.adapt(
        radius,
        named_tuple(controller.state)(*map(read_value, state)),
        named_tuple(tuple(s.name for s in controller.sums))(*map(read_value, sums)),
        iterations, settings,
    )
    radius.assign(new_radius)
    for variable, value in zip(state, new_state):
        variable.assign(value)
    for variable in sums:
        variable.assign(0.0)


def step_sums(sums: tuple[Sum, ...], gradient, m, v, scalars, epsilon):
    """Returns one variable's values of `sums` (from the moments before the step)."""
    operands = {"gradient": gradient, "momentum": m, "velocity": v}
    if any("previous_direction" in s[1:] for s in sums):
        operands["previous_direction"] = maths.previous_direction(
            m, v, scalars, epsilon
        )
    return tuple(
        ops.sum(ops.multiply(operands[s.left], operands[s.right])) for s in sums
    )


def average_loss(state: TrustRegionState, loss, beta_1: float):
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


def rollover(state: TrustRegionState, radius, loss_average, loss_count):
    """The state after an observation: the predicted reduction rolls over.

    What the steps since the last observation predicted becomes what the
    next observation is judged against, and accumulation starts again.
    """
    return TrustRegionState(
        radius=radius,
        loss_average=loss_average,
        loss_count=loss_count,
        predicted_reduction=ops.zeros_like(state.predicted_reduction),
        previous_predicted_reduction=state.predicted_reduction,
    )


def clip_log_radius(log_radius, settings: Settings):
    """`exp(clip(log d, log min_radius, log max_radius))`."""
    return ops.exp(ops.clip(
        log_radius, math.log(settings.min_radius), math.log(settings.max_radius)
    ))


def masked_average(average, value, valid, decay: float):
    """`decay * average + (1 - decay) * value` where `valid`, else `average`."""
    return ops.where(valid, decay * average + (1 - decay) * value, average)


def require_initial_radius_within_bounds(controller: Controller,
                                         settings: Settings):
    """Raises `ValueError` unless `min_radius <= initial_radius <= max_radius`."""
    if not settings.min_radius <= settings.initial_radius <= settings.max_radius:
        raise ValueError(
            "Argument `initial_radius` must lie in [min_radius, max_radius] "
            f"with controller={controller.name or type(controller).__name__!r}. "
            "Received: "
            f"initial_radius={settings.initial_radius!r}, "
            f"min_radius={settings.min_radius!r}, "
            f"max_radius={settings.max_radius!r}"
        )
