"""Every use of Keras internals in keras-soaa, each with why it is needed.

Checked against Keras 3.15.1, 3.14.1, 3.13.2 and keras-nightly
3.16.0.dev2026102704 (`pyproject.toml` pins `keras>=3.13.2,<4`;
`tests/compat_keras.py` runs the core tests on other releases); the tests
exercise each on TensorFlow, JAX and torch. keras-soaa also overrides hooks
that Keras' own optimizers and callbacks override: `SOAA._backend_update_step`
(the backend's update path, `keras_soaa.backends.update_variables`),
`SOAA._apply_weight_decay` (a no-op: the decay is applied inside the step, so a
skipped step skips it too), `TrustRegionCallback.async_safe` (lets JAX's `fit`
run batch ends off its thread) and `TrustRegionCallback.on_epoch_end` (writes
the controller state again after JAX's `fit` undid it, see there).
"""

import contextlib
import os
import sys

import keras
from keras import StatelessScope

# `SOAA.stateless_observe_loss` runs `observe_loss` in a `keras.StatelessScope`,
# whose assignments a `tf.function` would hide: the controller runs eagerly there.
from keras.src.backend.common.stateless_scope import (
    in_stateless_scope as in_stateless_scope,
)
from keras.src.utils.tracking import DotNotTrackScope

_TRAINERS = os.path.join(os.path.dirname(keras.__file__), "src", "backend")


def learning_rate_schedule(optimizer):
    """The optimizer's `LearningRateSchedule`, or `None` for another rate.

    Keras' public `learning_rate` is only the current value.
    """
    rate = optimizer._learning_rate
    schedules = keras.optimizers.schedules.LearningRateSchedule
    return rate if isinstance(rate, schedules) else None


