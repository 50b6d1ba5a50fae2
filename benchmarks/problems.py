"""The benchmark's problems: small, real, offline, each a Keras model for `fit`.

Every problem gives, for a seed: a freshly initialised model, the stream of
training batches in the order `fit` consumes them, and (where defined) a
held-out metric. A seed fixes the initial weights and the batch order; the
data itself (and a generated problem's instance) is the same for every seed,
optimizer and learning rate.

- `digits`: MLP 64-128-10 on scikit-learn's bundled digits, held-out accuracy.
- `breast_cancer`: logistic regression on scikit-learn's bundled breast
  cancer data (standardised), held-out accuracy.
- `quadratic`: least squares with minibatch noise, Hessian condition number
  1e3 in a random rotation (so no per-coordinate scaling can undo it),
  held-out MSE.
- `rosenbrock`: the 2-D Rosenbrock function of one Keras variable; the loss
  is the function itself, exact gradients.
- `char_lm`: a character-level Transformer on Python standard library source
  (`examples/transformer_lm.py`), held-out perplexity.
- `digits_cnn`: a small CNN on the digits upsampled to 16x16, with random
  shifts of up to 2 pixels, run twice as long as `digits` (600 steps, 26 epochs):
  the problem with the most weights and steps, where a schedule's end of run
  shows. Held-out accuracy.

Those six are the **calibration set** (`CALIBRATION`): a controller's
constants may be tuned on them. The **held-out set** (`HELD_OUT`) is for
judging an optimizer only, never looked at while tuning; its problems differ
from the calibration set's in data and architecture, each made offline from
a fixed seed (scikit-learn's generators or NumPy):

- `wave_gru`: a GRU classifying noisy sinusoids by frequency band (4
  overlapping classes), held-out accuracy.
- `lorenz_lstm`: an LSTM forecasting the next value of the Lorenz system's
  x, observed with noise, held-out MSE on the series' last 20%.
- `tabular_bn`: an MLP with BatchNormalization and Dropout on
  `make_classification` (6 classes, flipped labels), held-out accuracy.
- `autoencoder`: a 48-64-8-64-48 autoencoder on points near a curved
  6-dimensional manifold, held-out reconstruction MSE.
- `friedman_mlp`: a regression MLP on `make_friedman1`, held-out MSE.
- `shapes_cnn`: a wider CNN (94K weights) on generated 16x16 images of six
  shapes with pixel noise, held-out accuracy.
- `softmax_long`: multinomial logistic regression on `make_classification`
  (10 classes, flipped labels) for 2000 steps (8 epochs): convex with
  minibatch noise, where the end of a schedule matters. Held-out accuracy.

`SETS` names them (and `"all"`, both); `problem_set(name)` tells a
problem's set.
"""

import dataclasses
import functools
import os
import sys
from collections.abc import Callable

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "examples"))
import transformer_lm  # noqa: E402
from _data import digits  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Cost:
    """A problem's expected time on 2 CPU cores (JAX), for the progress ETA.

    `step_ms`: milliseconds per training step (Adam; SOAA's variants take
    `runner.SOAA_STEP_FACTOR` times that); `run_s`: seconds per run besides
    the steps (fresh weights and optimizer state, the held-out metric);
    `compile_s`: seconds to compile a model (with its warm-up `fit`).
    """

    step_ms: float = 1.0
    run_s: float = 0.2
    compile_s: float = 3.0


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    `build_model(seed)` returns an uncompiled model (call it right after
    `runner.seed_everything(seed)`); `stream(seed, steps)` returns the
    `(x, y)` of `steps` batches of `batch_size`, in training order;
    `held_out(model)` returns the held-out metric or `None`.
    """

    name: str
    description: str
    steps: int
    batch_size: int
    lrs: tuple
    build_model: Callable
    loss: Callable
    stream: Callable
    held_out: Callable = lambda model: None
    held_out_name: str | None = None
    # Lower is better for the held-out metric?
    held_out_lower_is_better: bool = False
    # Full-batch problems: their loss curves are plotted unsmoothed.
    exact_gradients: bool = False
    # `fit` runs the stream as epochs of this many steps: `fit` resets its
    # loss tracker every epoch, which keeps the per-batch loss that
    # `TrustRegionCallback` (and the benchmark's recorder) reads from it
    # accurate in float32.
    steps_per_epoch: int = 25
    # The expected time of its runs (the progress line's ETA weighs by it).
    cost: Cost = Cost()


def log_grid(low_exponent, count, per_decade=4):
    """`count` learning rates from 10**low_exponent, `per_decade` per decade."""
    return tuple(
        float(f"{10 ** (low_exponent + k / per_decade):.2g}") for k in range(count)
    )


def epoch_stream(x, y, seed, steps, batch_size):
    """`steps` batches of passes over `(x, y)`, each pass in a seeded order."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    passes = -(-needed // len(x))
    order = np.concatenate([rng.permutation(len(x)) for _ in range(passes)])
    order = order[:needed]
    return x[order], y[order]


