"""`SOAA`: Adam moments, a diagonal Fisher estimate and an adaptive trust region."""

import functools
import warnings

import keras
from keras import ops

from keras_soaa import backends, maths, trust_region, validation
from keras_soaa._keras_internals import in_stateless_scope, variable_layout
from keras_soaa.compile import CompiledCache, compile_state_update, read_value

# Bumped whenever the optimizer's variables change (number, order, meaning),
# so that a file saved by a newer keras-soaa is refused, not mis-loaded: Keras
# restores optimizer variables by position. Version 1: the paper controller's
# five scalars; version 2 adds the hypergradient controller's three sums
# (only `controller="hypergradient"` has them: a version-1 file is a paper
# one and loads as before); version 3 the gradient-ratio controller's two
# sums and two averages (only `controller="gradient_ratio"`).
STATE_LAYOUT_VERSION = 3
# The state layout each controller saves.
CONTROLLER_LAYOUT_VERSIONS = {"paper": 1, "hypergradient": 2, "gradient_ratio": 3}

# The controller's scalar variables, in the order they are created and saved.
SCALAR_STATE_NAMES = trust_region.STATE_NAMES
# The gradient-driven controllers' per-step sums and running averages,
# created after them.
HYPERGRADIENT_SUM_NAMES = tuple(
    f"hypergradient_{name}" for name in trust_region.HypergradientSums._fields
)
RATIO_SUM_NAMES = tuple(
    f"ratio_{name}" for name in trust_region.RatioSums._fields
)
RATIO_AVERAGE_NAMES = tuple(
    f"ratio_{name}_average" for name in trust_region.RatioAverages._fields
)
GRADIENT_CONTROLLER_VARIABLES = {
    "hypergradient": (HYPERGRADIENT_SUM_NAMES, ()),
    "gradient_ratio": (RATIO_SUM_NAMES, RATIO_AVERAGE_NAMES),
}


