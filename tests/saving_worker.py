"""Shared pieces of `tests/test_saving.py`, and a worker run in a fresh process.

A process has one Keras backend, so loading a `.keras` file in a *fresh*
process, or under *another* backend, needs a subprocess. The worker:

    KERAS_BACKEND=jax python tests/saving_worker.py MODEL.keras DATA.npz OUT.npz \
        --epochs 4 --initial-epoch 2 --batch-size 16

loads MODEL.keras with `keras.saving.load_model` (no `custom_objects`: importing
keras_soaa registers SOAA), records its state, continues training with
`model.fit(x, y, epochs=..., initial_epoch=..., shuffle=False,
callbacks=[TrustRegionCallback()])` on the arrays `x`, `y` of DATA.npz, and
writes to OUT.npz: the state right after loading (`loaded/...`), the state
after training (`trained/...`), the losses the callback fed to SOAA
(`fed_losses`) and the optimizer's config (`config`, JSON).

A model's "state" here is every weight of the model and every variable of its
optimizer (iterations, learning rate, m and v of each weight and the five
trust-region scalars), as float arrays keyed `weight/<i>` and `optimizer/<i>`.
"""

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fed_losses import FedLossRecorder  # noqa: E402

from keras_soaa import SOAA  # noqa: E402
from keras_soaa.callback import find_soaa  # noqa: E402

BATCH_SIZE = 16
NUM_SAMPLES = 64  # 4 batches of 16 per epoch
STEPS_PER_EPOCH = NUM_SAMPLES // BATCH_SIZE


def make_data(seed=0, num_samples=NUM_SAMPLES):
    """A small deterministic regression problem (float32 NumPy arrays)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_samples, 4)).astype("float32")
    w = np.array([[1.0, -0.5], [0.5, 2.0], [-1.5, 0.3], [0.2, -1.0]])
    y = (np.tanh(x @ w) + 0.1 * rng.normal(size=(num_samples, 2)))
    return x, y.astype("float32")


def make_model(optimizer, seed=0, loss="mse"):
    """Dense(8, tanh) -> Dense(2), compiled, with weights from NumPy (`seed`).

    The initial weights come from NumPy, not from a backend RNG, so that the
    same `seed` gives the same model on every backend.
    """
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    rng = np.random.default_rng(1000 + seed)
    model.set_weights(
        [(0.5 * rng.normal(size=w.shape)).astype("float32") for w in model.weights]
    )
    model.compile(optimizer=optimizer, loss=loss)
    return model


def to_numpy(x):
    return np.array(keras.ops.convert_to_numpy(x))


def load_for_training(path):
    """`keras.saving.load_model(path)`, training eagerly under torch.

    The compile config in a `.keras` file holds `jit_compile` as the saving
    backend resolved it: `True` from JAX. Under torch that means
    `torch.compile` of the train step, whose tracing takes tens of seconds
    even for this small model (it trains to the same result, checked by
    hand); the tests train torch eagerly, torch's own "auto" choice.
    """
    model = keras.saving.load_model(path)
    if keras.backend.backend() == "torch":
        model.jit_compile = False
    return model


def model_state(model):
    """Every model weight and optimizer variable, as NumPy arrays.

    Keys: `weight/<i>` (model.weights order) and `optimizer/<i>`
    (model.optimizer.variables order, the order Keras saves them in).
    """
    state = {}
    for i, weight in enumerate(model.weights):
        state[f"weight/{i}"] = to_numpy(weight)
    for i, variable in enumerate(model.optimizer.variables):
        state[f"optimizer/{i}"] = to_numpy(variable)
    return state


def variable_names(model):
    """The names of `model.weights` and of the optimizer's variables."""
    return {
        "weights": [w.name for w in model.weights],
        "optimizer": [v.name for v in model.optimizer.variables],
    }


def scalar_state(model):
    """The five trust-region scalars of the model's SOAA, by name."""
    soaa = find_soaa(model.optimizer)
    return {
        name: float(to_numpy(getattr(soaa, name))) for name in (
            "radius", "loss_average", "loss_count", "predicted_reduction",
            "previous_predicted_reduction")
    }


class StopAfterEpoch(keras.callbacks.Callback):
    """Stops `fit` after `epoch` epochs, as if the job had been stopped.

    `fit` is called with the epochs of the *whole* run, so that
    `TrustRegionCallback` infers the whole run's `total_steps`.
    """

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 >= self.epochs:
            self.model.stop_training = True


def fit(model, x, y, epochs, initial_epoch=0, callbacks=(), fed=None):
    """`fit` on (x, y) in order (no shuffle) with `TrustRegionCallback` first.

    Returns the list of losses fed to SOAA (`fed`, or a new list).
    """
    recorder = FedLossRecorder()
    model.fit(
        x,
        y,
        batch_size=BATCH_SIZE,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        verbose=0,
        callbacks=[recorder, *callbacks],
    )
    if fed is None:
        fed = []
    fed.extend(recorder.fed)
    return fed


def max_abs_diffs(a, b, prefix_a="", prefix_b=""):
    """Largest |a - b| over weights and over optimizer variables.

    `a` and `b` are state dicts (or npz files); the keys of `a` under
    `prefix_a` are matched with those of `b` under `prefix_b`. Raises if the
    two do not hold the same variables with the same shapes.
    """
    keys_a = sorted(k[len(prefix_a):] for k in a.keys() if k.startswith(prefix_a)
                    and k[len(prefix_a):].startswith(("weight/", "optimizer/")))
    keys_b = sorted(k[len(prefix_b):] for k in b.keys() if k.startswith(prefix_b)
                    and k[len(prefix_b):].startswith(("weight/", "optimizer/")))
    if keys_a != keys_b or not keys_a:
        raise AssertionError(f"different variables: {keys_a} != {keys_b}")
    diffs = {"weight": 0.0, "optimizer": 0.0}
    for key in keys_a:
        va = np.asarray(a[prefix_a + key], dtype=np.float64)
        vb = np.asarray(b[prefix_b + key], dtype=np.float64)
        if va.shape != vb.shape:
            raise AssertionError(f"{key}: shape {va.shape} != {vb.shape}")
        kind = key.split("/")[0]
        diffs[kind] = max(diffs[kind], float(np.max(np.abs(va - vb), initial=0)))
    return diffs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("out")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--initial-epoch", type=int, default=0)
    args = parser.parse_args(argv)

    model = load_for_training(args.model)
    assert isinstance(find_soaa(model.optimizer), SOAA)
    loaded = model_state(model)
    config = find_soaa(model.optimizer).get_config()
    data = np.load(args.data)
    fed = fit(model, data["x"], data["y"], args.epochs, args.initial_epoch)
    trained = model_state(model)

    out = {f"loaded/{k}": v for k, v in loaded.items()}
    out.update({f"trained/{k}": v for k, v in trained.items()})
    out["fed_losses"] = np.array(fed, dtype=np.float64)
    out["config"] = np.array(json.dumps(config, sort_keys=True))
    out["names"] = np.array(json.dumps(variable_names(model)))
    out["backend"] = np.array(keras.backend.backend())
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
