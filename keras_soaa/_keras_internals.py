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
    "in_stateless_scope",
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