def moment_dtype(dtype):
    """The dtype of `m`, `v` and the update of a variable of `dtype`.

    float32 for float16 and bfloat16: `g**2` overflows float16 for |g| > 256,
    and nothing non-finite may reach the optimizer state.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in maths.LARGEST_FINITE else dtype


def _tf_eager_without_strategy():
    """True when TensorFlow runs eagerly outside any `tf.distribute` scope."""
    import tensorflow as tf

    return tf.executing_eagerly() and not tf.distribute.has_strategy()


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

    With `controller="hypergradient"` the radius follows the gradients
    instead, and observed losses only feed the logs. After every step, with
    `q_prev = m_old / (sqrt(v_old / (1 - beta_2**(t-1))) + epsilon)` (the
    previous step's Adam direction, up to a positive factor) summed over the
    variables:

    ```
    cos   = sum(g * q_prev) / (sqrt(sum(g**2)) * sqrt(sum(q_prev**2)))
    log d = clip(log d + radius_learning_rate * cos,
                 log(min_radius), log(max_radius))
    ```

    (hypergradient descent on `log d`: `d` grows while the gradient keeps
    pointing along the last step, and shrinks when the step overshot).

    With `controller="gradient_ratio"` (a trust region judged by the
    gradients) the previous step's actual reduction, as this step's gradient
    sees it (trapezoid rule), is compared with its predicted one; both are
    averaged over steps before the ratio is taken (`t` the step number,
    `b = 1 - beta_1**(t-1)`; `q_prev / b` is the previous Adam direction,
    `m_old / b` the previous `m_hat`):

    ```
    A   = 0.9 * A + 0.1 * sum(g * q_prev) / b
    P   = 0.9 * P + 0.1 * sum(m_old * q_prev) / b**2
    rho = (1 + A / P) / 2
    log d = clip(log d + radius_learning_rate * ([rho > 0.5] - [rho < 0.1]),
                 log(min_radius), log(max_radius))
    ```

    (a step is skipped by the averages when `P`'s term is 0 or a sum is not
    finite). The thresholds 0.1 and 0.5 bracket `rho` at a well-tuned
    constant rate (README, "Trust-region controllers"): `d` grows while
    steps keep reducing the loss as predicted, shrinks when they overshoot,
    and holds in between. Its radius does not decay by itself: use it with a
    decaying learning-rate schedule (e.g. cosine).

    A variable whose gradient holds a NaN or an infinity is left exactly as
    it was for that step (weights, moments, no weight decay, nothing added to
    the predicted reduction); so is one whose `g**2` overflows the moments'
    dtype (|g| > ~1.8e19 for float32), and every variable when the learning
    rate is not finite. The check is the sums `c` needs anyway; with finite
    sums the step is bounded and is applied (a non-finite predicted
    reduction is then just not added). A non-finite loss (or one beyond
    float32's range) is not averaged in and sets the radius to its lower
    bound. Variables of dtype float16 or bfloat16 keep `m` and `v` in
    float32 and are updated in float32, rounding only the new weight to
    their dtype (saturating at its largest finite value).

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
        controller: `"paper"` (the paper's loss-ratio controller, fed by
            `observe_loss` / `TrustRegionCallback`), `"hypergradient"` or
            `"gradient_ratio"` (the radius adapts from the gradients at
            every step; no observed loss needed). Defaults to `"paper"`.
        radius_learning_rate: Float >= 0. The gradient-driven controllers'
            step on `log d` (per unit cosine for `"hypergradient"`, per
            step for `"gradient_ratio"`). Defaults to `0.05`.
        min_radius: Float > 0. The gradient-driven controllers' lower bound
            on `d`. Defaults to `0.1`.
        max_radius: Float >= `min_radius`. Its upper bound. Defaults to
            `10.0`. `radius_bound` and `total_steps` only concern the
            paper controller.
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
        controller="paper",
        radius_learning_rate=0.05,
        min_radius=0.1,
        max_radius=10.0,
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
        validation.validate_hyperparameters(
            learning_rate, beta_1, beta_2, epsilon, radius_bound, total_steps,
            initial_radius, weight_decay,
        )
        validation.validate_controller(
            controller, radius_learning_rate, min_radius, max_radius,
            initial_radius,
        )
        if validation.is_real_number(learning_rate):
            # The base class takes Python floats only; an int or a NumPy
            # scalar is just as clear.
            learning_rate = float(learning_rate)
        # NumPy scalars become Python numbers: `get_config` must stay JSON.
        number = validation.python_number
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
        self.controller_name = controller
        self.radius_learning_rate = float(radius_learning_rate)
        self.min_radius = float(min_radius)
        self.max_radius = float(max_radius)
        # Python-side bookkeeping for the one-time "no loss is ever observed"
        # warning (see the class docstring); not part of the saved state.
        self._loss_observer_attached = False
        self._loss_observed = False
        self._warned_no_loss_observed = False
        self._compiled = CompiledCache()

    def build(self, var_list):
        """Creates `m` and `v` per variable and the five controller scalars.

        Args:
            var_list: list of model variables to build SOAA variables on.
        """
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = [], []
        for variable in var_list:
            # As `add_optimizer_variables`, with the dtype of `moment_dtype`.
            for slots, name in (
                (self._momentums, "momentum"),
                (self._velocities, "velocity"),
            ):
                slots.append(
                    None
                    if self._overwrite_variable_with_gradient(variable)
                    else self.add_variable(
                        shape=variable.shape,
                        dtype=moment_dtype(variable.dtype),
                        name=f"{variable.path.replace('/', '_')}_{name}",
                        layout=variable_layout(variable),
                    )
                )
        for name in SCALAR_STATE_NAMES:
            variable = self.add_variable(
                shape=(),
                initializer=keras.initializers.Constant(
                    self.initial_radius if name == "radius" else 0.0
                ),
                dtype="float32",
                aggregation="only_first_replica",
                name=name,
            )
            setattr(self, f"_{name}", variable)
        sum_names, average_names = GRADIENT_CONTROLLER_VARIABLES.get(
            self.controller_name, ((), ())
        )
        self._gradient_sums, self._gradient_averages = (
            tuple(
                self.add_variable(
                    shape=(), initializer="zeros", dtype="float32",
                    aggregation="only_first_replica", name=name,
                )
                for name in names
            )
            or None
            for names in (sum_names, average_names)
        )

    def apply(self, grads, trainable_variables=None):
        """Applies one step (see `keras.optimizers.Optimizer.apply`).

        Warns once per optimizer if the trust region will never see a loss
        (see the class docstring).
        """
        self._warn_once_if_no_loss_is_observed()
        return super().apply(grads, trainable_variables)

    def attach_loss_observer(self):
        """Declares that losses will be observed (no warning then).

        `TrustRegionCallback` calls it before training; a custom feeder of
        `observe_loss` may too.
        """
        self._loss_observer_attached = True

    def _warn_once_if_no_loss_is_observed(self):
        # Runs in Python: eagerly at every `apply`, compiled only at trace
        # time, which is all a once-per-optimizer warning needs.
        if (
            self._warned_no_loss_observed
            or self._loss_observer_attached
            or self._loss_observed
            or self.total_steps is not None
            or self.controller_name != "paper"  # adapts without losses
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

    def controller(self):
        """The controller for the current hyperparameters.

        A pure `(state, loss, iterations) -> state` that observes one loss
        (`trust_region.PaperController` or
        `trust_region.HypergradientController`), hashable: equal
        configurations give equal controllers. `observe_loss` and
        `TrustRegionCallback` run it.
        """
        gradient_controllers = {
            "hypergradient": trust_region.HypergradientController,
            "gradient_ratio": trust_region.GradientRatioController,
        }
        if self.controller_name in gradient_controllers:
            return gradient_controllers[self.controller_name](
                radius_learning_rate=self.radius_learning_rate,
                min_radius=self.min_radius,
                max_radius=self.max_radius,
                beta_1=self.beta_1,
            )
        return trust_region.PaperController(
            total_steps=self.total_steps,
            radius_bound=self.radius_bound,
            beta_1=self.beta_1,
            epsilon=self.epsilon,
        )

    def trust_region_state(self) -> trust_region.TrustRegionState:
        """The controller's state: the values of the five scalars."""
        return trust_region.TrustRegionState(
            *(read_value(getattr(self, name)) for name in SCALAR_STATE_NAMES)
        )

    def assign_trust_region_state(self, state: trust_region.TrustRegionState):
        """Writes `state` into the five scalar variables."""
        for name, value in zip(SCALAR_STATE_NAMES, state):
            getattr(self, name).assign(value)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        fused = backends.fused_update_step()
        if keras.backend.backend() == "tensorflow" and _tf_eager_without_strategy():
            # Op by op, each elementwise op of `update_step` is a pass over
            # memory; XLA fuses them, as it does in a compiled `fit`.
            variables = list(trainable_variables)
            update = self._compiled.get(
                ("update", *map(id, variables)),
                lambda: compile_state_update(
                    lambda grads, lr: (grads, variables, lr, fused),
                    self._update_variables,
                    lambda _: None,
                    jit_compile=True,
                ),
            )
            update(list(grads), ops.convert_to_tensor(learning_rate))
        else:
            self._update_variables(grads, trainable_variables, learning_rate, fused)

    def _update_variables(self, grads, trainable_variables, learning_rate, fused):
        """Updates every variable, then (gradient-driven) adapts the radius.

        `fused` is the backend's fused update step, or `None` for the
        per-variable `update_step`.
        """
        if fused is not None:
            self._fused_update(fused, grads, trainable_variables, learning_rate)
        else:
            super()._backend_update_step(grads, trainable_variables, learning_rate)
        if self._gradient_sums is not None:
            self._adapt_radius_to_gradients()

    def _adapt_radius_to_gradients(self):
        """The gradient-driven controller's step, from this step's sums."""
        controller = self.controller()
        sums = controller.sums_type(*map(read_value, self._gradient_sums))
        averages = None
        if self._gradient_averages is not None:
            averages = controller.averages_type(
                *map(read_value, self._gradient_averages)
            )
        radius, averages = controller.adapt(
            self._radius, averages, sums, self.iterations
        )
        self._radius.assign(radius)
        for variable, value in zip(self._gradient_averages or (), averages or ()):
            variable.assign(value)
        for variable in self._gradient_sums:
            variable.assign(0.0)

    def _fused_update(self, fused, grads, trainable_variables, learning_rate):
        """Runs `fused` once per compute dtype over the non-empty variables."""
        groups = {}
        for grad, variable in zip(grads, trainable_variables):
            if 0 in tuple(variable.shape):
                continue  # no element: nothing to update, nothing predicted
            index = self._get_variable_index(variable)
            dtype = self._momentums[index].dtype
            groups.setdefault(dtype, []).append((grad, variable, index))
        for dtype, members in groups.items():
            predicted, gradient_sums = fused(
                [ops.convert_to_tensor(grad) for grad, _, _ in members],
                [variable.value for _, variable, _ in members],
                [self._momentums[i].value for _, _, i in members],
                [self._velocities[i].value for _, _, i in members],
                [self._weight_decay_of(variable) for _, variable, _ in members],
                self._fused_step_scalars(learning_rate, dtype),
                beta_1=self.beta_1,
                beta_2=self.beta_2,
                epsilon=self.epsilon,
                gradient_sums=(
                    None if self._gradient_sums is None else self.controller_name
                ),
            )
            self._predicted_reduction.assign_add(predicted)
            if gradient_sums is not None:
                for variable, value in zip(self._gradient_sums, gradient_sums):
                    variable.assign_add(value)

    def _fused_step_scalars(self, learning_rate, dtype):
        """`_step_scalars` compiled: the fused path runs outside any graph."""
        step_scalars = self._compiled.get(
            ("step_scalars", dtype),
            lambda: compile_state_update(
                lambda learning_rate: (
                    ops.convert_to_tensor(learning_rate),
                    ops.convert_to_tensor(self.iterations),
                    ops.convert_to_tensor(self._radius),
                ),
                functools.partial(
                    maths.step_scalars, beta_1=self.beta_1, beta_2=self.beta_2,
                    dtype=dtype,
                ),
                lambda scalars: scalars,
            ),
        )
        return step_scalars(learning_rate)

    def _apply_weight_decay(self, variables):
        # Weight decay is applied in `update_step` instead, where a step that
        # is skipped for a non-finite gradient can skip it too.
        return

    def _weight_decay_of(self, variable):
        """`weight_decay` for `variable`, or `None` if it is not decayed."""
        if self.weight_decay is None or not self._use_weight_decay(variable):
            return None
        return self.weight_decay

    def _step_scalars(self, learning_rate, dtype):
        return maths.step_scalars(
            learning_rate, self.iterations, self._radius,
            self.beta_1, self.beta_2, dtype,
        )

    def _add_gradient_sums(self, gradient, m, v, scalars, is_finite):
        """Adds one variable's controller sums (from the old moments)."""
        step_sums = self.controller().step_sums(gradient, m, v, scalars, self.epsilon)
        for total, value in zip(self._gradient_sums, step_sums):
            self.assign_add(
                total, maths.finite_or_zero(ops.cast(value, "float32"), is_finite)
            )

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        if 0 in tuple(variable.shape):
            # No element: nothing to update, nothing predicted (and Keras'
            # TensorFlow `ops.add` fails on some empty shapes, e.g. (0, 2)).
            return
        index = self._get_variable_index(variable)
        m_variable, v_variable = self._momentums[index], self._velocities[index]
        dtype = m_variable.dtype  # the compute dtype (`moment_dtype`)
        scalars = self._step_scalars(learning_rate, dtype)
        gradient = ops.cast(gradient, dtype)
        m = ops.convert_to_tensor(m_variable)
        v = ops.convert_to_tensor(v_variable)
        old_theta = ops.convert_to_tensor(variable)

        new_m, new_v = maths.moments(m, v, gradient, self.beta_1, self.beta_2)
        decided_by_moments = self.beta_1 <= self.beta_2
        if decided_by_moments:
            # The skip rule's decision, known before the sums: the new
            # moments then go straight to their variables, with no array
            # held back until the sums are done (XLA on CPU maps and faults
            # in a fresh buffer for each such array, at every step).
            is_finite = maths.moments_are_finite(new_v, scalars)
            new_m = ops.where(is_finite, new_m, m)
            new_v = ops.where(is_finite, new_v, v)
        sums = maths.curvature_sums(new_m, new_v)
        size = ops.cast(ops.size(new_v), dtype)
        c, sum_v_hat_eps = maths.curvature_scale(sums, size, scalars, self.epsilon)
        quotient = maths.step_quotient(new_m, new_v, c, scalars, self.epsilon)
        new_theta = maths.new_weight(
            ops.cast(old_theta, dtype), quotient, scalars,
            self._weight_decay_of(variable), variable.dtype,
        )
        predicted = maths.predicted_reduction(
            *maths.predicted_reduction_sums(new_m, new_v, quotient), scalars
        )
        if not decided_by_moments:
            is_finite = maths.is_finite_step(c, sum_v_hat_eps, scalars)
            new_m = ops.where(is_finite, new_m, m)
            new_v = ops.where(is_finite, new_v, v)
        if self._gradient_sums is not None:
            # Before `m` and `v` are assigned: on torch that writes in place.
            self._add_gradient_sums(gradient, m, v, scalars, is_finite)

        self.assign(m_variable, new_m)
        self.assign(v_variable, new_v)
        self.assign(variable, ops.where(is_finite, new_theta, old_theta))
        self.assign_add(
            self._predicted_reduction, maths.finite_or_zero(predicted, is_finite)
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
        if self.total_steps is None and self.controller_name == "paper":
            raise ValueError(
                "SOAA needs `total_steps` to schedule its radius bounds. Pass "
                "`SOAA(total_steps=...)` (the number of optimizer steps of the "
                "run), or train with `model.fit(..., "
                "callbacks=[keras_soaa.TrustRegionCallback()])`, which sets it "
                "from the epochs and steps per epoch."
            )
        loss = validation.loss_as_float32_scalar(loss)
        self._loss_observed = True
        controller = self.controller()
        if in_stateless_scope():
            # The scope must see the assignments themselves, not a graph's.
            self.assign_trust_region_state(
                controller(self.trust_region_state(), loss, self.iterations)
            )
            return
        observe = self._compiled.get(
            ("observe", controller),
            lambda: compile_state_update(
                self._controller_inputs, controller, self.assign_trust_region_state
            ),
        )
        observe(loss)

    def _controller_inputs(self, loss):
        return self.trust_region_state(), loss, read_value(self.iterations)

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
                f"{self.state_layout_version}). Was it saved with other options "
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

    @property
    def state_layout_version(self) -> int:
        """The state layout this configuration saves (see the module top)."""
        return CONTROLLER_LAYOUT_VERSIONS[self.controller_name]

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
                "controller": self.controller_name,
                "radius_learning_rate": self.radius_learning_rate,
                "min_radius": self.min_radius,
                "max_radius": self.max_radius,
                "state_layout_version": self.state_layout_version,
            }
        )
        return config