def _accuracy(logits, labels):
    if logits.shape[-1] == 1:
        predicted = (logits[:, 0] > 0).astype(labels.dtype)
    else:
        predicted = logits.argmax(-1)
    return float(np.mean(predicted == labels.reshape(predicted.shape)))


def _predict(model, x):
    # A direct call: `predict` would compile a function for every new model.
    return np.asarray(ops.convert_to_numpy(model(x, training=False)), "float64")


# -- scikit-learn's digits ----------------------------------------------------


def _digits_model(seed):
    return keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def _digits_problem(steps):
    (x, y), (x_test, y_test) = digits()
    return Problem(
        name="digits",
        description=(
            f"MLP 64-128-10 (ReLU) on scikit-learn's digits, {len(x)} train / "
            f"{len(x_test)} held-out images, batch 64, cross-entropy"
        ),
        steps=steps,
        batch_size=64,
        lrs=log_grid(-2.5, 7),
        build_model=_digits_model,
        loss=lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        stream=lambda seed, steps: epoch_stream(x, y, seed, steps, 64),
        held_out=lambda model: _accuracy(_predict(model, x_test), y_test),
        held_out_name="held-out accuracy",
    )


# -- scikit-learn's breast cancer -----------------------------------------------


@functools.lru_cache
def _breast_cancer_data():
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order].astype("float32")
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(0), x[:split].std(0)
    x = ((x - mean) / std).astype("float32")
    return (x[:split], y[:split, None]), (x[split:], y[split:])


def _logistic_model(seed):
    return keras.Sequential([keras.Input((30,)), keras.layers.Dense(1)])


def _breast_cancer_problem(steps):
    (x, y), (x_test, y_test) = _breast_cancer_data()
    return Problem(
        name="breast_cancer",
        description=(
            "logistic regression on scikit-learn's breast cancer data "
            f"(standardised), {len(x)} train / {len(x_test)} held-out, "
            "batch 32, binary cross-entropy"
        ),
        steps=steps,
        batch_size=32,
        lrs=log_grid(-2, 7),
        build_model=_logistic_model,
        loss=lambda: keras.losses.BinaryCrossentropy(from_logits=True),
        stream=lambda seed, steps: epoch_stream(x, y, seed, steps, 32),
        held_out=lambda model: _accuracy(_predict(model, x_test), y_test),
        held_out_name="held-out accuracy",
    )


# -- noisy ill-conditioned quadratic ------------------------------------------


@functools.lru_cache
def quadratic_data(dim=100, n_train=4096, n_test=1024, condition=1e3,
                   noise=0.1):
    """Least-squares data whose Hessian E[x xᵀ] has condition number 1e3.

    The eigenvalues are log-spaced in [1/condition, 1], the eigenvectors a
    random rotation; the true weights give every eigen-direction the same
    share of the initial loss (about 1 in all), and the labels carry noise of
    standard deviation `noise` (the loss floor is about `noise**2`).
    """
    rng = np.random.default_rng(0)
    eigenvalues = np.logspace(0, -np.log10(condition), dim)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    w_star = rotation @ (rng.standard_normal(dim) / np.sqrt(eigenvalues * dim))

    def sample(n):
        x = (rng.standard_normal((n, dim)) * np.sqrt(eigenvalues)) @ rotation.T
        y = x @ w_star + noise * rng.standard_normal(n)
        return x.astype("float32"), y[:, None].astype("float32")

    return sample(n_train), sample(n_test)


def _linear_model(seed):
    return keras.Sequential([keras.Input((100,)),
                             keras.layers.Dense(1, use_bias=False)])


def _quadratic_problem(steps):
    (x, y), (x_test, y_test) = quadratic_data()

    def held_out_mse(model):
        return float(np.mean((_predict(model, x_test) - y_test) ** 2))

    return Problem(
        name="quadratic",
        description=(
            "noisy ill-conditioned quadratic: least squares on 100 features, "
            "Hessian condition number 1e3 in a random rotation, label noise "
            f"0.1 (floor ≈ 0.01), {len(x)} train samples, batch 32, MSE"
        ),
        steps=steps,
        batch_size=32,
        lrs=log_grid(-1.75, 7),
        build_model=_linear_model,
        loss=lambda: keras.losses.MeanSquaredError(),
        stream=lambda seed, steps: epoch_stream(x, y, seed, steps, 32),
        held_out=held_out_mse,
        held_out_name="held-out MSE",
        held_out_lower_is_better=True,
    )


