"""The benchmark's problems: small, real, offline, each a Keras model for `fit`.

One table, `PROBLEMS`, of `Problem(...)` rows holding everything about each (set,
data, model, loss, steps, rate grid, held-out metric, expected cost). A seed fixes
the initial weights and batch order; the data is the same for every seed, optimizer
and rate. Sets: `calibration` (six; a controller's constants may be tuned on them)
and `held_out` (ten others, different in data and architecture, never looked at
while tuning; an optimizer is judged on them).
"""

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                "..", "examples"))
import transformer_lm  # noqa: E402
from _data import digits  # noqa: E402


class Metric(NamedTuple):
    """A held-out metric: `function(model, x_test, y_test) -> float`."""

    name: str
    function: Callable
    lower_is_better: bool


def predict(model, x):
    # A direct call: `predict` would compile a function for every new model.
    return np.asarray(ops.convert_to_numpy(model(x, training=False)), "float64")


def accuracy(model, x, labels):
    logits = predict(model, x)
    predicted = ((logits[:, 0] > 0).astype(labels.dtype) if logits.shape[-1] == 1
                 else logits.argmax(-1))
    return float(np.mean(predicted == labels.reshape(predicted.shape)))


def mse(model, x, y):
    predicted = predict(model, x)
    return float(np.mean((predicted - y.reshape(predicted.shape)) ** 2))


def perplexity(model, ids, _):
    """Per-character perplexity on consecutive windows of the held-out text."""
    x, y = transformer_lm.consecutive_windows(ids, model.input_shape[1])
    logits = predict(model, x)
    logits -= logits.max(-1, keepdims=True)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(log_probs, y[..., None], -1).mean()))


ACCURACY = Metric("held-out accuracy", accuracy, False)
MSE = Metric("held-out MSE", mse, True)
PERPLEXITY = Metric("held-out perplexity", perplexity, True)


