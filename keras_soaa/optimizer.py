"""`SOAA`: Adam moments, a diagonal Fisher estimate and an adaptive trust region."""

import functools
import math
import numbers
import warnings

import keras
import numpy as np
from keras import ops
from keras.src.backend.common.stateless_scope import in_stateless_scope

from keras_soaa import trust_region

# Bumped whenever the optimizer's variables change (number, order, meaning),
# so that a file saved by a newer keras-soaa is refused, not mis-loaded: Keras
# restores optimizer variables by position.
STATE_LAYOUT_VERSION = 1

# Variables of these dtypes get float32 moments and a float32 update.
_LOW_PRECISION_FLOATS = ("float16", "bfloat16")

# The five scalars of the trust-region controller, in the order they are
# created (and saved): this order is part of the saved state layout.
SCALAR_STATE_NAMES = (
    "radius",
    "loss_average",
    "loss_count",
    "predicted_reduction",
    "previous_predicted_reduction",
)


def _is_real_number(value):
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
    if _is_real_number(value):
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


def _python_number(value):
    """NumPy scalars as Python numbers, so that `get_config` stays JSON."""
    if isinstance(value, np.generic):
        return value.item()
    return value


def _validate_hyperparameters(
    learning_rate,
    beta_1,
    beta_2,
    epsilon,
    radius_bound,
    total_steps,
    initial_radius,
    weight_decay,
):
    inf = math.inf
    if _is_real_number(learning_rate) or isinstance(learning_rate, bool):
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


def _loss_as_float32_scalar(loss):
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


def _tf_eager_without_strategy():
    """True when TensorFlow runs eagerly outside any `tf.distribute` scope."""
    import tensorflow as tf

    return tf.executing_eagerly() and not tf.distribute.has_strategy()


def _curvature_sums(new_m, new_v):
    """Returns `(sum(new_m**2) * s, sum(new_v) * s, s)` for one variable.

    `s` is 1, or a smaller factor when a plain sum overflows.

    Both sums are taken as they are, in one pass; only when one overflows
    (a variable of large gradients: `g**2 ~ 1e36` summed) are they taken
    again, scaled by `s = k**2`, `k = 1 / sqrt(max(1, max(new_v)))`: the
    ratio `c` needs is the same. The terms are multiplied by `k` twice,
    never by `k**2`: that can be subnormal, and XLA on CPU flushes
    subnormals to zero. A non-finite `new_v` leaves the second sum
    non-finite either way (`update_step` skips the step then).
    """
    one = ops.ones((), new_v.dtype)
    plain = (ops.sum(ops.square(new_m)), ops.sum(new_v), one)

    def scaled():
        k = ops.divide(one, ops.sqrt(ops.max(new_v, initial=1.0)))
        return (
            ops.sum(ops.square(ops.multiply(new_m, k))),
            ops.sum(ops.multiply(ops.multiply(new_v, k), k)),
            ops.multiply(k, k),
        )

    return ops.cond(
        ops.logical_and(ops.isfinite(plain[0]), ops.isfinite(plain[1])),
        lambda: plain,
        scaled,
    )


def curvature_scale_of_sums(
    sum_m_sq, sum_v, scale, size, beta_1_correction, beta_2_correction, epsilon
):
    """Returns `(c, sum(v_hat + epsilon) * scale)` from `_curvature_sums`.

    `c = 1 + sum(m_hat**2) / sum(v_hat + epsilon)`, with the bias
    corrections applied to the sums of the new moments. Elementwise over
    per-variable values, so the torch fused path calls it for all variables.
    """
    sum_v_hat_eps = ops.add(
        ops.divide(sum_v, beta_2_correction),
        ops.multiply(ops.multiply(size, epsilon), scale),
    )
    curvature_scale = 1 + ops.divide(
        ops.divide(sum_m_sq, ops.square(beta_1_correction)), sum_v_hat_eps
    )
    return curvature_scale, sum_v_hat_eps