# -- Rosenbrock ---------------------------------------------------------------

ROSENBROCK_DIM = 2


def rosenbrock(theta):
    """Σ 100·(θ[i+1] − θ[i]²)² + (1 − θ[i])², minimum 0 at θ = 1."""
    head, tail = theta[:-1], theta[1:]
    return ops.sum(100.0 * ops.square(tail - ops.square(head))
                   + ops.square(1.0 - head))


class FunctionValue(keras.layers.Layer):
    """Holds one variable θ and outputs `function(θ)` once per input row."""

    def __init__(self, function, initial_value, **kwargs):
        super().__init__(**kwargs)
        self.function = function
        self.theta = self.add_weight(
            shape=np.shape(initial_value),
            initializer=keras.initializers.Constant(initial_value),
            name="theta",
        )

    def call(self, inputs):
        return ops.zeros_like(inputs[:, :1]) + self.function(self.theta)


def rosenbrock_start(seed):
    """The classic start (−1.2, 1) plus N(0, 0.1²) noise."""
    start = np.array([-1.2, 1.0])
    noise = 0.1 * np.random.default_rng(seed).standard_normal(ROSENBROCK_DIM)
    return (start + noise).astype("float32")


def _rosenbrock_model(seed):
    inputs = keras.Input((1,))
    outputs = FunctionValue(rosenbrock, rosenbrock_start(seed))(inputs)
    return keras.Model(inputs, outputs)


def function_value_loss(y_true, y_pred):
    """The loss is the model's output: the function value itself."""
    return y_pred[:, 0]


def _rosenbrock_problem(steps):
    def stream(seed, steps):
        dummy = np.zeros((steps, 1), "float32")
        return dummy, dummy

    return Problem(
        name="rosenbrock",
        description=(
            "the 2-D Rosenbrock function 100·(y − x²)² + (1 − x)² of one "
            "Keras variable (x, y), from the classic start (−1.2, 1) + "
            "N(0, 0.1²) per seed; the loss is the function itself (exact "
            "gradients, minimum 0 at (1, 1))"
        ),
        steps=steps,
        batch_size=1,
        # Wide: SOAA and Adam need very different rates here.
        lrs=log_grid(-2, 9, per_decade=2),
        build_model=_rosenbrock_model,
        loss=lambda: function_value_loss,
        stream=stream,
        exact_gradients=True,
    )


# -- character-level Transformer language model ---------------------------------


@functools.lru_cache
def _char_lm_text():
    return transformer_lm.split_ids()


def _char_lm_problem(steps, seq_len=64, dim=48, layers=2, batch_size=32):
    train_ids, held_out_ids = _char_lm_text()
    x_val, y_val = transformer_lm.consecutive_windows(held_out_ids, seq_len)

    def held_out_perplexity(model):
        logits = _predict(model, x_val)
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(log_probs, y_val[..., None], -1).mean()
        return float(np.exp(nll))

    return Problem(
        name="char_lm",
        description=(
            f"character-level Transformer ({layers} pre-norm blocks, width "
            f"{dim}, context {seq_len}) on {len(train_ids) // 1000}K "
            "characters of Python standard library source, the last "
            f"{len(held_out_ids) // 1000}K held out, batch {batch_size} random "
            "windows, cross-entropy (nats/char)"
        ),
        steps=steps,
        batch_size=batch_size,
        # Three points only: by far the most expensive problem.
        lrs=log_grid(-2.75, 3),
        build_model=lambda seed: transformer_lm.build_model(
            seq_len, dim, layers=layers
        ),
        loss=transformer_lm.lm_loss,
        stream=lambda seed, steps: transformer_lm.random_windows(
            train_ids, steps * batch_size, seq_len, seed
        ),
        held_out=held_out_perplexity,
        held_out_name="held-out perplexity",
        held_out_lower_is_better=True,
    )


# -- a small CNN on the digits, upsampled, with random shifts -------------------


@functools.lru_cache
def _digits_16x16():
    """The digits at 16x16 (each pixel doubled), with a channel axis."""
    (x, y), (x_test, y_test) = digits()

    def upsample(images):
        images = images.reshape(-1, 8, 8)
        return np.kron(images, np.ones((1, 2, 2), "float32"))[..., None]

    return (upsample(x), y), (upsample(x_test), y_test)