def epoch_stream(x, y, seed, steps, batch_size):
    """`steps` batches of passes over `(x, y)`, each pass in a seeded order."""
    rng = np.random.default_rng(seed)
    needed = steps * batch_size
    order = np.concatenate([rng.permutation(len(x))
                            for _ in range(-(-needed // len(x)))])[:needed]
    return x[order], y[order]


def sparse_cross_entropy():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem: a row of `PROBLEMS`.

    `data()` returns `((x, y), (x_test, y_test))` (cache it); `model(seed)` an
    uncompiled model (built right after `runner.seed_everything(seed)`); `stream(x,
    y, seed, steps, batch_size)` the `(x, y)` of `steps` batches in training order.
    `description` may name `{n_train}`, `{n_test}` (`{k_train}`, `{k_test}` in
    thousands) and `{epochs}`. `step_ms`: Adam's ms/step on 2 CPU cores (JAX), for
    the ETA and the default mode (Adam runs of at most `compare.FAST_RUN_S`).
    `quick`: the problem `--quick` runs instead (a smaller model), if any.
    """

    name: str
    set: str
    description: str
    steps: int
    batch_size: int
    lrs: tuple
    data: Callable
    model: Callable
    loss: Callable = sparse_cross_entropy
    metric: Metric | None = ACCURACY
    stream: Callable = epoch_stream
    step_ms: float = 1.0
    exact_gradients: bool = False  # full-batch: curves plotted unsmoothed
    # `fit`'s epochs: at most this many steps (its loss tracker resets every epoch,
    # so the per-batch loss read from it stays accurate).
    steps_per_epoch: int = 25
    quick: "Problem | None" = None

    def batches(self, seed, steps=None):
        (x, y), _ = self.data()
        return self.stream(x, y, seed, steps or self.steps, self.batch_size)

    def held_out(self, model):
        if self.metric is None:
            return None
        return self.metric.function(model, *self.data()[1])

    def expected_s(self):
        """Seconds of one Adam run at its own steps (2 CPU cores, JAX)."""
        return self.steps * self.step_ms / 1000

    def describe(self, learning_rates):
        """The problem as `results.json` and the report state it."""
        (x, _), test = self.data()
        n_train, n_test = len(x), len(test[0]) if test else 0
        return {
            "description": self.description.format(
                n_train=n_train, n_test=n_test, k_train=n_train // 1000,
                k_test=n_test // 1000, epochs=self.steps * self.batch_size // n_train),
            "steps": self.steps, "batch_size": self.batch_size,
            "lrs": list(learning_rates),
            "held_out_name": self.metric and self.metric.name,
            "held_out_lower_is_better": bool(
                self.metric and self.metric.lower_is_better),
            "final_window": max(1, self.steps // 10),
            "exact_gradients": self.exact_gradients, "set": self.set,
        }


def log_grid(low_exponent, count, per_decade=4):
    """`count` learning rates from 10**low_exponent, `per_decade` per decade."""
    return tuple(float(f"{10 ** (low_exponent + k / per_decade):.2g}")
                 for k in range(count))


def standardise(train, test):
    """Both arrays scaled by the training part's mean and std, float32."""
    mean, std = train.mean(0), train.std(0)
    std = np.where(std > 0, std, 1.0)
    return (((train - mean) / std).astype("float32"),
            ((test - mean) / std).astype("float32"))


def stack(shape, *layers):
    """`seed -> Sequential`: an input of `shape`, then `layer()` of each."""
    return lambda seed: keras.Sequential([keras.Input(shape)] + [m() for m in layers])


def dense(units, activation=None):
    return lambda: keras.layers.Dense(units, activation=activation)


def conv(filters):
    return lambda: keras.layers.Conv2D(filters, 3, padding="same", activation="relu")


# -- calibration data -------------------------------------------------------------


@functools.cache
def breast_cancer_data():
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y, split = x[order], y[order].astype("float32"), int(0.8 * len(x))
    x_train, x_test = standardise(x[:split], x[split:])
    return (x_train, y[:split, None]), (x_test, y[split:])


@functools.cache
def quadratic_data(dim=100, n_train=4096, n_test=1024, condition=1e3, noise=0.1):
    """Least squares, Hessian eigenvalues log-spaced in [1/condition, 1] in a random
    rotation, each eigen-direction an equal share of the initial loss; label noise
    of std `noise` (floor ≈ `noise**2`)."""
    rng = np.random.default_rng(0)
    eigenvalues = np.logspace(0, -np.log10(condition), dim)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    w_star = rotation @ (rng.standard_normal(dim) / np.sqrt(eigenvalues * dim))

    def sample(n):
        x = (rng.standard_normal((n, dim)) * np.sqrt(eigenvalues)) @ rotation.T
        y = x @ w_star + noise * rng.standard_normal(n)
        return x.astype("float32"), y[:, None].astype("float32")

    return sample(n_train), sample(n_test)


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
            shape=np.shape(initial_value), name="theta",
            initializer=keras.initializers.Constant(initial_value))

    def call(self, inputs):
        return ops.zeros_like(inputs[:, :1]) + self.function(self.theta)


def rosenbrock_model(seed):
    """θ from the classic start (−1.2, 1) plus N(0, 0.1²) noise."""
    noise = 0.1 * np.random.default_rng(seed).standard_normal(2)
    start = (np.array([-1.2, 1.0]) + noise).astype("float32")
    inputs = keras.Input((1,))
    return keras.Model(inputs, FunctionValue(rosenbrock, start)(inputs))


def function_value_loss(y_true, y_pred):
    """The loss is the model's output: the function value itself."""
    return y_pred[:, 0]


def char_lm_problem(seq_len, dim, layers, step_ms, quick=None, batch_size=32):
    def data():
        train_ids, held_out_ids = transformer_lm.split_ids()
        return (train_ids, train_ids), (held_out_ids, held_out_ids)

    return Problem(
        "char_lm", "calibration",
        f"character-level Transformer ({layers} pre-norm blocks, width {dim}, "
        f"context {seq_len}) on {{k_train}}K characters of Python standard "
        "library source, the last {k_test}K held out, batch "
        f"{batch_size} random windows, cross-entropy (nats/char)",
        steps=200, batch_size=batch_size, lrs=log_grid(-2.75, 3),
        data=functools.cache(data), step_ms=step_ms,
        model=lambda seed: transformer_lm.build_model(seq_len, dim, layers=layers),
        loss=transformer_lm.lm_loss, metric=PERPLEXITY,
        stream=lambda ids, _, seed, steps, batch: transformer_lm.random_windows(
            ids, steps * batch, seq_len, seed),
        quick=quick)


@functools.cache
def digits_16x16():
    """The digits at 16x16 (each pixel doubled), with a channel axis."""
    (x, y), (x_test, y_test) = digits()

    def upsample(images):
        return np.kron(images.reshape(-1, 8, 8),
                       np.ones((1, 2, 2), "float32"))[..., None]

    return (upsample(x), y), (upsample(x_test), y_test)


def shifted_stream(x, y, seed, steps, batch_size, max_shift=2):
    """`epoch_stream` batches, each image moved by up to `max_shift` pixels per axis
    (uniform, drawn from the seed): every image seen is new."""
    images, labels = epoch_stream(x, y, seed, steps, batch_size)
    rng = np.random.default_rng([seed, 1])
    size = images.shape[1]
    padded = np.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift),
                             (0, 0)))
    shifts = rng.integers(0, 2 * max_shift + 1, (len(images), 2))
    rows = shifts[:, :1] + np.arange(size)
    cols = shifts[:, 1:] + np.arange(size)
    index = np.arange(len(images))[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]], labels