def in_fit() -> bool:
    """Whether a Keras `Model.fit` is on the call stack.

    SOAA warns in a `fit` that feeds its controller no loss; a custom loop
    calls `observe_loss` only after `apply`. Each backend's `fit` (which also
    traces the compiled steps) is in `keras/src/backend/<backend>/trainer.py`.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "fit" and code.co_filename.startswith(_TRAINERS):
            return True
        frame = frame.f_back
    return False


def loss_tracker(model):
    """The `keras.metrics.Mean` behind `fit`'s `logs["loss"]`."""
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

    On JAX, `Callback.model` calls `jax_state_sync()` at every access, after
    which `fit` regathers every variable: per batch, the main cost of a
    callback on a small model.
    """
    return callback._model


def train_function_around(model, before, after, tests_step=False):
    """Keras' train function for `model`, with a hook around each train step.

    TensorFlow and JAX: `make_train_function` compiles the `train_step` it
    finds, so one set on the instance for that moment joins the program (no
    call or transfer of its own per batch); the model keeps its own. torch:
    the hooked step, uncompiled, called as Keras' torch trainer calls its
    train function (`one_step_on_data`).

    `kept = before(data)` runs before the train step on the batch `data`,
    `after(kept, data, batch_loss)` right after it; both may read and assign
    the model's, optimizer's and metrics' variables. `batch_loss()` is the
    loss of `data` at the weights after the step (`batch_loss_after_step`),
    with the non-trainable variables as they were before it: the same
    dropout masks (seed generators) as the step's own forward pass, so that
    the two losses are of one function. With `tests_step=False`,
    `batch_loss` is not available (nothing is kept for it).
    `after` returns a dict of tensors, added to the step's logs. On JAX the
    hooks run in a `keras.StatelessScope` over the pure step's state (as
    `Optimizer.stateless_apply` does), and what `after` assigns goes into
    the state the next step trains from.
    """
    train_step = model.train_step
    backend = keras.backend.backend()
    if backend == "jax":

        def hooked_step(state, data):
            with StatelessScope(_jax_state_mapping(model, state)):
                kept = before(data)
            non_trainable = state[1]  # before the step
            logs, state = train_step(state, data)
            with StatelessScope(_jax_state_mapping(model, state)) as scope:
                output = after(kept, data, lambda: _jax_batch_loss(
                    model, (state[0], non_trainable, *state[2:]), data))
            optimizer_values, metrics_values = (
                type(values)(scope.get_current_value(v) for v in variables)
                for values, variables in ((state[2], model.optimizer.variables),
                                          (state[3], model.metrics_variables)))
            state = (state[0], state[1], optimizer_values, metrics_values)
            return {**logs, **output}, state

    else:

        def hooked_step(data):
            kept = before(data)
            # Read now (a copy: the step assigns in place on torch).
            non_trainable = ([keras.ops.copy(v.value) for v in
                              model.non_trainable_variables] if tests_step else None)
            logs = train_step(data)
            return {**logs, **after(kept, data, lambda: batch_loss_after_step(
                model, data, non_trainable))}

    if backend == "torch":
        return lambda data: hooked_step(data[0])
    own = model.train_function
    model.train_step = hooked_step
    try:
        model.make_train_function(force=True)
        return model.train_function
    finally:
        del model.train_step
        model.train_function = own


def batch_loss_after_step(model, data, non_trainable_values):
    """The unscaled training loss of the batch `data` at the current weights.

    One forward pass in training mode (as the step's loss was computed), run
    stateless so that it changes no variable (batch-normalization
    statistics, seed generators), from `non_trainable_values` (those before
    the step: its dropout masks); through `_compute_loss`, Keras' call of
    `compute_loss` that also serves subclasses without its `training`
    argument. TensorFlow and torch (JAX: `_jax_batch_loss`).
    """
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    values = ([v.value for v in model.trainable_variables], non_trainable_values)
    with _no_gradient():
        y_pred, _ = model.stateless_call(*values, x, training=True)
        return model._compute_loss(x=x, y=y, y_pred=y_pred,
                                   sample_weight=sample_weight, training=True)


def _no_gradient():
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def _jax_batch_loss(model, state, data):
    # Keras' JAX `compute_loss_and_updates` (public, but JAX's trainer only),
    # stateless as the train step calls it; its scaled loss and new
    # variables are dropped.
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    _, (unscaled_loss, *_) = model.compute_loss_and_updates(
        state[0], state[1], state[3], x, y, sample_weight, training=True,
        optimizer_variables=state[2])
    return unscaled_loss


def _jax_state_mapping(model, state):
    # The JAX trainer orders its optimizer and metric values as these lists.
    optimizer_variables = model.optimizer.variables
    metrics_variables = model.metrics_variables
    if (len(state[2]), len(state[3])) != (len(optimizer_variables),
                                           len(metrics_variables)):
        raise ValueError("The JAX training state does not match the model's "
                         "optimizer and metric variables; compile the model again.")
    return [*zip(optimizer_variables, state[2]), *zip(metrics_variables, state[3])]


class HookedTrainFunction:
    """`model.train_function` during one `fit`: the hooked one when asked.

    `fit` calls it once per batch (TF: `logs = f(iterator)`, JAX: `logs, state
    = f(state, iterator)`). With `run_hooked_next` set, the call runs `function`
    (from `train_function_around`), moves its logs' `key` into `output`, and
    resets the flag; else it runs the model's own train function, so a wrapper
    left by a `fit` that raised does nothing later.
    """

    def __init__(self, model, function, key):
        self.own = own_train_function(model)
        self.function = function
        self.key = key
        self.run_hooked_next = False
        self.output = None
        model.train_function = self

    def __call__(self, *args):
        hooked, self.run_hooked_next = self.run_hooked_next, False
        if not hooked:
            return self.own(*args)
        outputs = self.function(*args)
        logs = outputs[0] if isinstance(outputs, tuple) else outputs
        self.output = logs.pop(self.key)
        return outputs

    def remove(self, model):
        """Puts `model`'s own train function back (if still wrapped)."""
        self.run_hooked_next = False
        if model.train_function is self:
            model.train_function = self.own


def own_train_function(model):
    """`model.train_function`, without a `HookedTrainFunction` around it."""
    function = model.train_function
    while isinstance(function, HookedTrainFunction):  # left by a failed fit
        function = function.own
    return function


def sync_trainer_state(model):
    """Makes variables readable and writable during a JAX `fit`.

    The JAX trainer holds the state outside the variables during an epoch; its
    sync writes it back and the trainer regathers it. No-op elsewhere. Keras
    3.16 names it `state_sync`, 3.15 only `jax_state_sync`.
    """
    sync = getattr(model, "state_sync", None) or getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def trained_variables_of(optimizer):
    """The variables `optimizer` was built for (empty before `build`)."""
    return getattr(optimizer, "_trainable_variables", [])


def variable_layout(variable):
    """The `keras.distribution` layout of `variable`, or `None`.

    Optimizer slots are sharded like their variable.
    """
    return getattr(variable, "_layout", None)


def update_each_variable(optimizer, grads, variables, learning_rate):
    """Keras' own `_backend_update_step`: `update_step` per variable.

    On TensorFlow it also merges the replicas' calls under a strategy.
    """
    keras.optimizers.Optimizer._backend_update_step(
        optimizer, grads, variables, learning_rate)


def variable_index(optimizer, variable):
    """`variable`'s position in the built list, which indexes its slots."""
    return optimizer._get_variable_index(variable)


def overwritten_with_gradient(optimizer, variable):
    """Whether Keras assigns `variable` its "gradient" (float8 scales): no slots."""
    return optimizer._overwrite_variable_with_gradient(variable)


def uses_weight_decay(optimizer, variable):
    """Whether `weight_decay` applies (honours `exclude_from_weight_decay`)."""
    return optimizer._use_weight_decay(variable)