def shifted_stream(x, y, seed, steps, batch_size, max_shift=2):
    """`epoch_stream` batches, each image moved by up to `max_shift` pixels.

    The shift (per image, per axis, uniform in [−max_shift, max_shift]) is
    drawn from the seed, so every image the optimizer sees is a fresh
    variant: the training loss keeps a noise floor, as on real data.
    """
    images, labels = epoch_stream(x, y, seed, steps, batch_size)
    rng = np.random.default_rng([seed, 1])
    size = images.shape[1]
    padded = np.pad(images, ((0, 0), (max_shift, max_shift),
                             (max_shift, max_shift), (0, 0)))
    shifts = rng.integers(0, 2 * max_shift + 1, (len(images), 2))
    rows = shifts[:, :1] + np.arange(size)
    cols = shifts[:, 1:] + np.arange(size)
    index = np.arange(len(images))[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]], labels


def _digits_cnn_model(seed):
    return keras.Sequential(
        [
            keras.Input((16, 16, 1)),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10),
        ]
    )


def _digits_cnn_problem(steps):
    (x, y), (x_test, y_test) = _digits_16x16()
    return Problem(
        name="digits_cnn",
        description=(
            "CNN (conv 16, pool, conv 32, pool, dense 64, 10; 38K weights) on "
            "scikit-learn's digits upsampled to 16x16, every training image "
            f"shifted by up to 2 pixels at random, {len(x)} train / "
            f"{len(x_test)} held-out (unshifted) images, batch 64, "
            f"cross-entropy ({steps * 64 // len(x)} epochs)"
        ),
        steps=steps,
        batch_size=64,
        # Three points, half a decade apart: the longest run of the benchmark.
        lrs=log_grid(-2.75, 3, per_decade=2),
        build_model=_digits_cnn_model,
        loss=lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        stream=lambda seed, steps: shifted_stream(x, y, seed, steps, 64),
        held_out=lambda model: _accuracy(_predict(model, x_test), y_test),
        held_out_name="held-out accuracy",
    )


# == the held-out set ===========================================================
#
# Problems never looked at while a controller's constants are tuned (see
# `HELD_OUT`). Every instance is made from a fixed seed (scikit-learn's
# generators or NumPy), the same for every run; the run's seed fixes the
# initial weights, the batch order and (with `Dropout`) the dropped units.


