"""A custom JAX training loop with SOAA under `jax.jit` (`KERAS_BACKEND=jax`).

The whole step is one pure function: `jax.value_and_grad` over the model's
`stateless_call`, `optimizer.stateless_apply`, then
`optimizer.stateless_observe_loss`.

    KERAS_BACKEND=jax python examples/custom_loop_jax.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from _data import digits  # noqa: E402

import keras_soaa  # noqa: E402


def main(epochs=5, batch_size=64):
    (x_train, y_train), _ = digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((64,)), keras.layers.Dense(64, activation="relu"),
         keras.layers.Dense(10)]
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    steps_per_epoch = -(-len(x_train) // batch_size)
    optimizer = keras_soaa.SOAA(
        learning_rate=0.003, total_steps=epochs * steps_per_epoch
    )
    optimizer.build(model.trainable_variables)

    def compute_loss(trainable, non_trainable, x, y):
        y_pred, non_trainable = model.stateless_call(
            trainable, non_trainable, x, training=True
        )
        return loss_fn(y, y_pred), non_trainable

    @jax.jit
    def train_step(state, x, y):
        trainable, non_trainable, optimizer_state = state
        (loss, non_trainable), grads = jax.value_and_grad(
            compute_loss, has_aux=True
        )(trainable, non_trainable, x, y)
        trainable, optimizer_state = optimizer.stateless_apply(
            optimizer_state, grads, trainable
        )
        optimizer_state = optimizer.stateless_observe_loss(
            optimizer_state, loss
        )
        return loss, (trainable, non_trainable, optimizer_state)

    state = (
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in optimizer.variables],
    )
    radius_index = next(
        i for i, v in enumerate(optimizer.variables) if v is optimizer.radius
    )
    rng = np.random.default_rng(0)
    for epoch in range(epochs):
        order = rng.permutation(len(x_train))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss, state = train_step(state, x_train[batch], y_train[batch])
        radius = state[2][radius_index]
        print(f"epoch {epoch}: loss {float(loss):.4f}, radius {float(radius):.3f}")

    # Write the final state back into the Keras variables.
    for variable, value in zip(model.trainable_variables, state[0]):
        variable.assign(value)
    for variable, value in zip(model.non_trainable_variables, state[1]):
        variable.assign(value)
    for variable, value in zip(optimizer.variables, state[2]):
        variable.assign(value)
    return float(loss)


if __name__ == "__main__":
    main()