# -- held-out data ----------------------------------------------------------------

WAVE_FREQUENCIES = (0.04, 0.07, 0.10, 0.13)  # cycles per time step, per class


@functools.cache
def wave_data(n_train=4096, n_test=1024, length=40, noise=0.8, jitter=0.012):
    """Noisy sinusoids a·sin(2π f t + φ) + N(0, noise²), labelled by f's
    band (`WAVE_FREQUENCIES` ± U(−jitter, jitter)): overlapping classes."""
    rng = np.random.default_rng(0)
    n = n_train + n_test
    labels = rng.integers(0, len(WAVE_FREQUENCIES), n)
    frequency = np.asarray(WAVE_FREQUENCIES)[labels] + rng.uniform(-jitter, jitter, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    amplitude = rng.uniform(0.5, 1.5, n)
    t = np.arange(length)
    x = (amplitude[:, None] * np.sin(2 * np.pi * frequency[:, None] * t
                                     + phase[:, None])
         + noise * rng.standard_normal((n, length)))
    x = x[..., None].astype("float32")
    labels = labels.astype("int32")
    return (x[:n_train], labels[:n_train]), (x[n_train:], labels[n_train:])


@functools.cache
def lorenz_data(points=6000, window=24, noise=0.05, held_out_fraction=0.2):
    """Windows of `window` values of the Lorenz system's x (RK4, dt 0.01; standardised,
    plus noise), the next value as target; the last `held_out_fraction` held out."""
    def derivative(state):
        x, y, z = state
        return np.array([10.0 * (y - x), x * (28.0 - z) - y, x * y - 8.0 / 3.0 * z])

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
        chunks = part[np.arange(len(part) - window)[:, None] + np.arange(window + 1)]
        return chunks[:, :-1, None], chunks[:, -1:]

    split = int(points * (1 - held_out_fraction))
    return windows(series[:split]), windows(series[split:])


@functools.cache
def classification_data(n_samples, n_features, n_informative, n_redundant, n_classes,
                        n_clusters_per_class, flip_y, class_sep, random_state, split):
    """scikit-learn's `make_classification`, standardised."""
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=n_samples, n_features=n_features, n_informative=n_informative,
        n_redundant=n_redundant, n_classes=n_classes,
        n_clusters_per_class=n_clusters_per_class, flip_y=flip_y,
        class_sep=class_sep, random_state=random_state)
    x_train, x_test = standardise(x[:split], x[split:])
    y = y.astype("int32")
    return (x_train, y[:split]), (x_test, y[split:])


