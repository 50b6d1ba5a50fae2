"""What a trust-region controller is: `Controller`, `Sum` and `Context`.

A controller decides how SOAA's radius `d` moves (docs/algorithm.md,
"Controllers"): it declares the totals it reads (`sums`) and its own scalars
(`state`), and implements one pure `keras.ops` function, `update`, which SOAA
calls after every step, or, with `needs_loss`, after every observed loss
(with `needs_loss_pair`, also after every observed pair of losses).
"""

import json
import math
from typing import NamedTuple

from keras import ops

from keras_soaa import validation
from keras_soaa.maths import BATCH_PREDICTED_REDUCTION as BATCH_PREDICTED_REDUCTION
from keras_soaa.maths import PREDICTED_REDUCTION as PREDICTED_REDUCTION


class Sum(NamedTuple):
    """A total a controller reads, over every element of every variable.

    `Sum(name, left, right)` is `sum(left * right)`, each operand one of
    `"gradient"` (g), `"momentum"` and `"velocity"` (m and v before the
    step) and `"previous_direction"` (the previous step's Adam direction,
    `m / (sqrt(v / (1 - beta_2**(t-1))) + epsilon)`, 0 at `t = 1`).
    `Sum(name, PREDICTED_REDUCTION)` is the step's predicted reduction,
    `eta * sum(m_hat * u - v_hat * u**2 / 2)` (docs/algorithm.md, "One step");
    `Sum(name, BATCH_PREDICTED_REDUCTION)` is its predicted reduction on the
    batch it was computed from, `eta * sum(g * u - v_hat * u**2 / 2)`.
    Totals run over the steps since the controller's last `update`; a
    skipped (non-finite) step adds nothing.
    """

    name: str
    left: str
    right: str | None = None


class Context(NamedTuple):
    """What the optimizer tells `Controller.update` besides its own values."""

    step: object  # t: steps taken, including those the update is about (float32)
    total_steps: int | None  # SOAA's `total_steps`
    beta_1: float  # SOAA's `beta_1`
    epsilon: float  # SOAA's `epsilon`


class LossPair(NamedTuple):
    """One batch's loss at the weights before a step and right after it.

    The same batch and the same loss both times, so their difference is the
    reduction the step made on that batch (docs/algorithm.md, "Controllers").
    """

    before: object
    after: object


class Controller:
    """Base class of SOAA's trust-region controllers.

    Subclass it, declare `sums` and `state`, implement `update` in
    `keras.ops` (no Python branch on a tensor's value), keep constants as
    `__init__` arguments returned by `get_config`, and decorate the class
    with `keras_soaa.controllers.register(name)`.

    Class attributes:
        sums: the `Sum`s `update` reads (each costs one reduction per
            variable per step; an undeclared sum costs nothing).
        state: names of the controller's own float32 scalars (0 at first).
        needs_loss: `update` runs per observed loss (`loss` given) instead
            of after every step; SOAA warns if it trains without losses.
        needs_loss_pair: `update` runs after every step (`loss=None`) and
            after every observed `LossPair` of the step just taken (`loss`
            that pair; the sums then are 0: the step's update cleared them).
        needs_total_steps: `update` reads `context.total_steps`.
    """

    name: str | None = None  # set by `register`
    sums: tuple[Sum, ...] = ()
    state: tuple[str, ...] = ()
    needs_loss = False
    needs_loss_pair = False
    needs_total_steps = False

    def update(self, radius, state, sums, context: Context, loss=None):
        """Returns `(radius, state)`: the new radius and state.

        `sums` and `state` are named tuples of float32 scalars with the
        declared fields; `loss` is the observed float32 loss where
        `needs_loss`, a `LossPair` of float32 losses where
        `needs_loss_pair` (or `None` after a step), else `None`.
        """
        return radius, state

    def validate(self, initial_radius: float):
        """Raises `ValueError` naming an argument that does not suit it."""

    def get_config(self) -> dict:
        """The controller's constants (its `__init__` arguments)."""
        return {}

    @classmethod
    def from_config(cls, config: dict):
        """Creates the controller from `get_config()`."""
        return cls(**config)

    # Equal configurations are equal controllers: compiled steps key on them.
    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), json.dumps(self.get_config(), sort_keys=True)))

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({arguments})"


class LogRadiusController(Controller):
    """A controller that moves `log d` by steps within fixed bounds.

    Args:
        learning_rate: Float >= 0: the size of a step on `log d`.
        min_radius: Float > 0: the lower bound of `d`.
        max_radius: Float >= `min_radius`: the upper bound of `d`.
    """

    def __init__(self, learning_rate=0.05, min_radius=0.1, max_radius=10.0):
        self.learning_rate = validation.real(learning_rate, "learning_rate", ">= 0")
        self.min_radius = validation.real(min_radius, "min_radius", "> 0")
        self.max_radius = validation.real(max_radius, "max_radius", ">= min_radius",
                                          low=self.min_radius)

    def get_config(self) -> dict:
        """`learning_rate` (the step on `log d`), `min_radius`, `max_radius`."""
        return {"learning_rate": self.learning_rate, "min_radius": self.min_radius,
                "max_radius": self.max_radius}

    def validate(self, initial_radius: float):
        """Requires `min_radius <= initial_radius <= max_radius`."""
        require_within_bounds(self, initial_radius)

    def clip(self, log_radius):
        """`exp(clip(log d, log min_radius, log max_radius))`."""
        return clip_radius(self, log_radius)


def require_within_bounds(controller, initial_radius: float):
    """Raises `ValueError` unless `min_radius <= initial_radius <= max_radius`."""
    if not controller.min_radius <= initial_radius <= controller.max_radius:
        raise ValueError(
            "Argument `initial_radius` must lie in [min_radius, max_radius] "
            f"of the controller {controller!r}. Received: "
            f"initial_radius={initial_radius!r}"
        )


def clip_radius(controller, log_radius):
    """`exp(clip(log d, log min_radius, log max_radius))` of the controller."""
    return ops.exp(ops.clip(log_radius, math.log(controller.min_radius),
                            math.log(controller.max_radius)))


def masked_average(average, value, valid, decay: float):
    """`decay * average + (1 - decay) * value` where `valid`, else `average`."""
    return ops.where(valid, decay * average + (1 - decay) * value, average)
