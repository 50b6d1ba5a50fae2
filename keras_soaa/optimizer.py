"""`SOAA`: Adam moments, a diagonal Fisher estimate and an adaptive trust region."""

import functools
import warnings
from collections import namedtuple
from typing import NamedTuple

import keras
from keras import ops

from keras_soaa import _keras_internals as internals
from keras_soaa import _migration, backends, controllers, maths, validation
from keras_soaa.compile import (
    CompiledCache,
    assign_values,
    compile_state_update,
    read_value,
)

# The state layout this keras-soaa saves (docs/saving.md, "State layout"):
# Keras restores optimizer variables by position, so their order is a file
# format. `_migration` reads the older ones.
STATE_LAYOUT_VERSION = _migration.STATE_LAYOUT_VERSION


def moment_dtype(dtype):
    """The dtype of `m`, `v` and the update of a variable of `dtype`.

    float32 for float16 and bfloat16: `g**2` overflows float16 for |g| > 256,
    and nothing non-finite may reach the optimizer state.
    """
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in maths.LARGEST_FINITE else dtype


@functools.cache
def _named(names: tuple[str, ...]):
    # The named tuple type of a controller's `sums` or `state`.
    return namedtuple("Values", names)


def _controller_update(controller, context, values, loss=None):
    """`controller.update` on its flat values `(radius, *sums, *state)` (pure).

    Returns the new flat values, the sums cleared: they total the steps
    since the controller's last update.
    """
    count = len(controller.sums)
    sums, state = values[1:1 + count], values[1 + count:]
    radius, state = controller.update(
        values[0], _named(controller.state)(*state),
        _named(tuple(s.name for s in controller.sums))(*sums), context, loss,
    )
    return (radius, *map(ops.zeros_like, sums), *state)


class _LossUpdate(NamedTuple):
    """The update for one observed loss, `(values, loss, iterations) -> values`.

    Hashable: it keys the compiled function of whoever feeds losses.
    """

    controller: controllers.Controller
    total_steps: int | None
    beta_1: float
    epsilon: float

    def takes(self, loss) -> bool:
        """Whether the controller reads `loss` (a loss or a `LossPair`)."""
        controller = self.controller
        return (controller.needs_loss_pair if isinstance(loss, controllers.LossPair)
                else controller.needs_loss)

    def context(self, step) -> controllers.Context:
        """The `Context` at step `step` (t, as a float32 scalar)."""
        return controllers.Context(ops.cast(step, "float32"), *self[1:])

    def __call__(self, values, loss, iterations):
        """The controller's new flat values (unchanged unless it `takes` `loss`)."""
        if not self.takes(loss):
            return values
        return _controller_update(self.controller, self.context(iterations), values,
                                  loss)


def _controller_variable(name):
    # A property for a variable that the paper's controller (docs/algorithm.md's
    # public names) has; other controllers may not.
    def get(self):
        variables = self.controller_state()
        if name not in variables:
            raise AttributeError(
                f"SOAA's controller {self.controller!r} keeps no `{name}`; "
                f"its variables: {', '.join(variables)}.")
        return variables[name]

    return property(get, doc=f"The controller's `{name}` variable (paper's).")


