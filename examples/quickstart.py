"""Quickstart: `compile` with SOAA, `fit` with `TrustRegionCallback`.

Trains a small MLP on scikit-learn's bundled digits (no network needed) and
prints the test accuracy and the radius the controller settled on.

    python examples/quickstart.py [--epochs N]
"""

import argparse

import keras
from _data import digits

import keras_soaa


def main(epochs=10, verbose=2):
    (x_train, y_train), (x_test, y_test) = digits()
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras_soaa.SOAA(learning_rate=0.003),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        x_train,
        y_train,
        batch_size=64,
        epochs=epochs,
        validation_data=(x_test, y_test),
        callbacks=[keras_soaa.TrustRegionCallback()],
        verbose=verbose,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(
        f"[{keras.backend.backend()}] test accuracy {accuracy:.3f}, "
        f"final radius {history.history['radius'][-1]:.3f}"
    )
    return history, accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    main(parser.parse_args().epochs)
