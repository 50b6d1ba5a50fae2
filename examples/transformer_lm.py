"""A small character-level Transformer language model trained with SOAA.

The text is Python's own standard library source (a few modules read from
`os.path.dirname(os.__file__)`, in a fixed order), so the example runs
offline on every Python install. The last 10% of the text is held out; the
example prints the held-out loss (nats per character) and perplexity, then
samples a few characters from the model.

    python examples/transformer_lm.py [--steps N] [--sample-chars N]

The data and model code here is shared: `benchmarks/problems.py` imports it
for the benchmark's language-model problem.
"""

import argparse
import os

import keras
import numpy as np

import keras_soaa

# Modules of the standard library every CPython 3.10+ carries, read in this
# order (about 200 KB in all); missing ones are skipped.
STDLIB_FILES = (
    "functools.py",
    "os.py",
    "random.py",
    "textwrap.py",
    "contextlib.py",
    "heapq.py",
    "string.py",
    "copy.py",
)
# Index 0 stands for any character outside printable ASCII and newline.
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
VOCAB_SIZE = len(ALPHABET) + 1
_CODES = {char: index + 1 for index, char in enumerate(ALPHABET)}


def stdlib_text(max_chars=300_000):
    """Returns the text of `STDLIB_FILES`, concatenated, at most `max_chars`."""
    root = os.path.dirname(os.__file__)
    parts = []
    for name in STDLIB_FILES:
        path = os.path.join(root, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as file:
                parts.append(file.read())
    text = "\n".join(parts)[:max_chars]
    if len(text) < 10_000:
        raise RuntimeError(f"Found too little standard library source in {root}")
    return text


def encode(text):
    """Maps characters to integer ids in `[0, VOCAB_SIZE)`."""
    return np.array([_CODES.get(char, 0) for char in text], dtype="int32")


def decode(ids):
    """Maps ids back to characters (id 0 becomes `?`)."""
    return "".join(ALPHABET[i - 1] if i > 0 else "?" for i in ids)


def split_ids(text=None, held_out_fraction=0.1):
    """Returns `(train_ids, held_out_ids)`: the text's head and its tail."""
    ids = encode(stdlib_text() if text is None else text)
    split = int(len(ids) * (1 - held_out_fraction))
    return ids[:split], ids[split:]


def random_windows(ids, count, seq_len, seed):
    """`count` windows at random offsets: inputs and next-character targets."""
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len, count)
    index = starts[:, None] + np.arange(seq_len + 1)
    windows = ids[index]
    return windows[:, :-1], windows[:, 1:]


def consecutive_windows(ids, seq_len):
    """Non-overlapping windows covering `ids`, for held-out evaluation."""
    count = (len(ids) - 1) // seq_len
    x = ids[: count * seq_len].reshape(count, seq_len)
    y = ids[1 : count * seq_len + 1].reshape(count, seq_len)
    return x, y


class PositionEmbedding(keras.layers.Layer):
    """Adds a learned embedding of each position to its token embedding."""

    def __init__(self, length, **kwargs):
        super().__init__(**kwargs)
        self.length = length

    def build(self, input_shape):
        self.positions = self.add_weight(
            shape=(self.length, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="positions",
        )

    def call(self, inputs):
        return inputs + keras.ops.cast(self.positions, inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "length": self.length}


def build_model(seq_len=64, dim=48, heads=4, layers=2):
    """A pre-norm causal Transformer returning next-character logits."""
    tokens = keras.Input((seq_len,), dtype="int32")
    x = keras.layers.Embedding(VOCAB_SIZE, dim)(tokens)
    x = PositionEmbedding(seq_len)(x)
    for _ in range(layers):
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.MultiHeadAttention(heads, dim // heads)(
            h, h, use_causal_mask=True
        )
        x = keras.layers.Add()([x, h])
        h = keras.layers.LayerNormalization()(x)
        h = keras.layers.Dense(4 * dim, activation="gelu")(h)
        h = keras.layers.Dense(dim)(h)
        x = keras.layers.Add()([x, h])
    x = keras.layers.LayerNormalization()(x)
    return keras.Model(tokens, keras.layers.Dense(VOCAB_SIZE)(x))


def lm_loss():
    """Mean cross-entropy per character, in nats."""
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def sample(model, prompt, chars, seq_len, seed=0):
    """Extends `prompt` by `chars` characters sampled from the model."""
    rng = np.random.default_rng(seed)
    ids = list(encode(prompt))
    for _ in range(chars):
        window = np.zeros((1, seq_len), dtype="int32")
        context = ids[-seq_len:]
        window[0, : len(context)] = context
        logits = keras.ops.convert_to_numpy(model(window, training=False))
        logits = logits[0, len(context) - 1].astype("float64")
        probabilities = np.exp(logits - logits.max())
        ids.append(int(rng.choice(VOCAB_SIZE, p=probabilities / probabilities.sum())))
    return decode(ids)


def main(steps=300, batch_size=32, seq_len=64, dim=48, layers=2,
         learning_rate=3e-3, sample_chars=80, verbose=2):
    # One pass over fresh windows, cut into (up to) 10 `fit` epochs: each
    # epoch restarts the loss tracker that `TrustRegionCallback` reads.
    epochs = min(10, steps)
    steps_per_epoch = steps // epochs
    train_ids, held_out_ids = split_ids()
    x, y = random_windows(
        train_ids, epochs * steps_per_epoch * batch_size, seq_len, seed=0
    )
    x_val, y_val = consecutive_windows(held_out_ids, seq_len)
    keras.utils.set_random_seed(0)
    model = build_model(seq_len, dim, layers=layers)
    model.compile(
        optimizer=keras_soaa.SOAA(learning_rate=learning_rate), loss=lm_loss()
    )
    history = model.fit(
        x, y, batch_size=batch_size, epochs=epochs,
        steps_per_epoch=steps_per_epoch, shuffle=False,
        callbacks=[keras_soaa.TrustRegionCallback()], verbose=verbose,
    )
    held_out_loss = float(model.evaluate(x_val, y_val, verbose=0))
    print(
        f"[{keras.backend.backend()}] held-out loss {held_out_loss:.3f} nats/char, "
        f"perplexity {np.exp(held_out_loss):.2f}, final radius "
        f"{history.history['radius'][-1]:.3f}"
    )
    if sample_chars:
        print(sample(model, "def ", sample_chars, seq_len))
    return history, held_out_loss


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--sample-chars", type=int, default=80)
    args = parser.parse_args()
    main(args.steps, learning_rate=args.learning_rate,
         sample_chars=args.sample_chars)
