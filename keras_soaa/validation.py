"""Argument checks of `SOAA`: each bad value gets a `ValueError` naming it."""

import math
import numbers

import keras
import numpy as np
from keras import ops


def is_real_number(value):
    """True for Python and NumPy reals (`np.float32(0.9)`, `np.int64(3)`)."""
    return isinstance(value, numbers.Real) and not isinstance(
        value, (bool, np.bool_)
    )


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
    if isinstance(value, np.generic):
        return value.item()
    return value


def validate_hyperparameters(
    learning_rate,
    beta_1,
    beta_2,
    epsilon,
    radius_bound,
    total_steps,
    initial_radius,
    weight_decay,
):
    """Raises `ValueError` naming the first invalid constructor argument."""
    inf = math.inf
    if is_real_number(learning_rate) or isinstance(learning_rate, bool):
        _check_real(
            "learning_rate", learning_rate, 0.0, inf,
            low_open=True, high_open=True, rule="> 0 (finite)",
        )
    elif not callable(learning_rate):
        raise ValueError(
            "Argument `learning_rate` must be a real number > 0 (finite), a "
            "`keras.optimizers.schedules.LearningRateSchedule` or a callable. "
            f"Received: learning_rate={learning_rate!r} "
            f"(of type {type(learning_rate).__name__})"
        )
    for name, value in (("beta_1", beta_1), ("beta_2", beta_2)):
        _check_real(
            name, value, 0.0, 1.0,
            low_open=False, high_open=True, rule="in [0, 1)",
        )
    _check_real(
        "epsilon", epsilon, 0.0, inf,
        low_open=True, high_open=True, rule="> 0 (finite)",
    )
    _check_real(
        "radius_bound", radius_bound, 0.0, 1.0,
        low_open=True, high_open=True, rule="in (0, 1)",
    )
    _check_real(
        "initial_radius", initial_radius, 0.0, inf,
        low_open=True, high_open=True, rule="> 0 (finite)",
    )
    if total_steps is not None and (
        not isinstance(total_steps, numbers.Integral)
        or isinstance(total_steps, (bool, np.bool_))
        or total_steps < 1
    ):
        raise ValueError(
            "Argument `total_steps` must be `None` or an integer >= 1. "
            f"Received: total_steps={total_steps!r} "
            f"(of type {type(total_steps).__name__})"
        )
    if weight_decay is not None:
        _check_real(
            "weight_decay", weight_decay, 0.0, inf,
            low_open=False, high_open=True, rule=">= 0 (finite) or `None`",
        )


def loss_as_float32_scalar(loss):
    """`loss` as a float32 scalar tensor, or a `ValueError` saying why not."""
    def refuse(why):
        return ValueError(
            "`observe_loss` takes one real scalar loss (a Python or NumPy "
            f"number, or a scalar tensor of a float or integer dtype); {why}. "
            f"Received: loss={loss!r:.200}"
        )

    if loss is None or isinstance(loss, (str, bytes, bool, np.bool_)):
        raise refuse(f"got {type(loss).__name__}")
    if isinstance(loss, numbers.Real):
        # Python and NumPy numbers: beyond float32's range they become +-inf
        # on every backend (TensorFlow refuses to convert 1e300 otherwise).
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


CONTROLLERS = ("paper", "hypergradient", "gradient_ratio")


def validate_controller(
    controller, radius_learning_rate, min_radius, max_radius, initial_radius
):
    """Raises `ValueError` naming the first invalid controller argument."""
    if controller not in CONTROLLERS:
        names = ", ".join(map(repr, CONTROLLERS))
        raise ValueError(
            f"Argument `controller` must be one of {names}. "
            f"Received: controller={controller!r}"
        )
    inf = math.inf
    _check_real(
        "radius_learning_rate", radius_learning_rate, 0.0, inf,
        low_open=False, high_open=True, rule=">= 0 (finite)",
    )
    _check_real(
        "min_radius", min_radius, 0.0, inf,
        low_open=True, high_open=True, rule="> 0 (finite)",
    )
    _check_real(
        "max_radius", max_radius, float(min_radius), inf,
        low_open=False, high_open=True, rule=">= min_radius (finite)",
    )
    if controller != "paper" and not min_radius <= initial_radius <= max_radius:
        raise ValueError(
            "Argument `initial_radius` must lie in [min_radius, max_radius] "
            f"with controller={controller!r}. Received: "
            f"initial_radius={initial_radius!r}, min_radius={min_radius!r}, "
            f"max_radius={max_radius!r}"
        )