@keras.saving.register_keras_serializable(package="keras_soaa")
class SOAA(keras.optimizers.Optimizer):
    """SOAA: second-order adaptive Adam with an adaptive trust region.

    SOAA ("Efficient Second-Order Neural Network Optimization via Adaptive
    Trust Region Methods", arXiv 2410.02293) preconditions Adam's moments with
    a diagonal Fisher estimate (O(n) memory and time) and scales each step by
    a trust-region radius `d`, which its controller adapts.

    For every variable `theta` with gradient `g`, at step `t`
    (docs/algorithm.md, "One step"):

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
        total_steps: `None` or an integer >= 1: the number of optimizer
            steps of the run, set by `TrustRegionCallback` from `fit` when
            `None`. Defaults to `None`.
        initial_radius: Float > 0: `d` before it adapts. Defaults to `1.0`.
        controller: A registered name (`keras_soaa.controllers.names()`)
            or a `keras_soaa.controllers.Controller`, which holds its own
            constants (e.g. `PaperController(radius_bound=0.1)`). Defaults
            to the paper's.
        fused: `None` for the backend's fast path where it has one (torch:
            multi-tensor kernels; eager TensorFlow: one XLA call), `True` for
            that path compiled (torch: with `torch.compile`, which takes
            seconds at the first step and a C++ compiler, and makes each
            step of a small model several times faster; elsewhere as
            `None`), `False` for the portable per-variable `update_step`.
            Defaults to `None`.
        weight_decay: `None` or a float >= 0: decoupled weight decay,
            `theta -= learning_rate * weight_decay * theta` in the step.
        **kwargs: `clipnorm`, `clipvalue`, `global_clipnorm`, `use_ema`,
            `ema_momentum`, `ema_overwrite_frequency`, `loss_scale_factor`,
            `gradient_accumulation_steps`, `name`: as in Keras' `Optimizer`.
            (`radius_bound`, `radius_learning_rate`, `min_radius` and
            `max_radius` are deprecated: pass them to the controller.)
    """

    def __init__(self, learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-8,
                 total_steps=None, initial_radius=1.0, controller=controllers.DEFAULT,
                 fused=None, weight_decay=None, **kwargs):
        controller = _migration.controller_with_deprecated_arguments(controller, kwargs)
        validation.validate_hyperparameters(
            learning_rate, beta_1, beta_2, epsilon, total_steps, initial_radius,
            weight_decay, fused,
        )
        controller = controllers.get(controller)
        number = validation.python_number  # `get_config` must stay JSON
        super().__init__(
            learning_rate=validation.as_base_learning_rate(learning_rate),
            weight_decay=number(weight_decay),
            **{key: number(value) for key, value in kwargs.items()},
        )
        self.beta_1, self.beta_2 = float(beta_1), float(beta_2)
        self.epsilon = float(epsilon)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.initial_radius = float(initial_radius)
        self.fused = fused
        self.controller = controller
        controller.validate(self.initial_radius)
        # For the one-time warning of `apply` (not saved).
        self._loss_observer_attached = self._loss_observed = False
        self._applies_without_loss = 0
        self._compiled = CompiledCache()

    def build(self, var_list):
        """Creates `m`, `v` per variable, then the radius and the controller's.

        Args:
            var_list: list of model variables to build SOAA variables on.
        """
        if self.built:
            return
        super().build(var_list)

        def scalar(name, value=0.0):
            return self.add_variable(
                shape=(), dtype="float32", aggregation="only_first_replica",
                initializer=keras.initializers.Constant(value), name=name)

        # First: a file of layout 4 or later says so where layouts 1-3 had
        # a moment (`_migration.store_in_current_layout`).
        self._state_layout = scalar("state_layout", float(STATE_LAYOUT_VERSION))
        self._momentums, self._velocities = [], []
        for variable in var_list:
            # As `add_variable_from_reference`, with `moment_dtype`'s dtype
            # (a raw `tf.Variable` has a name but no path).
            path = getattr(variable, "path", None) or variable.name.split(":")[0]
            for slots, name in ((self._momentums, "momentum"),
                                (self._velocities, "velocity")):
                slots.append(None if internals.overwritten_with_gradient(
                    self, variable) else self.add_variable(
                        shape=variable.shape, dtype=moment_dtype(variable.dtype),
                        name=f"{path.replace('/', '_')}_{name}",
                        layout=internals.variable_layout(variable),
                ))
        sums, state = self.controller.sums, self.controller.state
        # The controller's variables, as `_controller_update` takes them.
        self._controller_variables = [scalar("radius", self.initial_radius), *map(
            scalar, (*(s.name for s in sums), *state))]
        self._sums = self._controller_variables[1:1 + len(sums)]

    def apply(self, grads, trainable_variables=None):
        """Applies one step (`keras.optimizers.Optimizer.apply`).

        Warns once if the controller needs losses and none are fed: in
        `fit` without `TrustRegionCallback`; elsewhere at once if it needs
        `total_steps` and has none (`observe_loss` could not run), else at a
        second `apply` with no `observe_loss` after the first.
        """
        controller = self.controller
        if ((controller.needs_loss or controller.needs_loss_pair)
                and not self._loss_observer_attached
                and not self._loss_observed and self._applies_without_loss >= 0):
            self._applies_without_loss += 1
            cannot_observe = (self.total_steps is None
                              and controller.needs_total_steps)
            if (self._applies_without_loss >= 2 or cannot_observe
                    or internals.in_fit()):
                self._applies_without_loss = -1  # once
                warnings.warn(validation.no_loss_observed_message(self),
                              UserWarning, stacklevel=2)
        return super().apply(grads, trainable_variables)

    radius = property(lambda self: self._controller_variables[0],
                      doc="The trust-region radius `d` (a float32 scalar variable).")
    loss_average = _controller_variable("loss_average")
    loss_count = _controller_variable("loss_count")
    predicted_reduction = _controller_variable("predicted_reduction")
    previous_predicted_reduction = _controller_variable("previous_predicted_reduction")

    def controller_state(self) -> dict:
        """The controller's variables by name: its `sums`, then its `state`."""
        controller = self.controller
        names = (*(s.name for s in controller.sums), *controller.state)
        return dict(zip(names, self._controller_variables[1:]))

    def _controller_values(self):
        return tuple(map(read_value, self._controller_variables))

    def _assign_controller_values(self, values):
        assign_values(self._controller_variables, values)

    def _loss_update(self) -> _LossUpdate:
        return _LossUpdate(self.controller, self.total_steps, self.beta_1, self.epsilon)

    def _backend_update_step(self, grads, trainable_variables, learning_rate):
        backends.update_variables(self, grads, trainable_variables, learning_rate)

    def _apply_weight_decay(self, variables):
        # In `update_step` instead, where a skipped step skips it too.
        return

    def _weight_decay_of(self, variable):  # `None` where it is not decayed
        decayed = self.weight_decay is not None and internals.uses_weight_decay(
            self, variable)
        return self.weight_decay if decayed else None

    def _moments_of(self, variable):
        index = internals.variable_index(self, variable)
        return self._momentums[index], self._velocities[index]

    def update_step(self, gradient, variable, learning_rate):
        """Update step given gradient and the associated model variable."""
        if 0 in tuple(variable.shape):  # nothing to update (and Keras' TF
            return  # `ops.add` fails on some empty shapes, e.g. (0, 2))
        m_variable, v_variable = self._moments_of(variable)
        dtype = m_variable.dtype  # the compute dtype (`moment_dtype`)
        scalars = maths.step_scalars(learning_rate, self.iterations, self.radius,
                                     self.beta_1, self.beta_2, dtype)
        gradient = ops.cast(gradient, dtype)
        m, v, old_theta = map(ops.convert_to_tensor, (m_variable, v_variable, variable))

        new_m, new_v = maths.moments(m, v, gradient, self.beta_1, self.beta_2)
        skip_known_early = self.beta_1 <= self.beta_2
        if skip_known_early:
            # The skip rule's decision before the sums (docs/algorithm.md,
            # "Non-finite steps"): the new moments then go straight to their
            # variables, with no array held back until the sums are done.
            is_finite = maths.moments_are_finite(new_v, scalars)
            new_m, new_v = (ops.where(is_finite, new_m, m),
                            ops.where(is_finite, new_v, v))
        sums = maths.curvature_sums(new_m, new_v)
        size = ops.cast(ops.size(new_v), dtype)
        c, sum_v_hat_eps = maths.curvature_scale(sums, size, scalars, self.epsilon)
        direction = maths.step_direction(new_m, new_v, c, scalars, self.epsilon)
        new_theta = maths.new_weight(ops.cast(old_theta, dtype), direction, scalars,
                                     self._weight_decay_of(variable), variable.dtype)
        if not skip_known_early:
            is_finite = maths.is_finite_step(c, sum_v_hat_eps, scalars)
            new_m, new_v = (ops.where(is_finite, new_m, m),
                            ops.where(is_finite, new_v, v))
        # Only the sums the controller reads; before `m` and `v` are
        # assigned: on torch that writes in place.
        totals = maths.step_sums(
            self.controller.sums, gradient, m, v, scalars, self.epsilon,
            lambda kind: maths.prediction(kind, gradient, new_m, new_v, direction,
                                          scalars))
        for total, value in zip(self._sums, totals):
            self.assign_add(total, maths.finite_or_zero(
                ops.cast(value, "float32"), is_finite))
        self.assign(m_variable, new_m)
        self.assign(v_variable, new_v)
        self.assign(variable, ops.where(is_finite, new_theta, old_theta))

    def _after_step(self):
        # After every variable's step: a controller that does not wait for
        # losses updates from the step's sums (`backends.update_variables`).
        if self.controller.needs_loss:
            return
        # `iterations` is incremented after.
        context = self._loss_update().context(ops.add(self.iterations, 1))
        self._assign_controller_values(_controller_update(
            self.controller, context, self._controller_values()))

    def observe_loss(self, loss):
        """Feeds one observed training loss to the trust-region controller.

        Call it after `apply` (`TrustRegionCallback` does in `fit`): `loss`
        is the mean training loss of the step(s) applied since the previous
        call, at the weights before them. A non-finite loss is not averaged.
        A controller that does not need losses ignores them.

        Args:
            loss: a real number: a Python or NumPy scalar, or a scalar tensor
                of a float or integer dtype.

        Raises:
            ValueError: if the optimizer is not built, if its controller needs
                `total_steps` and it is `None`, or if `loss` is not one real
                number (the state is left untouched).
        """
        validation.require_ready_to_observe(self, "observe_loss")
        self._observe(validation.loss_as_float32_scalar(loss))

    def observe_step(self, loss_before, loss_after):
        """Feeds one batch's loss before and after the last step to the controller.

        For a controller with `needs_loss_pair` (`"same_batch"`): call it
        right after `apply`, with the loss of the batch the step's gradients
        came from at the weights before the step (the loss you computed
        them with) and at the weights after it (one more forward pass of
        that batch). `TrustRegionCallback` does it in `fit`. Other
        controllers ignore the pair.

        Args:
            loss_before: a real scalar (as `observe_loss` takes).
            loss_after: a real scalar.

        Raises:
            ValueError: as `observe_loss` (the state is left untouched).
        """
        validation.require_ready_to_observe(self, "observe_step")
        self._observe(controllers.LossPair(
            validation.loss_as_float32_scalar(loss_before, "loss_before"),
            validation.loss_as_float32_scalar(loss_after, "loss_after")))

    def _observe(self, loss):
        # `loss`: a float32 scalar, or a `LossPair` of them.
        update = self._loss_update()
        self._loss_observed = self._loss_observed or update.takes(loss)
        if internals.in_stateless_scope():
            # The scope must see the assignments themselves, not a graph's.
            self._assign_controller_values(
                update(self._controller_values(), loss, self.iterations))
            return
        self._compiled.get((update, type(loss)), lambda: compile_state_update(
            lambda loss: (self._controller_values(), loss,
                          read_value(self.iterations)),
            update, self._assign_controller_values,
        ))(loss)

    def stateless_observe_loss(self, optimizer_variables, loss):
        """Stateless `observe_loss`, for JAX training loops under `jax.jit`.

        Args:
            optimizer_variables: the values of `self.variables`.
            loss: the observed loss.

        Returns:
            The new values of `self.variables`.
        """
        with keras.StatelessScope(
                state_mapping=list(zip(self.variables, optimizer_variables))) as scope:
            self.observe_loss(loss)
        return [scope.get_current_value(v) for v in self.variables]

    def load_own_variables(self, store):
        """Restores the variables of any state layout; refuses another size.

        (Keras would only warn: a resumed run would restart the trust region.)
        """
        if self.built:
            store = _migration.store_in_current_layout(self, store)
        super().load_own_variables(store)

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """Creates a SOAA from `get_config()`, of this or an older version."""
        config = _migration.config_in_current_layout(config)
        return super().from_config(config, custom_objects=custom_objects)

    def get_config(self):
        """Returns the config: every constructor argument."""
        own = ("beta_1", "beta_2", "epsilon", "total_steps", "initial_radius", "fused")
        return {**super().get_config(), **{name: getattr(self, name) for name in own},
                "controller": controllers.serialize(self.controller),
                "state_layout_version": STATE_LAYOUT_VERSION}