def _standardise(train, test):
    """Both arrays scaled by the training part's mean and std, float32."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return (((train - mean) / std).astype("float32"),
            ((test - mean) / std).astype("float32"))


def _mse(model, x, y):
    return float(np.mean((_predict(model, x) - y.reshape(-1, 1)) ** 2))


# -- a GRU classifying noisy waves by frequency ------------------------------------

WAVE_FREQUENCIES = (0.04, 0.07, 0.10, 0.13)  # cycles per time step, per class


@functools.lru_cache
def wave_data(n_train=4096, n_test=1024, length=40, noise=0.8, jitter=0.012):
    """Noisy sinusoids, each labelled by its frequency band (4 classes).

    A sequence of `length` steps is a·sin(2π f t + φ) + N(0, noise²), with
    f its class' frequency (`WAVE_FREQUENCIES`) ± U(−jitter, jitter), a
    random phase φ and an amplitude a ~ U(0.5, 1.5): neighbouring bands
    overlap a little and the noise is strong, so the classes are not
    perfectly separable (the loss has a floor above 0).
    """
    rng = np.random.default_rng(0)
    n = n_train + n_test
    labels = rng.integers(0, len(WAVE_FREQUENCIES), n)
    frequency = (np.asarray(WAVE_FREQUENCIES)[labels]
                 + rng.uniform(-jitter, jitter, n))
    phase = rng.uniform(0, 2 * np.pi, n)
    amplitude = rng.uniform(0.5, 1.5, n)
    t = np.arange(length)
    x = (amplitude[:, None] * np.sin(2 * np.pi * frequency[:, None] * t
                                     + phase[:, None])
         + noise * rng.standard_normal((n, length)))
    x = x[..., None].astype("float32")
    labels = labels.astype("int32")
    return (x[:n_train], labels[:n_train]), (x[n_train:], labels[n_train:])


def _wave_gru_model(seed):
    return keras.Sequential([keras.Input((40, 1)), keras.layers.GRU(32),
                             keras.layers.Dense(len(WAVE_FREQUENCIES))])


def _wave_gru_problem(steps):
    (x, y), (x_test, y_test) = wave_data()
    return Problem(
        name="wave_gru",
        description=(
            "GRU (32 units) + dense, classifying generated noisy sinusoids "
            f"(length {x.shape[1]}, noise std 0.8, random phase and "
            f"amplitude) into {len(WAVE_FREQUENCIES)} overlapping frequency "
            f"bands, {len(x)} train / {len(x_test)} held-out sequences, "
            "batch 64, cross-entropy"
        ),
        steps=steps,
        batch_size=64,
        lrs=log_grid(-2.5, 7),
        build_model=_wave_gru_model,
        loss=lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        stream=lambda seed, steps: epoch_stream(x, y, seed, steps, 64),
        held_out=lambda model: _accuracy(_predict(model, x_test), y_test),
        held_out_name="held-out accuracy",
    )


# -- an LSTM forecasting a noisy chaotic series ------------------------------------


@functools.lru_cache
def lorenz_data(points=6000, window=24, noise=0.05, held_out_fraction=0.2):
    """Next-value forecasting of the Lorenz system's x, observed with noise.

    The Lorenz system (σ = 10, ρ = 28, β = 8/3) integrated by RK4 with
    dt = 0.01 from (1, 1, 1), its first 1000 steps dropped, then sampled
    every 10 steps; x is standardised and observed with N(0, noise²) noise.
    Inputs: `window` consecutive observations; target: the next one. The
    series' last `held_out_fraction` is held out (no window crosses over).
    """
    def derivative(state):
        x, y, z = state
        return np.array([10.0 * (y - x), x * (28.0 - z) - y,
                         x * y - 8.0 / 3.0 * z])

    dt, every, burn_in = 0.01, 10, 1000
    state = np.ones(3)
    series = []
    for step in range(burn_in + points * every):
        k1 = derivative(state)
        k2 = derivative(state + dt / 2 * k1)
        k3 = derivative(state + dt / 2 * k2)
        k4 = derivative(state + dt * k3)
        state = state + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if step >= burn_in and (step - burn_in) % every == 0:
            series.append(state[0])
    series = np.asarray(series)
    series = (series - series.mean()) / series.std()
    series = series + noise * np.random.default_rng(0).standard_normal(points)
    series = series.astype("float32")

    def windows(part):
        index = np.arange(len(part) - window)[:, None] + np.arange(window + 1)
        chunks = part[index]
        return chunks[:, :-1, None], chunks[:, -1:]

    split = int(points * (1 - held_out_fraction))
    return windows(series[:split]), windows(series[split:])


def _lorenz_lstm_model(seed):
    return keras.Sequential([keras.Input((24, 1)), keras.layers.LSTM(32),
                             keras.layers.Dense(1)])


def _lorenz_lstm_problem(steps):
    (x, y), (x_test, y_test) = lorenz_data()
    return Problem(
        name="lorenz_lstm",
        description=(
            "LSTM (32 units) + dense forecasting the next value of the "
            "Lorenz system's x (standardised, observation noise std 0.05: "
            f"floor ≈ 0.0025) from the {x.shape[1]} before it, generated by "
            f"RK4; {len(x)} train / {len(x_test)} held-out windows (the "
            "series' last 20%), batch 64, MSE"
        ),
        steps=steps,
        batch_size=64,
        lrs=log_grid(-2.25, 7),
        build_model=_lorenz_lstm_model,
        loss=lambda: keras.losses.MeanSquaredError(),
        stream=lambda seed, steps: epoch_stream(x, y, seed, steps, 64),
        held_out=lambda model: _mse(model, x_test, y_test),
        held_out_name="held-out MSE",
        held_out_lower_is_better=True,
    )


# -- an MLP with BatchNormalization and Dropout on tabular data ---------------------


@functools.lru_cache
def tabular_data():
    """`make_classification`: 20 features (12 informative, 4 redundant),
    6 classes of 2 clusters each, 3% of the labels flipped; standardised."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=6000, n_features=20, n_informative=12, n_redundant=4,
        n_classes=6, n_clusters_per_class=2, flip_y=0.03, class_sep=1.0,
        random_state=0)
    split = 5000
    x_train, x_test = _standardise(x[:split], x[split:])
    y = y.astype("int32")
    return (x_train, y[:split]), (x_test, y[split:])


def _tabular_bn_model(seed):
    layers = [keras.Input((20,))]
    for _ in range(2):
        layers += [keras.layers.Dense(128), keras.layers.BatchNormalization(),
                   keras.layers.Activation("relu"), keras.layers.Dropout(0.2)]
    return keras.Sequential(layers + [keras.layers.Dense(6)])


def _tabular_bn_problem(steps):
    (x, y), (x_test, y_test) = tabular_data()
    return Problem(
        name="tabular_bn",
        description=(
            "MLP 20-128-128-6 with BatchNormalization and Dropout(0.2) after "
            "each hidden layer, on scikit-learn's `make_classification` (6 "
            "classes of 2 clusters, 12 informative of 20 features, 3% "
            f"labels flipped), {len(x)} train / {len(x_test)} held-out, batch "
            "64, cross-entropy (training loss with dropout on)"
        ),
        steps=steps,
        batch_size=64,
        lrs=log_grid(-3, 7),
        build_model=_tabular_bn_model,
        loss=lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        stream=lambda seed, steps: epoch_stream(x, y, seed, steps, 64),
        held_out=lambda model: _accuracy(_predict(model, x_test), y_test),
        held_out_name="held-out accuracy",
    )