@keras.saving.register_keras_serializable(package="keras_soaa")
class SOAA(keras.optimizers.Optimizer):
    """SOAA: second-order adaptive Adam with an adaptive trust region.

    SOAA ("Efficient Second-Order Neural Network Optimization via Adaptive
    Trust Region Methods", arXiv 2410.02293) preconditions Adam's moments with
    a diagonal Fisher estimate (O(n) memory and time) and scales each step by
    a trust-region radius `d` that grows or shrinks with the ratio of the
    *observed* loss reduction to the *predicted* one.

    For every variable `theta` with gradient `g`, at step `t`:

    ```
    m     = beta_1 * m + (1 - beta_1) * g
    v     = beta_2 * v + (1 - beta_2) * g**2
    m_hat = m / (1 - beta_1**t)
    v_hat = v / (1 - beta_2**t)
    c     = 1 + sum(m_hat**2) / sum(v_hat + epsilon)  # sums over this variable
    F     = c * v_hat                                  # diagonal Fisher
    r     = maximum(d * F, sqrt(v_hat))
    u     = d * m_hat / (r + epsilon)
    theta = theta - learning_rate * u
    predicted_reduction += learning_rate * sum(m_hat * u - v_hat * u**2 / 2)
    ```

    The radius only changes when a loss is observed (`observe_loss`, called by
    `keras_soaa.TrustRegionCallback` during `fit`): with `k` losses seen,

    ```
    loss_average = beta_1 * loss_average + (1 - beta_1) * loss
    rho = (loss_average / (1 - beta_1**k) - loss)
          / max(previous_predicted_reduction, epsilon)
    e   = min(t - 1, total_steps) / total_steps
    d   = min(1 + radius_bound**e, max((1 - radius_bound)**e, rho * d))
    ```

    and the predicted reduction accumulated since the previous observation
    becomes the one the next observation is judged against.

    A variable whose gradient holds a NaN or an infinity is left exactly as
    it was for that step (weights, moments, no weight decay, nothing added to
    the predicted reduction); so is one whose step cannot be computed
    finitely in its dtype (`g**2` beyond float32's range, i.e. |g| > ~1.8e19
    for a float32 variable; a new weight that overflows its dtype; a
    non-finite learning rate). A non-finite loss (or one beyond float32's
    range) is not averaged in and sets the radius to its lower bound. Nothing
    non-finite reaches the weights or the optimizer state. Variables of
    dtype float16 or bfloat16 keep `m` and `v` in float32 and are updated in
    float32, rounding only the new weight to their dtype.

    Warning rule: the radius only adapts if losses are observed. SOAA warns
    once per optimizer (a `UserWarning` at its first `apply`, which is trace
    time when compiled) if it applies a step while no
    `TrustRegionCallback` has attached to it, `observe_loss` was never
    called and `total_steps` is `None`: typically `fit` without the
    callback. A custom loop that sets `total_steps` (it must, to call
    `observe_loss`) is not warned.

    Args:
        learning_rate: A float > 0, a
            `keras.optimizers.schedules.LearningRateSchedule` instance, or a
            callable that takes no arguments and returns the value to use.
            Defaults to `0.001`.
        beta_1: Float in `[0, 1)`. Decay rate of the first moment and of the
            observed-loss average. Defaults to `0.9`.
        beta_2: Float in `[0, 1)`. Decay rate of the second moment. Defaults
            to `0.999`.
        epsilon: Float > 0. Small constant for numerical stability, also the
            floor of the predicted reduction in `rho`. Defaults to `1e-8`.
        radius_bound: Float in `(0, 1)`. The radius bounds narrow from
            `[1, 2]` to `[1 - radius_bound, 1 + radius_bound]` over
            `total_steps`. Defaults to `0.1`.
        total_steps: `None` or an integer >= 1: the number of steps over which
            the radius bounds narrow. `TrustRegionCallback` fills it in from
            `fit`'s epochs and steps when it is `None`. Defaults to `None`.
        initial_radius: Float > 0. The radius before the first observed
            loss. Defaults to `1.0`.
        weight_decay, clipnorm, clipvalue, global_clipnorm, use_ema,
        ema_momentum, ema_overwrite_frequency, loss_scale_factor,
        gradient_accumulation_steps, name: as in `keras.optimizers.Optimizer`.
            `weight_decay` is decoupled: `theta -= learning_rate *
            weight_decay * theta` before the SOAA step.
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        radius_bound=0.1,
        total_steps=None,
        initial_radius=1.0,
        weight_decay=None,
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        **kwargs,
    ):
        _validate_hyperparameters(
            learning_rate,
            beta_1,
            beta_2,
            epsilon,
            radius_bound,
            total_steps,
            initial_radius,
            weight_decay,
        )
        if _is_real_number(learning_rate):
            # The base class takes Python floats only; an int or a NumPy
            # scalar is just as clear.
            learning_rate = float(learning_rate)
        # NumPy scalars become Python numbers: `get_config` must stay JSON.
        number = _python_number
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=number(weight_decay),
            clipnorm=number(clipnorm),
            clipvalue=number(clipvalue),
            global_clipnorm=number(global_clipnorm),
            use_ema=use_ema,
            ema_momentum=number(ema_momentum),
            ema_overwrite_frequency=number(ema_overwrite_frequency),
            loss_scale_factor=number(loss_scale_factor),
            gradient_accumulation_steps=number(gradient_accumulation_steps),
            **kwargs,
        )
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.radius_bound = float(radius_bound)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.initial_radius = float(initial_radius)
        # Python-side bookkeeping for the one-time "no loss is ever observed"
        # warning (see the class docstring); not part of the saved state.
        self._loss_observer_attached = False
        self._loss_observed = False
        self._warned_no_loss_observed = False
        self._observation_cache = None
        self._xla_update_cache = {}
        self._moments_at_least_float32 = False

    def build(self, var_list):
        """Creates `m` and `v` per variable and the five controller scalars.

        Args:
            var_list: list of model variables to build SOAA variables on.
        """
        if self.built:
            return
        super().build(var_list)
        # `m` and `v` of a float16 or bfloat16 variable are float32: `g**2`
        # overflows float16 for |g| > 256, and nothing non-finite may reach
        # the optimizer state (see `add_variable`).
        self._moments_at_least_float32 = True
        try:
            self._momentums, self._velocities = self.add_optimizer_variables(
                var_list, ["momentum", "velocity"]
            )
        finally:
            self._moments_at_least_float32 = False
        initial_values = {"radius": self.initial_radius}
        for name in SCALAR_STATE_NAMES:
            variable = self.add_variable(
                shape=(),
                initializer=keras.initializers.Constant(
                    initial_values.get(name, 0.0)
                ),
                dtype="float32",
                aggregation="only_first_replica",
                name=name,
            )
            setattr(self, f"_{name}", variable)

    def add_variable(
        self,
        shape,
        initializer="zeros",
        dtype=None,
        aggregation="none",
        layout=None,
        name=None,
    ):
        """Adds an optimizer variable (see `keras.optimizers.Optimizer`).

        While `build` creates the moments, 16-bit float dtypes are raised to
        float32; everything else is as in the base class.
        """
        if self._moments_at_least_float32 and dtype is not None:
            if keras.backend.standardize_dtype(dtype) in _LOW_PRECISION_FLOATS:
                dtype = "float32"
        return super().add_variable(
            shape,
            initializer=initializer,
            dtype=dtype,
            aggregation=aggregation,
            layout=layout,
            name=name,
        )

    def apply(self, grads, trainable_variables=None):
        """Applies one step (see `keras.optimizers.Optimizer.apply`).

        Warns once per optimizer if the trust region will never see a loss
        (see the class docstring).
        """
        self._warn_once_if_no_loss_is_observed()
        return super().apply(grads, trainable_variables)

    def _attach_loss_observer(self):
        """Called by `TrustRegionCallback` before training starts."""
        self._loss_observer_attached = True

    def _warn_once_if_no_loss_is_observed(self):
        # Runs in Python: eagerly at every `apply`, compiled only at trace
        # time, which is all a once-per-optimizer warning needs.
        if (
            self._warned_no_loss_observed
            or self._loss_observer_attached
            or self._loss_observed
            or self.total_steps is not None
        ):
            return
        self._warned_no_loss_observed = True
        warnings.warn(
            f"SOAA optimizer '{self.name}' is applying steps but no loss is "
            "fed to its trust region, so its radius stays at "
            f"initial_radius={self.initial_radius} and never adapts. With "
            "`model.fit`, pass `callbacks=[keras_soaa.TrustRegionCallback()]`; "
            "in a custom training loop, pass `SOAA(total_steps=...)` and call "
            "`optimizer.observe_loss(loss)` after each `apply`.",
            UserWarning,
            stacklevel=3,
        )

    @property
    def radius(self):
        """The trust-region radius `d` (a float32 scalar variable)."""
        return self._radius

    @property
    def loss_average(self):
        """The average of observed losses, not bias-corrected."""
        return self._loss_average

    @property
    def loss_count(self):
        """The number of finite losses observed."""
        return self._loss_count

    @property
    def predicted_reduction(self):
        """The reduction predicted by the steps since the last observation."""
        return self._predicted_reduction

    @property
    def previous_predicted_reduction(self):
        """What `predicted_reduction` was at the last observation."""
        return self._previous_predicted_reduction

    def _trust_region_state(self):
        # Copies: on torch a variable's tensor is updated in place, and the
        # new state is assigned one variable at a time. `x + 0`, not
        # `ops.copy`: under `torch.compile` (torch 2.13), `b.assign(copy(a))`
        # followed by `a.assign(0)` left `b == 0`, losing the predicted
        # reduction that the next observation is judged against.
        return trust_region.TrustRegionState(
            *(
                ops.add(getattr(self, f"_{name}"), 0.0)
                for name in SCALAR_STATE_NAMES
            )
        )

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        # On torch, one fused pass over all variables (as Keras' torch Adam
        # does); elsewhere `update_step` per variable, compiled by XLA.
        backend = keras.backend.backend()
        if backend == "torch":
            from keras_soaa import torch_fused

            torch_fused.update(self, grads, trainable_variables, learning_rate)
            return
        if backend == "tensorflow" and _tf_eager_without_strategy():
            # Op by op, each of update_step's ~30 elementwise ops is a pass
            # over memory; XLA fuses them, as it does in a compiled `fit`.
            compiled = self._xla_update_step(trainable_variables)
            compiled(list(grads), ops.convert_to_tensor(learning_rate))
            return
        super()._backend_update_step(grads, trainable_variables, learning_rate)

    def _xla_update_step(self, trainable_variables):
        """Returns `(grads, learning_rate) -> None` compiled with XLA (TF)."""
        # One per set of variables (a training loop may alternate subsets);
        # the cached list keeps them alive, so their ids stay theirs.
        key = tuple(id(v) for v in trainable_variables)
        if key in self._xla_update_cache:
            return self._xla_update_cache[key]
        import tensorflow as tf

        variables = list(trainable_variables)
        parent = super()._backend_update_step

        def update(grads, learning_rate):
            parent(grads, variables, learning_rate)

        compiled = tf.function(update, jit_compile=True, autograph=False)
        self._xla_update_cache[key] = compiled
        return compiled

    def _apply_weight_decay(self, variables):
        # Weight decay is applied in `update_step` instead, where a step that
        # is skipped for a non-finite gradient can skip it too.
        return

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        if 0 in tuple(variable.shape):
            # No element: nothing to update, nothing predicted (and Keras'
            # TensorFlow `ops.add` fails on some empty shapes, e.g. (0, 2)).
            return
        index = self._get_variable_index(variable)
        m_variable = self._momentums[index]
        v_variable = self._velocities[index]
        # The moments' dtype is the compute dtype: the variable's, or float32
        # for a 16-bit variable, whose new value is rounded once at the end.
        dtype = m_variable.dtype
        variable_dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1_correction = trust_region.bias_correction(
            self.beta_1, local_step
        )
        beta_2_correction = trust_region.bias_correction(
            self.beta_2, local_step
        )
        radius = ops.cast(self._radius, dtype)

        m = ops.convert_to_tensor(m_variable)
        v = ops.convert_to_tensor(v_variable)
        old_theta = ops.convert_to_tensor(variable)
        theta = ops.cast(old_theta, dtype)

        new_m = ops.add(m, ops.multiply(ops.subtract(gradient, m), 1 - self.beta_1))
        new_v = ops.add(
            v, ops.multiply(ops.subtract(ops.square(gradient), v), 1 - self.beta_2)
        )
        # The sums are taken over new_m and new_v and the bias corrections
        # folded into scalars: m_hat and v_hat are never made as arrays (on
        # CPU, XLA writes out every array that several fusions read).
        curvature_scale, sum_v_hat_eps = curvature_scale_of_sums(
            *_curvature_sums(new_m, new_v),
            ops.cast(ops.size(new_v), dtype),
            beta_1_correction,
            beta_2_correction,
            self.epsilon,
        )
        # r = max(d * F, sqrt(v_hat)), F = c * v_hat, as a `where`: Keras
        # 3.15's torch `maximum` computes float64 inputs in float32 (its
        # `result_type` of two torch float64 dtypes is float32). A NaN in
        # `d * F` propagates.
        sqrt_v_hat = ops.multiply(ops.sqrt(new_v), ops.rsqrt(beta_2_correction))
        scaled_fisher = ops.multiply(
            new_v, radius * curvature_scale / beta_2_correction
        )
        denominator = ops.where(
            ops.greater_equal(sqrt_v_hat, scaled_fisher), sqrt_v_hat, scaled_fisher
        )
        # u = d * m_hat / (r + epsilon) = a * q: only q is made as an array,
        # every scalar factor stays on scalars (on CPU, XLA writes out each
        # array a reduction reads, broadcast scalars included).
        step_scale = radius / beta_1_correction  # a
        quotient = ops.divide(new_m, ops.add(denominator, self.epsilon))  # q

        new_theta = theta
        if self.weight_decay is not None and self._use_weight_decay(variable):
            wd = ops.cast(self.weight_decay, dtype)
            new_theta = ops.subtract(theta, theta * wd * lr)
        new_theta = ops.cast(
            ops.subtract(new_theta, ops.multiply(quotient, lr * step_scale)),
            variable_dtype,
        )

        # sum(m_hat * u - v_hat * u**2 / 2)
        #   = a / b1c * sum(new_m * q) - a**2 / (2 * b2c) * sum(new_v * q * q),
        # two sums of products of arrays that exist anyway. `new_v * q` first:
        # q**2 underflows float32 when v is huge (|g| ~ 1e19 gives q ~
        # 1e-20), while |new_v * q| <= |new_m| * b2c / d (r >= d * v_hat).
        # Each scaled term of the second sum is at most half the first's
        # (v_hat * u**2 <= m_hat * u / c), so the difference loses no digits.
        # `0 * new_theta` adds exactly 0, or NaN where a new weight is not
        # finite: the sums also check the weights.
        alignment = ops.sum(
            ops.add(
                ops.multiply(new_m, quotient),
                ops.multiply(ops.cast(new_theta, dtype), 0.0),
            )
        )
        curvature = ops.sum(ops.multiply(ops.multiply(new_v, quotient), quotient))
        predicted = ops.cast(
            ops.multiply(
                lr,
                ops.subtract(
                    ops.multiply(alignment, step_scale / beta_1_correction),
                    ops.multiply(
                        curvature,
                        ops.square(step_scale) / (2.0 * beta_2_correction),
                    ),
                ),
            ),
            "float32",
        )

        # A non-finite gradient leaves this variable and its state untouched,
        # and so does any other step that cannot be computed finitely: `g**2`
        # overflowing the moments' dtype (|g| > ~1.8e19 in float32), a new
        # weight overflowing the variable's dtype, a predicted reduction
        # overflowing float32. The sum of `v_hat` (never negative) is finite
        # exactly when every `v_hat` is, i.e. when `g` holds no NaN or inf
        # and `g**2` did not overflow; `predicted` catches the rest.
        is_finite = ops.logical_and(
            ops.isfinite(sum_v_hat_eps), ops.isfinite(predicted)
        )
        self.assign(m_variable, ops.where(is_finite, new_m, m))
        self.assign(v_variable, ops.where(is_finite, new_v, v))
        self.assign(variable, ops.where(is_finite, new_theta, old_theta))
        self.assign_add(
            self._predicted_reduction, ops.where(is_finite, predicted, 0.0)
        )

    def observe_loss(self, loss):
        """Feeds one observed training loss to the trust-region controller.

        Call it after the step(s) the loss belongs to: `loss` is the mean
        training loss of the step(s) applied since the previous call, computed
        at the weights before them (what `fit` reports for a batch).
        `TrustRegionCallback` calls it during `fit`; custom training loops
        call it after `optimizer.apply(...)`.

        A NaN or infinite loss (or one beyond float32's range, or whose
        average would overflow float32) is not averaged in: the radius drops
        to its lower bound and the predicted reductions roll over as usual.

        Args:
            loss: a real number: a Python or NumPy scalar, or a scalar tensor
                of a float or integer dtype.

        Raises:
            ValueError: if the optimizer is not built yet, if `total_steps`
                is `None`, or if `loss` is not one real number (`None`, a
                string, a bool, a list, a non-scalar tensor...). The state is
                left untouched then.
        """
        if not self.built:
            raise ValueError(
                "`observe_loss` was called before the optimizer was built: "
                "apply at least one step (or call `optimizer.build(variables)`) "
                "first."
            )
        if self.total_steps is None:
            raise ValueError(
                "SOAA needs `total_steps` to schedule its radius bounds. Pass "
                "`SOAA(total_steps=...)` (the number of optimizer steps of the "
                "run), or train with `model.fit(..., "
                "callbacks=[keras_soaa.TrustRegionCallback()])`, which sets it "
                "from the epochs and steps per epoch."
            )
        loss = _loss_as_float32_scalar(loss)
        self._loss_observed = True
        self._compiled_observation()(loss)

    def _observe_and_assign(self, loss, observe):
        new_state = observe(
            self._trust_region_state(), loss, ops.convert_to_tensor(self.iterations)
        )
        for name, value in zip(SCALAR_STATE_NAMES, new_state):
            getattr(self, f"_{name}").assign(value)

    def _controller_key(self):
        """The hyperparameters the controller step is compiled for."""
        return (self.total_steps, self.radius_bound, self.beta_1, self.epsilon)

    def _controller(self):
        """Returns `(state, loss, iterations) -> state` for this configuration."""
        return functools.partial(
            trust_region.observe,
            total_steps=self.total_steps,
            radius_bound=self.radius_bound,
            beta_1=self.beta_1,
            epsilon=self.epsilon,
        )

    def _compiled_observation(self):
        """Returns `loss -> None`: the controller step, compiled per config.

        Run op by op, it costs ~1 ms per observed loss (about 30 scalar
        ops), a tenth of a small model's training step.
        """
        key = self._controller_key()
        cache = self._observation_cache
        if cache is not None and cache[0] == key:
            return cache[1]
        observe = self._controller()
        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            observe = jax.jit(observe)
        run = functools.partial(self._observe_and_assign, observe=observe)
        if backend == "tensorflow":
            import tensorflow as tf

            # Reads and writes the variables inside the graph: one call.
            compiled = tf.function(run, autograph=False)

            def run(loss):
                # A `StatelessScope` (`stateless_observe_loss`) must see the
                # assignments themselves, not a graph's.
                if in_stateless_scope():
                    return self._observe_and_assign(loss, observe)
                return compiled(loss)

        self._observation_cache = (key, run)
        return run

    def stateless_observe_loss(self, optimizer_variables, loss):
        """Stateless `observe_loss`, for JAX training loops under `jax.jit`.

        Args:
            optimizer_variables: the current values of `self.variables`, as
                returned by `stateless_apply`.
            loss: the observed loss (see `observe_loss`).

        Returns:
            The new values of `self.variables`.
        """
        mapping = list(zip(self.variables, optimizer_variables))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.observe_loss(loss)
        return [scope.get_current_value(v) for v in self.variables]

    def load_own_variables(self, store):
        """Restores the optimizer's variables from a saved store.

        Keras restores optimizer variables by position and, when their number
        differs, only warns and keeps the fresh state: a resumed run would
        silently restart the trust region. A built SOAA refuses instead.
        """
        if self.built and len(store.keys()) != len(self.variables):
            raise ValueError(
                f"Cannot restore SOAA optimizer '{self.name}': the saved state "
                f"has {len(store.keys())} variables, this optimizer has "
                f"{len(self.variables)} (state layout version "
                f"{STATE_LAYOUT_VERSION}). Was it saved with other options "
                "(e.g. `use_ema`, `gradient_accumulation_steps`) or another "
                "version of keras-soaa?"
            )
        super().load_own_variables(store)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Creates a SOAA from `get_config()`, refusing newer state layouts."""
        config = dict(config)
        version = config.pop("state_layout_version", 1)
        if version > STATE_LAYOUT_VERSION:
            raise ValueError(
                f"This SOAA config has state layout version {version}, but "
                f"this keras-soaa reads up to version {STATE_LAYOUT_VERSION}: "
                "it was saved by a newer keras-soaa. Upgrade keras-soaa to "
                "load it."
            )
        return super().from_config(config, custom_objects=custom_objects)

    def get_config(self):
        """Returns the config: every constructor argument."""
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
                "radius_bound": self.radius_bound,
                "total_steps": self.total_steps,
                "initial_radius": self.initial_radius,
                "state_layout_version": STATE_LAYOUT_VERSION,
            }
        )
        return config

