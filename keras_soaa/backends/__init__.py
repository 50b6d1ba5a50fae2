"""Backend fast paths of SOAA's update, chosen here and nowhere else.

A fast path updates every variable of one compute dtype at once and has the
signature of `keras_soaa.backends.torch.update_step`. A backend without one
runs `SOAA.update_step` per variable, which XLA fuses on TensorFlow and JAX.
"""

import keras


def fused_update_step(backend=None):
    """Returns `backend`'s fused update step, or `None` if it has none.

    Args:
        backend: a Keras backend name; defaults to the current one.
    """
    backend = backend or keras.backend.backend()
    if backend == "torch":
        from keras_soaa.backends import torch as torch_backend

        return torch_backend.update_step
    return None