# -- an autoencoder on data near a curved 6-dimensional manifold --------------------


@functools.lru_cache
def manifold_data(n_train=8192, n_test=1024, latent=6, hidden=32, dim=48,
                  noise=0.05):
    """48-dimensional points x = tanh(z·A)·B + noise, z ~ N(0, I₆).

    A (6x32) and B (32x48) are fixed Gaussian matrices; the noise has std
    `noise` before every feature is standardised. The data lies near a
    curved 6-dimensional manifold, which an 8-unit bottleneck can hold.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((latent, hidden)) * 1.5 / np.sqrt(latent)
    b = rng.standard_normal((hidden, dim)) / np.sqrt(hidden)
    z = rng.standard_normal((n_train + n_test, latent))
    x = np.tanh(z @ a) @ b + noise * rng.standard_normal((len(z), dim))
    return _standardise(x[:n_train], x[n_train:])


def _autoencoder_model(seed):
    return keras.Sequential([
        keras.Input((48,)),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(8),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(48),
    ])


def _autoencoder_problem(steps):
    x, x_test = manifold_data()

    def held_out_mse(model):
        return float(np.mean((_predict(model, x_test) - x_test) ** 2))

    return Problem(
        name="autoencoder",
        description=(
            "autoencoder 48-64-8-64-48 (ReLU, linear 8-unit bottleneck) on "
            "generated points near a curved 6-dimensional manifold, "
            "x = tanh(z·A)·B + noise in 48 dimensions (standardised), "
            f"{len(x)} train / {len(x_test)} held-out, batch 64, "
            "reconstruction MSE"
        ),
        steps=steps,
        batch_size=64,
        lrs=log_grid(-2.75, 7),
        build_model=_autoencoder_model,
        loss=lambda: keras.losses.MeanSquaredError(),
        stream=lambda seed, steps: epoch_stream(x, x, seed, steps, 64),
        held_out=held_out_mse,
        held_out_name="held-out MSE",
        held_out_lower_is_better=True,
    )


# -- a regression MLP on Friedman's benchmark function ------------------------------


@functools.lru_cache
def friedman_data():
    """`make_friedman1`: 10 uniform features (5 used), noise std 1;
    features and target standardised (the noise floor is then ≈ 0.04)."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=6000, n_features=10, noise=1.0,
                          random_state=0)
    split = 5000
    x_train, x_test = _standardise(x[:split], x[split:])
    y_train, y_test = _standardise(y[:split, None], y[split:, None])
    return (x_train, y_train), (x_test, y_test)


def _friedman_mlp_model(seed):
    return keras.Sequential([keras.Input((10,)),
                             keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(64, activation="relu"),
                             keras.layers.Dense(1)])


def _friedman_mlp_problem(steps):
    (x, y), (x_test, y_test) = friedman_data()
    return Problem(
        name="friedman_mlp",
        description=(
            "regression MLP 10-64-64-1 (ReLU) on scikit-learn's "
            "`make_friedman1` (10 features, 5 used, noise std 1; target "
            f"standardised: floor ≈ 0.04), {len(x)} train / {len(x_test)} "
            "held-out, batch 32, MSE"
        ),
        steps=steps,
        batch_size=32,
        lrs=log_grid(-3, 7),
        build_model=_friedman_mlp_model,
        loss=lambda: keras.losses.MeanSquaredError(),
        stream=lambda seed, steps: epoch_stream(x, y, seed, steps, 32),
        held_out=lambda model: _mse(model, x_test, y_test),
        held_out_name="held-out MSE",
        held_out_lower_is_better=True,
    )


# -- a wider CNN on generated images of shapes -------------------------------------

SHAPES = ("horizontal bar", "vertical bar", "diagonal bar", "square outline",
          "disc", "plus")


