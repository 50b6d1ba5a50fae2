"""What the same-batch test measures when the loss is linear over the step.

    python research/prediction_scale.py [--rates 1e-5,1e-4,1e-3,1e-2]

SOAA's predicted reduction of a step `theta -= eta * u` is
`eta * sum(g * u - v_hat * u**2 / 2)` (docs/algorithm.md): its curvature
term scales with `eta`, like its first-order term, not with `eta**2`. So
where the loss is linear over the step (a small rate), the actual reduction
on the batch is the first-order one, `-g . delta_theta`, while the
prediction stays a fixed fraction of it, and the same-batch test's
`rho = actual / predicted` stays above 1 however small the step.

A small MLP (20-64-5, ReLU, optionally dropout) on generated data is
trained with `SOAA(controller="same_batch")` in a TensorFlow custom loop,
testing every step with the step's own dropout masks. Per rate: the median
of actual / first-order (1 where the loss is linear over the step),
prediction / first-order, `rho`, and the radius, and how many tests gave
`rho > 2`. Writes a Markdown table to stdout.
"""

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_soaa  # noqa: E402


def run(rate, dropout, epochs=3, batch=64):
    """Per tested step: (loss before, loss after, first-order, prediction, d)."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048, 20)).astype("float32")
    y = np.argmax(x @ rng.normal(size=(20, 5)) + 0.5 * rng.normal(size=(2048, 5)), 1)
    model = keras.Sequential([
        keras.Input((20,)), keras.layers.Dense(64, activation="relu"),
        keras.layers.Dropout(dropout), keras.layers.Dense(5)])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras_soaa.SOAA(learning_rate=rate, controller="same_batch")
    optimizer.build(model.trainable_variables)
    prediction = optimizer.controller_state()["step_prediction"]

    @tf.function
    def step(x, y):
        non_trainable = [tf.identity(v.value) for v in model.non_trainable_variables]
        before = [tf.identity(v.value) for v in model.trainable_variables]
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        y_after, _ = model.stateless_call(
            [v.value for v in model.trainable_variables], non_trainable, x,
            training=True)
        after = loss_fn(y, y_after)
        first_order = -tf.add_n([tf.reduce_sum(g * (v.value - b)) for g, v, b
                                 in zip(grads, model.trainable_variables, before)])
        predicted = tf.identity(prediction.value)
        optimizer.observe_step(loss, after)
        return loss, after, first_order, predicted, optimizer.radius.value

    rows = [[float(t) for t in step(x[i:i + batch], y[i:i + batch])]
            for _ in range(epochs) for i in range(0, len(x), batch)]
    return np.array(rows).T


def main(argv=None):
    """Runs every rate, with and without dropout; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", default="1e-5,1e-4,1e-3,1e-2")
    args = parser.parse_args(argv)
    print("| dropout | rate | actual / first-order | prediction / first-order "
          "| rho | rho > 2 | radius |\n|---|---|---|---|---|---|---|")
    for dropout in (0.0, 0.5):
        for rate in map(float, args.rates.split(",")):
            before, after, first, predicted, radius = run(rate, dropout)
            actual = before - after
            rho = actual / np.where(predicted > 0, predicted, 1.0)
            print(f"| {dropout} | {rate:g} | {np.median(actual / first):.3f} | "
                  f"{np.median(predicted / first):.3f} | {np.median(rho):.2f} | "
                  f"{int((rho > 2).sum())} of {rho.size} | {np.median(radius):.3g} |")


if __name__ == "__main__":
    main()
