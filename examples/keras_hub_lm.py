"""A small keras-hub causal language model trained with SOAA, beside Adam.

The model is a `keras_hub.models.GPT2CausalLM` on a tiny `GPT2Backbone` built
from its config with random weights (no preset is downloaded), the tokenizer
a `keras_hub.tokenizers.ByteTokenizer` (built locally: no vocabulary file),
and the text keras_soaa's own docstrings (of its modules but the
backend-specific ones, and of their classes and functions). So the example
runs offline. The last 10% of the
text is held out.

The same model, from the same initial weights, trains on the same windows
twice: with `keras_soaa.presets.recommended(learning_rate, total_steps)` and
`keras_soaa.TrustRegionCallback()`, and with Keras `Adam` at the same rate.
The example prints each one's final training loss (the mean over the last
of up to 5 epochs) and held-out loss, in nats per byte.

    pip install keras-hub    # keras-soaa's `hub` extra
    python examples/keras_hub_lm.py [--steps N] [--quick]
"""

import argparse
import importlib
import inspect
import pkgutil

import keras
import keras_hub
import numpy as np

import keras_soaa


def docstring_text():
    """The docstrings of keras_soaa's modules and of their members."""
    parts = []
    names = [info.name for info in pkgutil.walk_packages(
        keras_soaa.__path__, "keras_soaa."
    )]
    for name in ["keras_soaa"] + names:
        if name.startswith("keras_soaa.backends"):
            continue
        module = importlib.import_module(name)
        parts.append(inspect.getdoc(module))
        for _, member in sorted(vars(module).items()):
            if (inspect.isclass(member) or inspect.isfunction(member)) and (
                member.__module__ == name
            ):
                parts.append(inspect.getdoc(member))
                if inspect.isclass(member):
                    parts += [inspect.getdoc(f) for _, f in sorted(vars(member).items())
                              if inspect.isfunction(f) and f.__doc__]
    return "\n\n".join(part for part in parts if part)


def token_ids(seq_len):
    """Byte ids of the text: the training head and the held-out tail."""
    tokenizer = keras_hub.tokenizers.ByteTokenizer(lowercase=False)
    ids = keras.ops.convert_to_numpy(tokenizer(docstring_text())).astype("int32")
    if len(ids) < 20 * seq_len:
        raise RuntimeError(f"Found only {len(ids)} bytes of docstrings")
    split = int(0.9 * len(ids))
    return tokenizer.vocabulary_size(), ids[:split], ids[split:]


def windows(ids, seq_len, count=None, seed=0):
    """Inputs for `GPT2CausalLM` (no preprocessor) and next-byte targets.

    `count` windows at random offsets, or (`count=None`) consecutive ones.
    """
    if count is None:
        starts = np.arange(0, len(ids) - seq_len, seq_len)
    else:
        starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len, count)
    window = ids[starts[:, None] + np.arange(seq_len + 1)]
    x = {"token_ids": window[:, :-1], "padding_mask": np.ones_like(window[:, :-1])}
    return x, window[:, 1:]


def build_model(vocabulary_size, seq_len, hidden_dim, layers, heads):
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=vocabulary_size,
        num_layers=layers,
        num_heads=heads,
        hidden_dim=hidden_dim,
        intermediate_dim=4 * hidden_dim,
        dropout=0.0,
        max_sequence_length=seq_len,
    )
    return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=None)


def train(optimizer, callbacks, data, sizes, verbose):
    (x, y), (x_val, y_val), batch_size, epochs = data
    keras.utils.set_random_seed(0)  # the same initial weights for both
    model = build_model(*sizes)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(
        x, y, batch_size=batch_size, epochs=epochs, shuffle=False,
        steps_per_epoch=len(y) // (epochs * batch_size),
        callbacks=callbacks, verbose=verbose,
    )
    held_out = model.evaluate(
        x_val, y_val, batch_size=64, verbose=0, return_dict=True
    )["loss"]
    return history.history["loss"][-1], held_out


def main(steps=200, batch_size=16, seq_len=64, hidden_dim=64, layers=2, heads=2,
         learning_rate=1e-2, verbose=2):
    """Returns `{"SOAA": (train_loss, held_out_loss), "Adam": (...)}`."""
    # One pass over fresh windows, cut into up to 5 `fit` epochs.
    epochs = min(5, steps)
    steps = steps // epochs * epochs
    vocabulary_size, train_ids, held_out_ids = token_ids(seq_len)
    data = (
        windows(train_ids, seq_len, steps * batch_size),
        windows(held_out_ids, seq_len),
        batch_size,
        epochs,
    )
    sizes = (vocabulary_size, seq_len, hidden_dim, layers, heads)
    losses = {
        "SOAA": train(
            keras_soaa.presets.recommended(learning_rate, total_steps=steps),
            [keras_soaa.TrustRegionCallback()], data, sizes, verbose,
        ),
        "Adam": train(
            keras.optimizers.Adam(learning_rate), [], data, sizes, verbose
        ),
    }
    for name, (train_loss, held_out) in losses.items():
        print(f"[{keras.backend.backend()}] {name}: final training loss "
              f"{train_loss:.3f}, held-out loss {held_out:.3f} nats/byte")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--quick", action="store_true",
                        help="10 steps of an even smaller model (the test's)")
    args = parser.parse_args()
    if args.quick:
        main(steps=10, batch_size=8, seq_len=16, hidden_dim=32, layers=1,
             learning_rate=args.learning_rate)
    else:
        main(args.steps, learning_rate=args.learning_rate)