@functools.lru_cache
def shapes_data(n_train=6000, n_test=1000, size=16, noise=0.3):
    """16x16 images of one of `SHAPES` each, drawn with NumPy.

    Every shape has a random centre (within 4 pixels of the middle), size
    and intensity (U(0.6, 1)); Gaussian pixel noise of std `noise` on top.
    """
    rng = np.random.default_rng(0)
    n = n_train + n_test
    labels = rng.integers(0, len(SHAPES), n)
    rows, cols = np.mgrid[0:size, 0:size].astype("float64")
    middle = (size - 1) / 2

    def draw(count):
        return rng.uniform(0, 1, count)[:, None, None]

    cy = middle + 8 * (draw(n) - 0.5)
    cx = middle + 8 * (draw(n) - 0.5)
    dy, dx = rows - cy, cols - cx
    half = 2 + 3 * draw(n)  # half a bar's length, a square's half side
    radius = 2 + 2.5 * draw(n)
    flip = np.where(draw(n) < 0.5, 1.0, -1.0)
    masks = [
        (np.abs(dy) < 1.0) & (np.abs(dx) <= half),
        (np.abs(dx) < 1.0) & (np.abs(dy) <= half),
        (np.abs(dy - flip * dx) < 1.2) & (np.abs(dx) <= half / 1.4),
        np.abs(np.maximum(np.abs(dy), np.abs(dx)) - half) < 0.5,
        dy**2 + dx**2 <= radius**2,
        ((np.abs(dy) < 0.8) & (np.abs(dx) <= half))
        | ((np.abs(dx) < 0.8) & (np.abs(dy) <= half)),
    ]
    mask = np.choose(labels[:, None, None], masks)
    intensity = 0.6 + 0.4 * draw(n)
    images = intensity * mask + noise * rng.standard_normal((n, size, size))
    images = images[..., None].astype("float32")
    labels = labels.astype("int32")
    return ((images[:n_train], labels[:n_train]),
            (images[n_train:], labels[n_train:]))