def tabular_bn_model(seed):
    layers = [keras.Input((20,))]
    for _ in range(2):
        layers += [keras.layers.Dense(128), keras.layers.BatchNormalization(),
                   keras.layers.Activation("relu"), keras.layers.Dropout(0.2)]
    return keras.Sequential(layers + [keras.layers.Dense(6)])


@functools.cache
def manifold_data(n_train=8192, n_test=1024, latent=6, hidden=32, dim=48, noise=0.05):
    """Points x = tanh(z·A)·B + noise near a curved 6-dimensional manifold in 48
    dimensions (A, B fixed Gaussian; z ~ N(0, I₆)), standardised."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((latent, hidden)) * 1.5 / np.sqrt(latent)
    b = rng.standard_normal((hidden, dim)) / np.sqrt(hidden)
    z = rng.standard_normal((n_train + n_test, latent))
    x = np.tanh(z @ a) @ b + noise * rng.standard_normal((len(z), dim))
    x_train, x_test = standardise(x[:n_train], x[n_train:])
    return (x_train, x_train), (x_test, x_test)


@functools.cache
def friedman_data():
    """`make_friedman1` (10 features, 5 used, noise std 1), standardised."""
    from sklearn.datasets import make_friedman1

    x, y = make_friedman1(n_samples=6000, n_features=10, noise=1.0, random_state=0)
    x_train, x_test = standardise(x[:5000], x[5000:])
    y_train, y_test = standardise(y[:5000, None], y[5000:, None])
    return (x_train, y_train), (x_test, y_test)


SHAPES = ("horizontal bar", "vertical bar", "diagonal bar", "square outline",
          "disc", "plus")


@functools.cache
def shapes_data(n_train=6000, n_test=1000, size=16, noise=0.3):
    """16x16 images of one of `SHAPES` each, at random places, sizes and intensities,
    plus N(0, noise²) pixels."""
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
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])


def language_reference_text():
    """The Python language reference that CPython ships for `help()`: the text of
    every topic of `pydoc_data.topics`, in sorted order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[name] for name in sorted(topics))


