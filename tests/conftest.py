"""Shared helpers: the tests run once per backend (`KERAS_BACKEND`)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras_soaa.controllers import PaperController  # noqa: E402

# The paper controller's scalars, as the specification names and orders them.
PAPER_SCALARS = ("radius", "loss_average", "loss_count", "predicted_reduction",
                 "previous_predicted_reduction")

BACKEND = keras.backend.backend()


def float64_available() -> bool:
    """JAX runs without x64 by default: float64 variables are float32 there."""
    return BACKEND != "jax" or bool(
        __import__("jax").config.read("jax_enable_x64")
    )


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x), dtype=np.float64)


def make_soaa(controller="paper", radius_bound=None, radius_learning_rate=None,
              min_radius=None, max_radius=None, **kwargs):
    """`SOAA` from the reference's arguments (`soaa_reference.ReferenceSOAA`),
    whose controller constants are SOAA's controllers' arguments."""
    from keras_soaa import SOAA, controllers

    given = dict(radius_bound=radius_bound, learning_rate=radius_learning_rate,
                 min_radius=min_radius, max_radius=max_radius)
    if controller == "paper":
        given = {"radius_bound": radius_bound}
    else:
        given.pop("radius_bound")
    given = {k: v for k, v in given.items() if v is not None}
    if given:
        controller = type(controllers.get(controller))(**given)
    return SOAA(controller=controller, **kwargs)


def scalars_of(optimizer):
    """A SOAA's scalar state: the paper controller's five in the spec's order,
    else the radius and the controller's own state."""
    if isinstance(optimizer.controller, PaperController):
        variables = [getattr(optimizer, name) for name in PAPER_SCALARS]
    else:
        state = optimizer.controller_state()
        variables = [optimizer.radius, *(state[n] for n in optimizer.controller.state)]
    return np.array([float(to_numpy(v)) for v in variables])


def compiled_apply(optimizer, variables):
    """Returns `apply(grads)` running the optimizer step compiled (XLA).

    TF: `tf.function(jit_compile=True)`; JAX: `jax.jit(stateless_apply)`;
    torch: `torch.compile` of `apply`.
    """
    optimizer.build(variables)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        step = tf.function(
            lambda grads: optimizer.apply(grads, variables), jit_compile=True
        )
        return lambda grads: step([tf.constant(g) for g in grads])
    if BACKEND == "jax":
        import jax

        step = jax.jit(optimizer.stateless_apply)

        def apply(grads):
            new_weights, new_state = step(
                [v.value for v in optimizer.variables],
                [keras.ops.convert_to_tensor(g) for g in grads],
                [v.value for v in variables],
            )
            for variable, value in zip(variables, new_weights):
                variable.assign(value)
            for variable, value in zip(optimizer.variables, new_state):
                variable.assign(value)

        return apply
    if BACKEND == "torch":
        import torch

        step = torch.compile(lambda grads: optimizer.apply(grads, variables))
        return lambda grads: step([keras.ops.convert_to_tensor(g) for g in grads])
    raise NotImplementedError(BACKEND)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.backend.clear_session()
    yield