def _shapes_cnn_model(seed):
    return keras.Sequential([
        keras.Input((16, 16, 1)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(len(SHAPES)),
    ])


def _shapes_cnn_problem(steps):
    (x, y), (x_test, y_test) = shapes_data()
    return Problem(
        name="shapes_cnn",
        description=(
            "wider CNN (conv 32, conv 32, pool, conv 64, pool, dense 64, 6; "
            "94K weights) on generated 16x16 images of 6 shapes (bars, "
            "square outline, disc, plus) at random places, sizes and "
            f"intensities with pixel noise std 0.3, {len(x)} train / "
            f"{len(x_test)} held-out images, batch 64, cross-entropy"
        ),
        steps=steps,
        batch_size=64,
        lrs=log_grid(-3.25, 7),
        build_model=_shapes_cnn_model,
        loss=lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        stream=lambda seed, steps: epoch_stream(x, y, seed, steps, 64),
        held_out=lambda model: _accuracy(_predict(model, x_test), y_test),
        held_out_name="held-out accuracy",
    )


# -- a long run of multinomial logistic regression ----------------------------------


@functools.lru_cache
def softmax_data():
    """`make_classification`: 40 features (25 informative, 5 redundant),
    10 classes, 5% of the labels flipped; standardised."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=10000, n_features=40, n_informative=25, n_redundant=5,
        n_classes=10, n_clusters_per_class=1, flip_y=0.05, class_sep=1.5,
        random_state=1)
    split = 8000
    x_train, x_test = _standardise(x[:split], x[split:])
    y = y.astype("int32")
    return (x_train, y[:split]), (x_test, y[split:])


def _softmax_model(seed):
    return keras.Sequential([keras.Input((40,)), keras.layers.Dense(10)])


def _softmax_long_problem(steps):
    (x, y), (x_test, y_test) = softmax_data()
    return Problem(
        name="softmax_long",
        description=(
            "multinomial logistic regression (40 features, 10 classes) on "
            "scikit-learn's `make_classification` with 5% of the labels "
            f"flipped, {len(x)} train / {len(x_test)} held-out, batch 32, "
            f"cross-entropy, a long run ({steps * 32 // len(x)} epochs): "
            "convex, with minibatch noise, so where a schedule ends matters"
        ),
        steps=steps,
        batch_size=32,
        lrs=log_grid(-3.25, 7),
        build_model=_softmax_model,
        loss=lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        stream=lambda seed, steps: epoch_stream(x, y, seed, steps, 32),
        held_out=lambda model: _accuracy(_predict(model, x_test), y_test),
        held_out_name="held-out accuracy",
    )


# == the sets ======================================================================

# The calibration set: the problems a controller's constants may be tuned on
# (the benchmark's original six; the README's tables are on them).
CALIBRATION = ("digits", "breast_cancer", "quadratic", "rosenbrock", "char_lm",
               "digits_cnn")
# The held-out set: never looked at while tuning; an optimizer is judged on
# it. Different data, architectures (recurrent, normalised and dropped-out,
# autoencoding, wider convolutional) and lengths of run from the calibration
# set's.
HELD_OUT = ("wave_gru", "lorenz_lstm", "tabular_bn", "autoencoder",
            "friedman_mlp", "shapes_cnn", "softmax_long")
SETS = {"calibration": CALIBRATION, "held_out": HELD_OUT,
        "all": CALIBRATION + HELD_OUT}
ALL_PROBLEMS = SETS["all"]
# The old name: the calibration set.
PROBLEM_NAMES = CALIBRATION


def problem_set(name):
    """The set (`"calibration"` or `"held_out"`) that problem `name` is in."""
    for set_name in ("calibration", "held_out"):
        if name in SETS[set_name]:
            return set_name
    raise KeyError(f"unknown problem {name!r}; choose from {ALL_PROBLEMS}")


def covered_set(names):
    """The set that the problems `names` make up: `"calibration"`,
    `"held_out"`, or `"all"` when they come from both."""
    found = {problem_set(name) for name in names}
    return found.pop() if len(found) == 1 else "all"


DEFAULT_STEPS = {
    "digits": 300,
    "breast_cancer": 300,
    "quadratic": 300,
    "rosenbrock": 500,
    "char_lm": 200,
    "digits_cnn": 600,
    "wave_gru": 400,
    "lorenz_lstm": 400,
    "tabular_bn": 400,
    "autoencoder": 500,
    "friedman_mlp": 500,
    "shapes_cnn": 400,
    "softmax_long": 2000,
}


# Priors for the progress line's ETA (`Cost`), measured on 2 CPU cores with
# JAX (Adam; `compile_s` includes the first run's retrace); the ETA corrects
# their scale with the times it measures, as a loaded machine is slower.
COSTS = {
    "digits": Cost(step_ms=0.25, run_s=0.05, compile_s=2.0),
    "breast_cancer": Cost(step_ms=0.17, run_s=0.04, compile_s=1.5),
    "quadratic": Cost(step_ms=0.16, run_s=0.04, compile_s=1.2),
    "rosenbrock": Cost(step_ms=0.10, run_s=0.04, compile_s=1.0),
    "char_lm": Cost(step_ms=40.0, run_s=0.3, compile_s=9.0),
    "digits_cnn": Cost(step_ms=5.5, run_s=0.2, compile_s=4.0),
    # The held-out set's, measured alike (on a busier machine, scaled by
    # `digits`' time measured beside them).
    "wave_gru": Cost(step_ms=1.0, run_s=0.15, compile_s=2.5),
    "lorenz_lstm": Cost(step_ms=0.55, run_s=0.1, compile_s=2.0),
    "tabular_bn": Cost(step_ms=0.55, run_s=0.03, compile_s=1.8),
    "autoencoder": Cost(step_ms=0.25, run_s=0.02, compile_s=1.7),
    "friedman_mlp": Cost(step_ms=0.15, run_s=0.02, compile_s=1.2),
    "shapes_cnn": Cost(step_ms=11.0, run_s=0.2, compile_s=5.0),
    "softmax_long": Cost(step_ms=0.1, run_s=0.02, compile_s=1.2),
}
# `char_lm`'s smaller Transformer of `--quick`.
QUICK_CHAR_LM_COST = Cost(step_ms=5.5, run_s=0.2, compile_s=8.0)


def expected_run_s(name):
    """Seconds of one Adam run of `name` at its own steps, by `COSTS`
    (compilation aside)."""
    cost = COSTS[name]
    return cost.run_s + DEFAULT_STEPS[name] * cost.step_ms / 1000


def make_problem(name, steps=None, quick=False):
    """Returns the problem `name`, trained for `steps` (default: its own)."""
    steps = steps or DEFAULT_STEPS[name]
    if name == "char_lm" and quick:
        # A smaller Transformer: the quick run is dominated by compilation.
        problem = _char_lm_problem(steps, seq_len=32, dim=32, layers=1)
        return dataclasses.replace(problem, cost=QUICK_CHAR_LM_COST)
    builders = {
        "digits": _digits_problem,
        "breast_cancer": _breast_cancer_problem,
        "quadratic": _quadratic_problem,
        "rosenbrock": _rosenbrock_problem,
        "char_lm": _char_lm_problem,
        "digits_cnn": _digits_cnn_problem,
        "wave_gru": _wave_gru_problem,
        "lorenz_lstm": _lorenz_lstm_problem,
        "tabular_bn": _tabular_bn_problem,
        "autoencoder": _autoencoder_problem,
        "friedman_mlp": _friedman_mlp_problem,
        "shapes_cnn": _shapes_cnn_problem,
        "softmax_long": _softmax_long_problem,
    }
    return dataclasses.replace(builders[name](steps), cost=COSTS[name])
