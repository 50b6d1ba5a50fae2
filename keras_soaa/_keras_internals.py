"""Every use of Keras internals in keras-soaa, each with why it is needed.

Checked against Keras 3.15.1 (`pyproject.toml` pins `keras>=3.15,<4`); the
test suite exercises each of them on TensorFlow, JAX and torch. Besides
these, `SOAA` overrides two hooks of `keras.optimizers.Optimizer`, as
Keras' own optimizers do: `_backend_update_step` (the fused torch path and
eager TF's XLA step) and `_apply_weight_decay` (decay inside the step, so a
skipped step skips it too).
"""

from keras.src.backend.common.stateless_scope import in_stateless_scope
from keras.src.utils.tracking import DotNotTrackScope

__all__ = [
    "AfterJaxTrainStep",
    "attach_jax_state",
    "callback_model",
    "in_stateless_scope",
    "jax_state_variables",
    "loss_tracker",
    "replace_loss_tracker",
    "sync_trainer_state",
    "trained_variables_of",
    "variable_layout",
]

# `in_stateless_scope()`: `SOAA.stateless_observe_loss` runs `observe_loss`
# in a `keras.StatelessScope`, whose assignments a `tf.function` would hide;
# the optimizer runs the controller eagerly there.


def loss_tracker(model):
    """The `keras.metrics.Mean` behind `fit`'s `logs["loss"]`.

    `TrustRegionCallback` needs the loss of each batch, which the logs do
    not hold (they hold the epoch's running mean).
    """
    return model._loss_tracker


def replace_loss_tracker(model, tracker):
    """Makes `tracker` the model's loss tracker, as `compile` sets it.

    Untracked (`DotNotTrackScope`), or `model.metrics` lists the loss twice;
    the train function is traced again, since it may hold the old tracker.
    """
    with DotNotTrackScope():
        model._loss_tracker = tracker
    model.make_train_function(force=True)


def callback_model(callback):
    """`callback`'s model, as `callback.model` gives it but without a sync.

    On JAX, Keras' `Callback.model` property calls `jax_state_sync()` at
    every access: it assigns every model, optimizer and metric variable,
    after which `fit` gathers (and purges) them all again before the next
    step. Per batch that is the main cost of a callback on a small model.
    """
    return callback._model


class AfterJaxTrainStep:
    """Wraps a JAX model's `train_function` to run a hook on its new state.

    Keras 3.15's JAX `fit` (`backend/jax/trainer.py`) runs
    `logs, state = self.train_function(state, iterator)` and trains the next
    step from that `state`: a tuple of four lists (trainable, non-trainable,
    optimizer and metric values, ordered as `model.trainable_variables`,
    `model.non_trainable_variables`, `model.optimizer.variables`,
    `model.metrics_variables`). A callback cannot reach those lists:
    `model._jax_state` holds copies (`Layer.__setattr__` tracks the dict
    and copies its lists), so it can only `jax_state_sync()` (assign every
    variable), after which `fit` regathers and purges every variable before
    the next step: on a small model, most of a step. The wrapper hands the
    hook the lists themselves: what it puts there, the next step trains
    from, and the copies the callbacks (and the end of the epoch) see have
    it too.

    `hook(state)` (`state`: the four lists) runs after a call only when
    `armed` (set it before each step; a call disarms it), so that a wrapper
    left behind by a `fit` that raised does nothing in later calls, and
    only when `state` has the expected structure; it returns whether it
    ran. Donation: the next step donates (frees) every array in the lists,
    so the hook must put only fresh arrays there and keep none.
    """

    def __init__(self, model, hook):
        function = model.train_function
        while isinstance(function, AfterJaxTrainStep):  # left by a failed fit
            function = function.train_function
        self.train_function = function
        self.hook = hook
        self.armed = False
        self.ran = False  # whether the hook ran in the last call
        model.train_function = self

    def __call__(self, state, iterator):
        logs, state = self.train_function(state, iterator)
        armed, self.armed, self.ran = self.armed, False, False
        if (
            armed
            and isinstance(state, tuple)
            and len(state) == 4
            and all(isinstance(values, list) for values in state)
        ):
            self.ran = self.hook(state)
        return logs, state

    def remove(self, model):
        """Puts `model`'s own train function back (if still wrapped)."""
        self.armed = False
        if model.train_function is self:
            model.train_function = self.train_function


def jax_state_variables(model):
    """The variables of a JAX `fit`'s state, in the state's order.

    Four lists, as `Trainer._get_jax_state` gathers them: trainable,
    non-trainable, optimizer and metric variables.
    """
    return (
        model.trainable_variables,
        model.non_trainable_variables,
        model.optimizer.variables,
        model.metrics_variables,
    )


def attach_jax_state(variables, state):
    """Makes `variables` hold the values `state` (lists of arrays) holds.

    What `jax_state_sync()` does, so that callbacks can read the variables,
    at a fraction of its cost: `_direct_assign` (the backend's own write,
    which `assign` ends in) skips `assign`'s conversion and shape check,
    needless for the trainer's own values; and the state is not marked as
    synced, so the next step trains on from `state` itself instead of
    gathering (and purging) every variable again. The next step donates
    these arrays: until the next sync the variables then hold deleted
    arrays, where Keras would have left `None`.
    """
    for group, values in zip(variables, state):
        for variable, value in zip(group, values):
            variable._direct_assign(value)


def sync_trainer_state(model):
    """Makes variables readable and writable during a JAX `fit`.

    The JAX trainer holds the training state outside the variables during an
    epoch; `jax_state_sync` writes it back, and the trainer regathers it
    afterwards, so a callback's reads and writes are seen. No-op elsewhere.
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def trained_variables_of(optimizer):
    """The variables `optimizer` was built for (empty before `build`).

    The JAX trainer maps optimizer state to variables by position: a
    callback checks them before the first step fails half-way.
    """
    return getattr(optimizer, "_trainable_variables", [])


def variable_layout(variable):
    """The `keras.distribution` layout of `variable`, or `None`.

    Optimizer slots are sharded like their variable (as in
    `Optimizer.add_variable_from_reference`).
    """
    return getattr(variable, "_layout", None)
