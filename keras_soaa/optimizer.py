"""`SOAA`: Adam moments, a diagonal Fisher estimate and an adaptive trust region."""

import warnings

import keras
from keras import ops

from keras_soaa import _keras_internals as internals
from keras_soaa import backends, controllers, maths, validation
from keras_soaa.compile import CompiledCache, compile_state_update, read_value
from keras_soaa.controllers import Observer, Settings, TrustRegionState

# The newest state layout this keras-soaa reads: a file saved by a newer one
# is refused, not mis-loaded (Keras restores optimizer variables by
# position). Each controller says which layout it saves.
STATE_LAYOUT_VERSION = 3


def moment_dtype(dtype):
    """The dtype of `m`, `v` and the update of a variable of `dtype`.

    float32 for float16 and bfloat16: `g**2` overflows float16 for |g| > 256,
    and nothing non-finite may reach the optimizer state.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in maths.LARGEST_FINITE else dtype


@keras.saving.register_keras_serializable(package="keras_soaa")
class SOAA(keras.optimizers.Optimizer):
    """SOAA: second-order adaptive Adam with an adaptive trust region.

    SOAA ("Efficient Second-Order Neural Network Optimization via Adaptive
    Trust Region Methods", arXiv 2410.02293) preconditions Adam's moments with
    a diagonal Fisher estimate (O(n) memory and time) and scales each step by
    a trust-region radius `d`, which its controller adapts.

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

    The controller moves `d` (`keras_soaa.controllers`); the default, the
    paper's, needs the losses (`keras_soaa.TrustRegionCallback` in `fit`,
    `observe_loss` in a custom loop). A variable whose gradient is not finite
    keeps its weights and state for that step.

    Args:
        learning_rate: A float > 0, a `LearningRateSchedule`, or a callable
            of no arguments returning the rate. Defaults to `0.001`.
        beta_1: Float in `[0, 1)`: decay of `m` and of the observed-loss
            average. Defaults to `0.9`.
        beta_2: Float in `[0, 1)`: decay of `v`. Defaults to `0.999`.
        epsilon: Float > 0 for numerical stability, also the floor of the
            predicted reduction in the paper's ratio. Defaults to `1e-8`.
        radius_bound: Float in `(0, 1)`: the paper controller's bounds on `d`
            narrow from `[1, 2]` to `[1 - radius_bound, 1 + radius_bound]`
            over `total_steps`. Defaults to `0.1`.
        total_steps: `None` or an integer >= 1, set by `TrustRegionCallback`
            from `fit` when `None`. Defaults to `None`.
        initial_radius: Float > 0: `d` before it adapts. Defaults to `1.0`.
        controller: A registered name (`keras_soaa.controllers.names()`)
            or a `keras_soaa.controllers.Controller`. Defaults to the
            paper's (`keras_soaa.controllers.DEFAULT`).
        radius_learning_rate: Float >= 0: the gradient-driven controllers'
            step on `log d`. Defaults to `0.05`.
        min_radius: Float > 0: their lower bound on `d`. Defaults to `0.1`.
        max_radius: Float >= `min_radius`: their upper bound. Defaults to
            `10.0`.
        fused: `None` for the backend's fast path where it has one (torch:
            multi-tensor kernels; eager TensorFlow: one XLA call), `False`
            for the portable per-variable `update_step`. Defaults to `None`.
        weight_decay: `None` or a float >= 0: decoupled weight decay,
            `theta -= learning_rate * weight_decay * theta` in the step.
        **kwargs: `clipnorm`, `clipvalue`, `global_clipnorm`, `use_ema`,
            `ema_momentum`, `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`, `name`: as in Keras' `Optimizer`.
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
        controller=controllers.DEFAULT,
        radius_learning_rate=0.05,
        min_radius=0.1,
        max_radius=10.0,
        fused=None,
        weight_decay=None,
        **kwargs,
    ):
        validation.validate_hyperparameters(
            learning_rate, beta_1, beta_2, epsilon, radius_bound, total_steps,
            initial_radius, weight_decay, radius_learning_rate, min_radius,
            max_radius, fused,
        )
        controller = controllers.get(controller)
        number = validation.python_number  # `get_config` must stay JSON
        super().__init__(
            learning_rate=validation.as_base_learning_rate(learning_rate),
            weight_decay=number(weight_decay),
            **{key: number(value) for key, value in kwargs.items()},
        )
        self.beta_1 = float(beta_1)
        self.beta_2 = float(beta_2)
        self.epsilon = float(epsilon)
        self.radius_bound = float(radius_bound)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.initial_radius = float(initial_radius)
        self.radius_learning_rate = float(radius_learning_rate)
        self.min_radius = float(min_radius)
        self.max_radius = float(max_radius)
        self.fused = fused
        self.controller = controller
        controller.validate(self.settings)
        # For the one-time warning of `apply`; not part of the saved state.
        self._loss_observer_attached = self._loss_observed = False
        self._warned_no_loss_observed = False
        self._compiled = CompiledCache()

    @property
    def settings(self) -> Settings:
        """The hyperparameters the controller reads, as they are now."""
        return Settings(
            self.beta_1, self.epsilon, self.total_steps, self.radius_bound,
            self.initial_radius, self.radius_learning_rate, self.min_radius,
            self.max_radius,
        )

    def build(self, var_list):
        """Creates `m`, `v` per variable, the five shared scalars, the controller's.

        Args:
            var_list: list of model variables to build SOAA variables on.
        """
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = [], []
        for variable in var_list:
            # As `add_optimizer_variables`, with the dtype of `moment_dtype`.
            for slots, name in ((self._momentums, "momentum"),
                                (self._velocities, "velocity")):
                slots.append(None if internals.overwritten_with_gradient(
                    self, variable) else self.add_variable(
                        shape=variable.shape, dtype=moment_dtype(variable.dtype),
                        name=f"{variable.path.replace('/', '_')}_{name}",
                        layout=internals.variable_layout(variable),
                ))
        scalars = [
            self.add_variable(
                shape=(), dtype="float32", aggregation="only_first_replica",
                initializer=keras.initializers.Constant(
                    self.initial_radius if name == "radius" else 0.0),
                name=name,
            )
            for name in (*TrustRegionState._fields, *self.controller.variable_names())
        ]
        self._state = TrustRegionState(*scalars[:5])
        self._controller_sums = scalars[5:5 + len(self.controller.sums)]
        self._controller_state = scalars[5 + len(self.controller.sums):]

    def apply(self, grads, trainable_variables=None):
        """Applies one step (see `keras.optimizers.Optimizer.apply`).

        Warns once per optimizer if its controller needs losses and none
        will be observed (no `TrustRegionCallback` attached, `observe_loss`
        never called and `total_steps` `None`: typically `fit` without the
        callback).
        """
        if not (self._warned_no_loss_observed or self._loss_observer_attached
                or self._loss_observed or self.total_steps is not None
                or not self.controller.adapts_from_losses):
            self._warned_no_loss_observed = True
            warnings.warn(validation.no_loss_observed_message(self), UserWarning,
                          stacklevel=2)
        return super().apply(grads, trainable_variables)

    def attach_loss_observer(self):
        """Declares that losses will be observed (no warning then)."""
        self._loss_observer_attached = True

    radius = property(lambda self: self._state.radius,
                      doc="The trust-region radius `d` (a float32 scalar variable).")
    loss_average = property(lambda self: self._state.loss_average,
                            doc="The average of observed losses, not bias-corrected.")
    loss_count = property(lambda self: self._state.loss_count,
                          doc="The number of finite losses observed.")
    predicted_reduction = property(
        lambda self: self._state.predicted_reduction,
        doc="The reduction predicted by the steps since the last observation.")
    previous_predicted_reduction = property(
        lambda self: self._state.previous_predicted_reduction,
        doc="What `predicted_reduction` was at the last observation.")

    def controller_state(self) -> dict:
        """The controller's own variables (its `sums`, then its `state`) by name."""
        return dict(zip(self.controller.variable_names(),
                        (*self._controller_sums, *self._controller_state)))

    def trust_region_state(self) -> TrustRegionState:
        """The values of the five scalars every controller shares."""
        return TrustRegionState(*map(read_value, self._state))

    def assign_trust_region_state(self, state: TrustRegionState):
        """Writes `state` into the five scalar variables."""
        for variable, value in zip(self._state, state):
            variable.assign(value)

    def loss_observer(self) -> Observer:
        """The controller's `observe` for the current hyperparameters (hashable)."""
        return Observer(self.controller, self.settings)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        backends.update_variables(self, grads, trainable_variables, learning_rate)

    def _apply_weight_decay(self, variables):
        # In `update_step` instead, where a skipped step skips it too.
        return

    def weight_decay_of(self, variable):
        """`weight_decay` for `variable`, or `None` if it is not decayed."""
        decayed = self.weight_decay is not None and internals.uses_weight_decay(
            self, variable)
        return self.weight_decay if decayed else None

    def moments_of(self, variable):
        """The `(m, v)` variables of `variable`."""
        index = internals.variable_index(self, variable)
        return self._momentums[index], self._velocities[index]

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        if 0 in tuple(variable.shape):
            # No element: nothing to update, nothing predicted (and Keras'
            # TensorFlow `ops.add` fails on some empty shapes, e.g. (0, 2)).
            return
        m_variable, v_variable = self.moments_of(variable)
        dtype = m_variable.dtype  # the compute dtype (`moment_dtype`)
        scalars = maths.step_scalars(learning_rate, self.iterations, self.radius,
                                     self.beta_1, self.beta_2, dtype)
        gradient = ops.cast(gradient, dtype)
        m = ops.convert_to_tensor(m_variable)
        v = ops.convert_to_tensor(v_variable)
        old_theta = ops.convert_to_tensor(variable)

        new_m, new_v = maths.moments(m, v, gradient, self.beta_1, self.beta_2)
        skip_known_early = self.beta_1 <= self.beta_2
        if skip_known_early:
            # The skip rule's decision before the sums: the new moments then
            # go straight to their variables, with no array held back until
            # the sums are done.
            is_finite = maths.moments_are_finite(new_v, scalars)
            new_m = ops.where(is_finite, new_m, m)
            new_v = ops.where(is_finite, new_v, v)
        sums = maths.curvature_sums(new_m, new_v)
        size = ops.cast(ops.size(new_v), dtype)
        c, sum_v_hat_eps = maths.curvature_scale(sums, size, scalars, self.epsilon)
        direction = maths.step_direction(new_m, new_v, c, scalars, self.epsilon)
        new_theta = maths.new_weight(
            ops.cast(old_theta, dtype), direction, scalars,
            self.weight_decay_of(variable), variable.dtype,
        )
        predicted = maths.predicted_reduction(
            *maths.predicted_reduction_sums(new_m, new_v, direction), scalars
        )
        if not skip_known_early:
            is_finite = maths.is_finite_step(c, sum_v_hat_eps, scalars)
            new_m = ops.where(is_finite, new_m, m)
            new_v = ops.where(is_finite, new_v, v)
        # Before `m` and `v` are assigned: on torch that writes in place.
        step_sums = controllers.base.step_sums(
            self.controller.sums, gradient, m, v, scalars, self.epsilon)
        for total, value in zip(self._controller_sums, step_sums):
            self.assign_add(total, maths.finite_or_zero(
                ops.cast(value, "float32"), is_finite))

        self.assign(m_variable, new_m)
        self.assign(v_variable, new_v)
        self.assign(variable, ops.where(is_finite, new_theta, old_theta))
        self.assign_add(self.predicted_reduction,
                        maths.finite_or_zero(predicted, is_finite))

    def adapt_radius(self):
        """The controller's step, once per step after the variables' updates."""
        controllers.base.adapt(self.controller, self.radius, self._controller_sums,
                               self._controller_state, self.iterations,
                               self.settings)

    def observe_loss(self, loss):
        """Feeds one observed training loss to the trust-region controller.

        Call it after `apply` (`TrustRegionCallback` does in `fit`): `loss`
        is the mean training loss of the step(s) applied since the previous
        call, at the weights before them. A non-finite loss is not averaged.

        Args:
            loss: a real number: a Python or NumPy scalar, or a scalar tensor
                of a float or integer dtype.

        Raises:
            ValueError: if the optimizer is not built yet, if its controller
                needs `total_steps` and it is `None`, or if `loss` is not one
                real number. The state is left untouched then.
        """
        validation.require_ready_to_observe(self)
        loss = validation.loss_as_float32_scalar(loss)
        self._loss_observed = True
        observer = self.loss_observer()
        if internals.in_stateless_scope():
            # The scope must see the assignments themselves, not a graph's.
            self.assign_trust_region_state(
                observer(self.trust_region_state(), loss, self.iterations))
            return
        self._compiled.get(("observe", observer), lambda: compile_state_update(
            lambda loss: (self.trust_region_state(), loss,
                          read_value(self.iterations)),
            observer, self.assign_trust_region_state,
        ))(loss)

    def stateless_observe_loss(self, optimizer_variables, loss):
        """Stateless `observe_loss`, for JAX training loops under `jax.jit`.

        Args:
            optimizer_variables: the values of `self.variables`, as
                `stateless_apply` returns them.
            loss: the observed loss.

        Returns:
            The new values of `self.variables`.
        """
        with keras.StatelessScope(
                state_mapping=list(zip(self.variables, optimizer_variables))) as scope:
            self.observe_loss(loss)
        return [scope.get_current_value(v) for v in self.variables]

    def load_own_variables(self, store):
        """Restores the variables; refuses a saved state of another size.

        Keras would only warn and keep the fresh state: a resumed run would
        silently restart the trust region.
        """
        if self.built:
            validation.require_same_state_size(self, len(store.keys()))
        super().load_own_variables(store)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Creates a SOAA from `get_config()`, refusing newer state layouts."""
        config = dict(config)
        validation.require_readable_layout(
            config.pop("state_layout_version", 1), STATE_LAYOUT_VERSION)
        return super().from_config(config, custom_objects=custom_objects)

    def get_config(self):
        """Returns the config: every constructor argument."""
        own = ("beta_1", "beta_2", "epsilon", "radius_bound", "total_steps",
               "initial_radius", "radius_learning_rate", "min_radius",
               "max_radius", "fused")
        return {
            **super().get_config(), **{name: getattr(self, name) for name in own},
            "controller": controllers.serialize(self.controller),
            "state_layout_version": self.controller.state_layout_version,
        }
