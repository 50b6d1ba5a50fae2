"""Checks of `SOAA`'s arguments and state, each failing with a clear message."""

import math
import numbers

import keras
import numpy as np
from keras import ops


def is_real_number(value):
    """True for Python and NumPy reals (`np.float32(0.9)`, `np.int64(3)`)."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _as_float(value):
    """`float(value)`, or `nan` where it does not fit (e.g. `10**400`)."""
    try:
        return float(value)
    except (OverflowError, TypeError, ValueError):
        return math.nan


def _check_real(name, value, low, high, *, low_open, high_open, rule):
    """Raises `ValueError` naming `name` unless `value` is a real in range."""
    if is_real_number(value):
        number = _as_float(value)
        if math.isfinite(number):
            above_low = number > low if low_open else number >= low
            below_high = number < high if high_open else number <= high
            if above_low and below_high:
                return
    raise ValueError(
        f"Argument `{name}` must be a real number {rule}. Received: "
        f"{name}={value!r} (of type {type(value).__name__})"
    )


def python_number(value):
    """NumPy scalars as Python numbers, so that `get_config` stays JSON."""
    return value.item() if isinstance(value, np.generic) else value


# The ranges `real` checks: rule -> (low, high, low_open, high_open).
_RANGES = {
    "> 0": (0.0, math.inf, True, True),
    ">= 0": (0.0, math.inf, False, True),
    "in (0, 1)": (0.0, 1.0, True, True),
    "in [0, 1)": (0.0, 1.0, False, True),
    "in (0, 1]": (0.0, 1.0, True, False),
    "finite": (-math.inf, math.inf, True, True),
}


def real(value, name: str, rule: str, low: float | None = None) -> float:
    """`value` as a float, or a `ValueError` naming `name` and `rule`.

    `rule`: a key of `_RANGES`, or `">= <other argument>"` with its value `low`.
    """
    bounds = _RANGES.get(rule, (low, math.inf, False, True))
    if low is not None:
        bounds = (low, *bounds[1:])
    _check_real(name, value, bounds[0], bounds[1], low_open=bounds[2],
                high_open=bounds[3], rule=f"{rule} (finite)")
    return float(value)


def positive_int(value, name: str, *, or_none: bool = False) -> int:
    """`value` as an int, or a `ValueError` naming `name` unless an integer >= 1."""
    if (not isinstance(value, numbers.Integral)
            or isinstance(value, (bool, np.bool_)) or value < 1):
        raise ValueError(
            f"Argument `{name}` must be {'`None` or ' if or_none else ''}an "
            f"integer >= 1. Received: {name}={value!r} (of type "
            f"{type(value).__name__})"
        )
    return int(value)


def steps(total_steps) -> int:
    """`total_steps` as an int, or a `ValueError` unless an integer >= 1."""
    return positive_int(total_steps, "total_steps", or_none=True)


def validate_hyperparameters(learning_rate, beta_1, beta_2, epsilon, total_steps,
                             initial_radius, weight_decay, fused):
    """Raises `ValueError` naming the first invalid constructor argument."""
    if is_real_number(learning_rate) or isinstance(learning_rate, bool):
        real(learning_rate, "learning_rate", "> 0")
    elif not callable(learning_rate):
        raise ValueError(
            "Argument `learning_rate` must be a real number > 0 (finite), a "
            "`keras.optimizers.schedules.LearningRateSchedule` or a callable. "
            f"Received: learning_rate={learning_rate!r} "
            f"(of type {type(learning_rate).__name__})"
        )
    real(beta_1, "beta_1", "in [0, 1)")
    real(beta_2, "beta_2", "in [0, 1)")
    real(epsilon, "epsilon", "> 0")
    real(initial_radius, "initial_radius", "> 0")
    if total_steps is not None:
        steps(total_steps)
    if weight_decay is not None:
        _check_real("weight_decay", weight_decay, 0.0, math.inf, low_open=False,
                    high_open=True, rule=">= 0 (finite) or `None`")
    if not (fused is None or isinstance(fused, bool)):
        raise ValueError(
            "Argument `fused` must be `None` (the backend's fast path where "
            "it has one), `True` (that path compiled, torch: `torch.compile`) "
            f"or `False` (the portable step). Received: fused={fused!r}"
        )


def as_base_learning_rate(learning_rate):
    """A real `learning_rate` as a Python float, which the base class takes.

    Also an int or a NumPy scalar; schedules and callables pass.
    """
    return float(learning_rate) if is_real_number(learning_rate) else learning_rate


def loss_as_float32_scalar(loss, name: str = "loss"):
    """`loss` as a float32 scalar tensor, or a `ValueError` saying why not."""
    def refuse(why):
        return ValueError(
            f"Argument `{name}` must be one real scalar loss (a Python or NumPy "
            f"number, or a scalar tensor of a float or integer dtype); {why}. "
            f"Received: {name}={loss!r:.200}"
        )

    if loss is None or isinstance(loss, (str, bytes, bool, np.bool_)):
        raise refuse(f"got {type(loss).__name__}")
    if isinstance(loss, numbers.Real):
        # Beyond float32's range: +-inf on every backend (TF refuses 1e300).
        try:
            value = float(loss)
        except OverflowError:  # an int beyond float64
            value = math.copysign(math.inf, loss)
        with np.errstate(over="ignore"):
            loss = np.float32(value)
    try:
        tensor = ops.convert_to_tensor(loss)
    except Exception as error:  # Backends raise different types here.
        raise refuse(f"{type(loss).__name__} is not convertible") from error
    dtype = keras.backend.standardize_dtype(tensor.dtype)
    if not ("float" in dtype or "int" in dtype):
        raise refuse(f"got dtype {dtype}")
    if len(ops.shape(tensor)) != 0:
        raise refuse(f"got a tensor of shape {tuple(ops.shape(tensor))}")
    return ops.cast(tensor, "float32")


def no_loss_observed_message(optimizer):
    """The warning of an optimizer whose radius will never see a loss."""
    return (
        f"SOAA optimizer '{optimizer.name}' is applying steps but no loss is fed "
        f"to its controller ({optimizer.controller!r}), so its radius stays at "
        f"initial_radius={optimizer.initial_radius} and never adapts. With "
        "`model.fit`, pass `callbacks=[keras_soaa.TrustRegionCallback()]`; in a "
        "custom training loop, call "
        + ("`optimizer.observe_step(loss_before, loss_after)`"
           if optimizer.controller.needs_loss_pair
           else "`optimizer.observe_loss(loss)`")
        + " after each `apply`"
        + (" (with `SOAA(total_steps=...)`)."
           if optimizer.controller.needs_total_steps else ".")
    )


def require_ready_to_observe(optimizer, method: str):
    """Raises `ValueError` unless `optimizer.<method>` can run now."""
    if not optimizer.built:
        raise ValueError(
            f"`{method}` was called before the optimizer was built: apply "
            "at least one step (or call `optimizer.build(variables)`) first."
        )
    if optimizer.total_steps is None and optimizer.controller.needs_total_steps:
        raise ValueError(
            "SOAA needs `total_steps` to schedule its radius bounds. Pass "
            "`SOAA(total_steps=...)` (the number of optimizer steps of the run), "
            "or train with `model.fit(..., callbacks=["
            "keras_soaa.TrustRegionCallback()])`, which sets it from the epochs "
            "and steps per epoch."
        )


def refuse_state(optimizer, saved: int, layout: str | None = None):
    """Raises `ValueError`: a saved state does not fit `optimizer`.

    Keras would only warn and keep the fresh state, silently restarting the
    trust region of a resumed run.
    """
    raise ValueError(
        f"Cannot restore SOAA optimizer '{optimizer.name}': the saved state has "
        f"{saved} variables" + (f" of state {layout}" if layout else "")
        + f", this optimizer has {len(optimizer.variables)} with controller "
        f"{optimizer.controller!r}. Was it saved with other options (e.g. "
        "`use_ema`, `gradient_accumulation_steps`, another controller) or a "
        "newer version of keras-soaa?"
    )
