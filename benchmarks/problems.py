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


PROBLEM_NAMES = ("digits", "breast_cancer", "quadratic", "rosenbrock", "char_lm",
                 "digits_cnn")
DEFAULT_STEPS = {
    "digits": 300,
    "breast_cancer": 300,
    "quadratic": 300,
    "rosenbrock": 500,
    "char_lm": 200,
    "digits_cnn": 600,
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
}
# `char_lm`'s smaller Transformer of `--quick`.
QUICK_CHAR_LM_COST = Cost(step_ms=5.5, run_s=0.2, compile_s=8.0)


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
    }
    return dataclasses.replace(builders[name](steps), cost=COSTS[name])
