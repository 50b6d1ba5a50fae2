"""The one place SOAA's update path is chosen, per backend.

- torch: `keras_soaa.backends.torch.update_variables`, multi-tensor kernels
  per compute dtype (Keras runs `update_step` eagerly on torch, op by op);
  with `SOAA(fused=True)`, compiled by `torch.compile`.
- Eager TensorFlow outside a `tf.distribute` strategy: the portable step
  compiled with XLA, one call (op by op, each op would be a pass over memory).
- Otherwise (JAX, compiled TensorFlow, `SOAA(fused=False)`): the portable
  `SOAA.update_step` per variable, compiled with the train step.

Whichever runs, a controller that does not wait for losses updates after it.
"""

import weakref

import keras
from keras import ops

from keras_soaa import _keras_internals as internals
from keras_soaa.compile import CompiledCache, compile_state_update

# Per optimizer: its XLA-compiled update, per list of variables.
_xla_updates = weakref.WeakKeyDictionary()


def update_variables(optimizer, grads, variables, learning_rate):
    """Applies `optimizer`'s step to `variables`, then adapts its radius.

    Args:
        optimizer: the `SOAA` optimizer.
        grads: one gradient per variable.
        variables: the variables to update.
        learning_rate: this step's learning rate.
    """
    backend = keras.backend.backend()
    if optimizer.fused is not False and backend == "torch":
        from keras_soaa.backends import torch as torch_backend

        torch_backend.update_variables(optimizer, grads, variables, learning_rate)
        optimizer._after_step()
    elif optimizer.fused is not False and _tf_eager_without_strategy(backend):
        import tensorflow as tf

        # Sparse gradients as dense (the step is dense anyway): the compiled
        # function takes tensors, not `IndexedSlices`.
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices)
                 else g for g in grads]
        variables = list(variables)
        update = _xla_updates.setdefault(optimizer, CompiledCache()).get(
            ("update", *map(id, variables)),
            lambda: compile_state_update(
                lambda grads, lr: (grads, lr),
                lambda grads, lr: portable_update(optimizer, grads, variables, lr),
                lambda _: None,
                jit_compile=True,
            ),
        )
        update(list(grads), ops.convert_to_tensor(learning_rate))
    else:
        portable_update(optimizer, grads, variables, learning_rate)


def portable_update(optimizer, grads, variables, learning_rate):
    """`SOAA.update_step` per variable (Keras' loop), then the controller."""
    internals.update_each_variable(optimizer, grads, variables, learning_rate)
    optimizer._after_step()


def _tf_eager_without_strategy(backend):
    """True when TensorFlow runs eagerly outside any `tf.distribute` scope."""
    if backend != "tensorflow":
        return False
    import tensorflow as tf

    return tf.executing_eagerly() and not tf.distribute.has_strategy()
