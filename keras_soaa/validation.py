"""Checks of `SOAA`'s arguments and state, each failing with a clear message.

A bad argument gets a `ValueError` naming it.
"""

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
    radius_learning_rate,
    min_radius,
    max_radius,
    fused,
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
    for name, value, low, low_open, rule in (
        ("radius_learning_rate", radius_learning_rate, 0.0, False, ">= 0"),
        ("min_radius", min_radius, 0.0, True, "> 0"),
        ("max_radius", max_radius, float(min_radius), False, ">= min_radius"),
    ):
        _check_real(name, value, low, inf, low_open=low_open, high_open=True,
                    rule=f"{rule} (finite)")
    if fused not in (None, False):
        raise ValueError(
            "Argument `fused` must be `None` (the backend's fast path where "
            f"it has one) or `False` (the portable step). Received: fused={fused!r}"
        )


def as_base_learning_rate(learning_rate):
    """A real `learning_rate` as a Python float, which the base class takes.

    An int or a NumPy scalar is just as clear; schedules and callables pass.
    """
    return float(learning_rate) if is_real_number(learning_rate) else learning_rate


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


def no_loss_observed_message(optimizer):
    """The warning of an optimizer whose radius will never see a loss."""
    return (
        f"SOAA optimizer '{optimizer.name}' is applying steps but no loss is "
        "fed to its trust region, so its radius stays at "
        f"initial_radius={optimizer.initial_radius} and never adapts. With "
        "`model.fit`, pass `callbacks=[keras_soaa.TrustRegionCallback()]`; in "
        "a custom training loop, pass `SOAA(total_steps=...)` and call "
        "`optimizer.observe_loss(loss)` after each `apply`."
    )


def require_ready_to_observe(optimizer):
    """Raises `ValueError` unless `optimizer.observe_loss` can run now."""
    if not optimizer.built:
        raise ValueError(
            "`observe_loss` was called before the optimizer was built: apply "
            "at least one step (or call `optimizer.build(variables)`) first."
        )
    if optimizer.total_steps is None and optimizer.controller.needs_total_steps:
        raise ValueError(
            "SOAA needs `total_steps` to schedule its radius bounds. Pass "
            "`SOAA(total_steps=...)` (the number of optimizer steps of the "
            "run), or train with `model.fit(..., "
            "callbacks=[keras_soaa.TrustRegionCallback()])`, which sets it "
            "from the epochs and steps per epoch."
        )


def require_same_state_size(optimizer, saved: int):
    """Raises `ValueError` if a saved state has another number of variables.

    Keras would only warn and keep the fresh state: a resumed run would
    silently restart the trust region.
    """
    if saved != len(optimizer.variables):
        raise ValueError(
            f"Cannot restore SOAA optimizer '{optimizer.name}': the saved "
            f"state has {saved} variables, this optimizer has "
            f"{len(optimizer.variables)} (state layout version "
            f"{optimizer.controller.state_layout_version}). Was it saved with "
            "other options (e.g. `use_ema`, `gradient_accumulation_steps`, "
            "another controller) or another version of keras-soaa?"
        )


def require_readable_layout(version: int, newest: int):
    """Raises `ValueError` for a state layout newer than this keras-soaa's."""
    if version > newest:
        raise ValueError(
            f"This SOAA config has state layout version {version}, but this "
            f"keras-soaa reads up to version {newest}: it was saved by a "
            "newer keras-soaa. Upgrade keras-soaa to load it."
        )