def hub_lm_model(seq_len, dim, heads, layers):
    """A causal Transformer of keras-hub's layers, randomly initialised: token and
    position embedding, `layers` pre-norm `TransformerDecoder` blocks (no encoder:
    causal self-attention only), a final LayerNormalization and next-character
    logits."""
    import keras_hub  # the `hub` extra: imported only when this model is built

    tokens = keras.Input((seq_len,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        transformer_lm.VOCAB_SIZE, seq_len, dim)(tokens)
    for _ in range(layers):
        x = keras_hub.layers.TransformerDecoder(
            4 * dim, heads, activation="gelu", normalize_first=True)(x)
    x = keras.layers.LayerNormalization(epsilon=1e-5)(x)
    return keras.Model(tokens, keras.layers.Dense(transformer_lm.VOCAB_SIZE)(x))


def hub_lm_problem(seq_len, dim, heads, layers, step_ms, quick=None, batch_size=32):
    def data():
        train_ids, held_out_ids = transformer_lm.split_ids(language_reference_text())
        return (train_ids, train_ids), (held_out_ids, held_out_ids)

    return Problem(
        "hub_lm", "held_out",
        f"keras-hub Transformer language model (TokenAndPositionEmbedding, {layers} "
        f"pre-norm TransformerDecoder blocks, width {dim}, {heads} heads, context "
        f"{seq_len}; random initialisation) at character level on {{k_train}}K "
        "characters of the Python language reference CPython ships "
        "(`pydoc_data.topics`), the last {k_test}K held out, batch "
        f"{batch_size} random windows, cross-entropy (nats/char)",
        # Three rates half a decade apart, as for `char_lm`: the held-out set's
        # most expensive problem.
        steps=400, batch_size=batch_size, lrs=log_grid(-3.25, 3, per_decade=2),
        data=functools.cache(data), step_ms=step_ms,
        model=lambda seed: hub_lm_model(seq_len, dim, heads, layers),
        loss=transformer_lm.lm_loss, metric=PERPLEXITY,
        stream=lambda ids, _, seed, steps, batch: transformer_lm.random_windows(
            ids, steps * batch, seq_len, seed),
        quick=quick)


@functools.cache
def topic_bag_data(n_train=32000, n_test=2000, vocab=2000, length=20, classes=8,
                   topic_words=100, common=200, flip=0.05):
    """Token sequences whose class is a hidden topic: each class owns
    `topic_words` words drawn outside the `common` most frequent background words
    (topics may share words), and a sequence mixes a share U(0.1, 0.35) of its
    class' topic words, half that of another topic's (a distractor) and the rest
    background words (Zipf-distributed over the whole vocabulary); `flip` of the
    labels are then drawn at random. Enough sequences for one pass of the
    problem's steps: every training batch is new."""
    rng = np.random.default_rng(0)
    topics = np.stack([rng.choice(np.arange(common, vocab), topic_words,
                                  replace=False) for _ in range(classes)])
    zipf = 1.0 / np.arange(1, vocab + 1)
    n = n_train + n_test
    labels = rng.integers(0, classes, n)
    distractor = (labels + rng.integers(1, classes, n)) % classes
    share = rng.uniform(0.1, 0.35, n)[:, None]
    draw = rng.uniform(0, 1, (n, length))
    tokens = np.where(
        draw < share, topics[labels[:, None], rng.integers(0, topic_words,
                                                           (n, length))],
        np.where(draw < 1.5 * share,
                 topics[distractor[:, None], rng.integers(0, topic_words,
                                                          (n, length))],
                 rng.choice(vocab, (n, length), p=zipf / zipf.sum())))
    flipped = rng.uniform(0, 1, n) < flip
    labels = np.where(flipped, rng.integers(0, classes, n), labels)
    tokens, labels = tokens.astype("int32"), labels.astype("int32")
    return (tokens[:n_train], labels[:n_train]), (tokens[n_train:], labels[n_train:])


GRATING_CLASSES = 8  # 4 orientations x 2 spatial-frequency bands


@functools.cache
def gratings_data(n_train=12000, n_test=2000, size=16, noise=0.9):
    """16x16 Gabor-like patches: a sinusoidal grating (orientation 0, 45, 90 or 135
    degrees ± U(−20, 20), 0.12 or 0.24 cycles per pixel ± 20%, random phase and
    contrast) under a Gaussian window at a random place, plus N(0, noise²) pixels;
    the class is (orientation, frequency band): 8 classes, told apart only
    through the noise near the jitter's edges and in faint or small patches."""
    rng = np.random.default_rng(0)
    n = n_train + n_test
    labels = rng.integers(0, GRATING_CLASSES, n)

    def draw(low, high):
        return rng.uniform(low, high, n)[:, None, None]

    angle = np.deg2rad(45.0 * (labels % 4))[:, None, None] + np.deg2rad(draw(-20, 20))
    frequency = np.where(labels < 4, 0.12, 0.24)[:, None, None] * draw(0.8, 1.2)
    rows, cols = np.mgrid[0:size, 0:size].astype("float64")
    wave = np.sin(2 * np.pi * frequency * (cols * np.cos(angle) + rows * np.sin(angle))
                  + draw(0, 2 * np.pi))
    cy, cx = draw(4, size - 5), draw(4, size - 5)
    width = draw(3, 6)
    window = np.exp(-((rows - cy) ** 2 + (cols - cx) ** 2) / (2 * width**2))
    images = (draw(0.6, 1.2) * wave * window
              + noise * rng.standard_normal((n, size, size)))
    images = images[..., None].astype("float32")
    labels = labels.astype("int32")
    return (images[:n_train], labels[:n_train]), (images[n_train:], labels[n_train:])


def resnet_model(seed, size=16, filters=(16, 32, 64), blocks=2,
                 classes=GRATING_CLASSES):
    """A small ResNet: a conv stem, then per stage `blocks` basic residual blocks
    (conv-BN-ReLU-conv-BN, added to the input, ReLU), the first of each stage after
    the first at stride 2 with a 1x1 conv-BN shortcut; global average pooling and
    a dense layer."""
    layers = keras.layers

    def conv_bn(x, width, strides=1, kernel=3):
        x = layers.Conv2D(width, kernel, strides=strides, padding="same",
                          use_bias=False)(x)
        return layers.BatchNormalization()(x)

    inputs = keras.Input((size, size, 1))
    x = layers.Activation("relu")(conv_bn(inputs, filters[0]))
    for stage, width in enumerate(filters):
        for block in range(blocks):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = (conv_bn(x, width, strides, kernel=1) if strides > 1 else x)
            h = layers.Activation("relu")(conv_bn(x, width, strides))
            x = layers.Activation("relu")(layers.Add()([shortcut, conv_bn(h, width)]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(classes)(x))


# == the table ======================================================================


def table(*problems):
    return {problem.name: problem for problem in problems}


PROBLEMS = table(
    # -- the calibration set: a controller's constants may be tuned on these.
    Problem("digits", "calibration",
        "MLP 64-128-10 (ReLU) on scikit-learn's digits, {n_train} train / "
        "{n_test} held-out images, batch 64, cross-entropy",
        steps=300, batch_size=64, lrs=log_grid(-2.5, 7), data=digits,
        model=stack((64,), dense(128, "relu"), dense(10)), step_ms=0.25),
    Problem("breast_cancer", "calibration",
        "logistic regression on scikit-learn's breast cancer data (standardised), "
        "{n_train} train / {n_test} held-out, batch 32, binary cross-entropy",
        steps=300, batch_size=32, lrs=log_grid(-2, 7), data=breast_cancer_data,
        model=stack((30,), dense(1)), step_ms=0.17,
        loss=lambda: keras.losses.BinaryCrossentropy(from_logits=True)),
    Problem("quadratic", "calibration",
        "noisy ill-conditioned quadratic: least squares on 100 features, "
        "Hessian condition number 1e3 in a random rotation, label noise 0.1 "
        "(floor ≈ 0.01), {n_train} train samples, batch 32, MSE",
        steps=300, batch_size=32, lrs=log_grid(-1.75, 7), data=quadratic_data,
        model=stack((100,), lambda: keras.layers.Dense(1, use_bias=False)),
        loss=keras.losses.MeanSquaredError, metric=MSE, step_ms=0.16),
    Problem("rosenbrock", "calibration",
        "the 2-D Rosenbrock function 100·(y − x²)² + (1 − x)² of one Keras variable "
        "(x, y), from the classic start (−1.2, 1) + N(0, 0.1²) per seed; the loss is "
        "the function itself (exact gradients, minimum 0 at (1, 1))",
        # Wide: SOAA and Adam need very different rates here.
        steps=500, batch_size=1, lrs=log_grid(-2, 9, per_decade=2),
        data=lambda: ((np.zeros((1, 1), "float32"),) * 2, None),
        model=rosenbrock_model, loss=lambda: function_value_loss, metric=None,
        step_ms=0.10, exact_gradients=True),
    # Three rates only: by far the most expensive problem. `--quick` runs a
    # smaller Transformer (the quick run is dominated by compilation).
    char_lm_problem(64, 48, 2, step_ms=40.0,
                    quick=char_lm_problem(32, 32, 1, step_ms=5.5)),
    Problem("digits_cnn", "calibration",
        "CNN (conv 16, pool, conv 32, pool, dense 64, 10; 38K weights) on "
        "scikit-learn's digits upsampled to 16x16, every training image shifted by up "
        "to 2 pixels at random, {n_train} train / {n_test} held-out (unshifted) "
        "images, batch 64, cross-entropy ({epochs} epochs)",
        # Three points, half a decade apart: the longest run of the set.
        steps=600, batch_size=64, lrs=log_grid(-2.75, 3, per_decade=2),
        data=digits_16x16, stream=shifted_stream, step_ms=5.5,
        model=stack((16, 16, 1), conv(16), keras.layers.MaxPooling2D, conv(32),
                    keras.layers.MaxPooling2D, keras.layers.Flatten,
                    dense(64, "relu"), dense(10))),
    # -- the held-out set: never looked at while tuning.
    Problem("wave_gru", "held_out",
        "GRU (32 units) + dense, classifying generated noisy sinusoids (length 40, "
        "noise std 0.8, random phase and amplitude) into 4 overlapping frequency "
        "bands, {n_train} train / {n_test} held-out sequences, batch 64, cross-entropy",
        steps=400, batch_size=64, lrs=log_grid(-2.5, 7), data=wave_data, step_ms=1.0,
        model=stack((40, 1), lambda: keras.layers.GRU(32),
                    dense(len(WAVE_FREQUENCIES)))),
    Problem("lorenz_lstm", "held_out",
        "LSTM (32 units) + dense forecasting the next value of the Lorenz system's x "
        "(standardised, observation noise std 0.05: floor ≈ 0.0025) from the 24 "
        "before it, generated by RK4; {n_train} train / {n_test} held-out windows "
        "(the series' last 20%), batch 64, MSE",
        steps=400, batch_size=64, lrs=log_grid(-2.25, 7), data=lorenz_data,
        model=stack((24, 1), lambda: keras.layers.LSTM(32), dense(1)),
        loss=keras.losses.MeanSquaredError, metric=MSE, step_ms=0.55),
    Problem("tabular_bn", "held_out",
        "MLP 20-128-128-6 with BatchNormalization and Dropout(0.2) after each hidden "
        "layer, on scikit-learn's `make_classification` (6 classes of 2 clusters, 12 "
        "informative of 20 features, 3% labels flipped), {n_train} train / {n_test} "
        "held-out, batch 64, cross-entropy (training loss with dropout on)",
        steps=400, batch_size=64, lrs=log_grid(-3, 7), model=tabular_bn_model,
        data=lambda: classification_data(6000, 20, 12, 4, 6, 2, 0.03, 1.0, 0, 5000),
        step_ms=0.55),
    Problem("autoencoder", "held_out",
        "autoencoder 48-64-8-64-48 (ReLU, linear 8-unit bottleneck) on generated "
        "points near a curved 6-dimensional manifold, x = tanh(z·A)·B + noise in 48 "
        "dimensions (standardised), {n_train} train / {n_test} held-out, batch 64, "
        "reconstruction MSE",
        steps=500, batch_size=64, lrs=log_grid(-2.75, 7), data=manifold_data,
        model=stack((48,), dense(64, "relu"), dense(8), dense(64, "relu"), dense(48)),
        loss=keras.losses.MeanSquaredError, metric=MSE, step_ms=0.25),
    Problem("friedman_mlp", "held_out",
        "regression MLP 10-64-64-1 (ReLU) on scikit-learn's `make_friedman1` "
        "(10 features, 5 used, noise std 1; target standardised: floor ≈ "
        "0.04), {n_train} train / {n_test} held-out, batch 32, MSE",
        steps=500, batch_size=32, lrs=log_grid(-3, 7), data=friedman_data,
        model=stack((10,), dense(64, "relu"), dense(64, "relu"), dense(1)),
        loss=keras.losses.MeanSquaredError, metric=MSE, step_ms=0.15),
    Problem("shapes_cnn", "held_out",
        "wider CNN (conv 32, conv 32, pool, conv 64, pool, dense 64, 6; 94K weights) "
        "on generated 16x16 images of 6 shapes (bars, square outline, disc, plus) at "
        "random places, sizes and intensities with pixel noise std 0.3, {n_train} "
        "train / {n_test} held-out images, batch 64, cross-entropy",
        steps=400, batch_size=64, lrs=log_grid(-3.25, 7), data=shapes_data,
        model=stack((16, 16, 1), conv(32), conv(32), keras.layers.MaxPooling2D,
                    conv(64), keras.layers.MaxPooling2D, keras.layers.Flatten,
                    dense(64, "relu"), dense(len(SHAPES))), step_ms=11.0),
    Problem("softmax_long", "held_out",
        "multinomial logistic regression (40 features, 10 classes) on scikit-learn's "
        "`make_classification` with 5% of the labels flipped, {n_train} train / "
        "{n_test} held-out, batch 32, cross-entropy, a long run ({epochs} epochs): "
        "convex, with minibatch noise, so where a schedule ends matters",
        steps=2000, batch_size=32, lrs=log_grid(-3.25, 7),
        data=lambda: classification_data(10000, 40, 25, 5, 10, 1, 0.05, 1.5, 1, 8000),
        model=stack((40,), dense(10)), step_ms=0.1),
    # The held-out set's most expensive problem (about an hour of `--full`).
    # `--quick` runs a smaller Transformer (the quick run is dominated by
    # compilation).
    hub_lm_problem(64, 64, 4, 2, step_ms=50.0,
                   quick=hub_lm_problem(32, 32, 2, 1, step_ms=6.0)),
    Problem("embedding_bag", "held_out",
        "bag of embeddings: Embedding(2000, 32) (sparse gradients on TensorFlow), "
        "global average pooling, dense 8, on generated sequences of 20 tokens whose "
        "class is a hidden topic (100 words each, outside the 200 commonest, mixed "
        "with a distractor topic and Zipf-distributed background words; 5% of "
        "labels random), {n_train} train (one pass) / {n_test} held-out, batch 64, "
        "cross-entropy",
        steps=500, batch_size=64, lrs=log_grid(-3.25, 7), data=topic_bag_data,
        model=stack((20,), lambda: keras.layers.Embedding(2000, 32),
                    keras.layers.GlobalAveragePooling1D, dense(8)), step_ms=0.6),
    Problem("resnet_cnn", "held_out",
        "ResNet (conv stem, 3 stages of 2 residual blocks with BatchNormalization, "
        "16/32/64 filters, global average pooling, dense 8; 176K weights) on "
        "generated 16x16 "
        "Gabor-like patches, 4 orientations x 2 spatial frequencies with jitter, "
        "random place, phase and contrast, pixel noise std 0.9, {n_train} train / "
        "{n_test} held-out images, batch 64, cross-entropy ({epochs} epochs)",
        # Three rates half a decade apart: the second most expensive.
        steps=400, batch_size=64, lrs=log_grid(-3.25, 3, per_decade=2),
        data=gratings_data, model=resnet_model, step_ms=20.0),
)


def in_set(name):
    """The problems of a set (`calibration`, `held_out` or `all`), in order."""
    return [p for p, row in PROBLEMS.items() if name == "all" or row.set == name]


def covered_set(names):
    """The set that problems `names` make up (`all` when they mix sets)."""
    found = {PROBLEMS[name].set for name in names}
    return found.pop() if len(found) == 1 else "all"


def get(name, steps=None, quick=False):
    """Problem `name` (its `quick` variant with `quick`), run for `steps`."""
    problem = PROBLEMS[name]
    if quick and problem.quick is not None:
        problem = problem.quick
    return dataclasses.replace(problem, steps=steps or problem.steps)
