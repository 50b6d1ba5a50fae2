"""A custom TensorFlow training loop with SOAA (`KERAS_BACKEND=tensorflow`).

    KERAS_BACKEND=tensorflow python examples/custom_loop_tensorflow.py
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
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
    dataset = tf.data.Dataset.from_tensor_slices((x_train, y_train))

    @tf.function(jit_compile=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        # The loss at the weights before this step: what the controller needs.
        optimizer.observe_loss(loss)
        return loss

    for epoch in range(epochs):
        for x, y in dataset.shuffle(2048, seed=epoch).batch(batch_size):
            loss = train_step(x, y)
        print(f"epoch {epoch}: loss {float(loss):.4f}, "
              f"radius {float(optimizer.radius.numpy()):.3f}")
    return float(loss)


if __name__ == "__main__":
    main()
