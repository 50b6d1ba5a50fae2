"""A `tensorflow_datasets` pipeline trained with SOAA, offline.

`SklearnDigits` is a real tfds dataset builder (a `GeneratorBasedBuilder`)
over data that ships with scikit-learn, so it prepares without any download:
`download_and_prepare` writes TFRecord shards to `--data-dir`, then
`tfds.load(..., data_dir=..., download=False)` reads them back as `tf.data`
pipelines, which `model.fit` takes on every Keras backend (TensorFlow, JAX
and PyTorch).

    python examples/tfds_pipeline.py [--data-dir DIR] [--epochs N]

Any other image-classification dataset you have already prepared works the
same way (nothing is downloaded: `download=False`):

    python examples/tfds_pipeline.py --dataset mnist --data-dir ~/tensorflow_datasets
"""

import argparse
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import keras_soaa


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits as a tfds dataset (registered as `sklearn_digits`).

    1797 grey-scale images (pixel values 0..16 scaled to 0..255), 10 classes;
    a fixed 80/20 train/test split.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's bundled 8x8 handwritten digits.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        # The data ships with scikit-learn: the download manager is not used.
        from sklearn.datasets import load_digits

        x, y = load_digits(return_X_y=True)
        order = np.random.default_rng(0).permutation(len(x))
        x, y = x[order], y[order]
        split = int(0.8 * len(x))
        return {
            "train": self._generate_examples(x[:split], y[:split]),
            "test": self._generate_examples(x[split:], y[split:]),
        }

    def _generate_examples(self, images, labels):
        for index, (image, label) in enumerate(zip(images, labels)):
            pixels = np.round(image * 255 / 16).astype("uint8").reshape(8, 8, 1)
            yield index, {"image": pixels, "label": int(label)}


def prepare_digits(data_dir):
    """Writes `sklearn_digits` to `data_dir` (once); returns its builder."""
    builder = SklearnDigits(data_dir=data_dir)
    builder.download_and_prepare()
    return builder


def load(name, data_dir, batch_size):
    """Reads a prepared dataset: batched train and test `tf.data` pipelines."""
    splits, info = tfds.load(
        name,
        split=None,
        data_dir=data_dir,
        as_supervised=True,
        with_info=True,
        download=False,
    )
    if "test" in splits:
        train, test = splits["train"], splits["test"]
    else:
        train, test = tfds.load(
            name, split=["train[:80%]", "train[80%:]"], data_dir=data_dir,
            as_supervised=True, download=False,
        )

    def scale(image, label):
        return tf.cast(image, tf.float32) / 255.0, label

    def pipeline(dataset, shuffle):
        dataset = dataset.map(scale, num_parallel_calls=tf.data.AUTOTUNE).cache()
        if shuffle:
            dataset = dataset.shuffle(10_000, seed=0)
        return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

    return pipeline(train, True), pipeline(test, False), info


def build_model(image_shape, num_classes):
    return keras.Sequential(
        [
            keras.Input(image_shape),
            keras.layers.Flatten(),
            keras.layers.Dense(128, activation="relu"),
            keras.layers.Dense(num_classes),
        ]
    )


def main(dataset="sklearn_digits", data_dir=None, epochs=10, batch_size=64,
         learning_rate=3e-3, verbose=2):
    data_dir = data_dir or os.path.join(tempfile.gettempdir(), "keras_soaa_tfds")
    tfds.disable_progress_bar()
    if dataset == "sklearn_digits":
        prepare_digits(data_dir)
    train, test, info = load(dataset, data_dir, batch_size)
    keras.utils.set_random_seed(0)
    model = build_model(
        info.features["image"].shape, info.features["label"].num_classes
    )
    model.compile(
        optimizer=keras_soaa.SOAA(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        train,
        epochs=epochs,
        shuffle=False,  # the pipeline shuffles itself

        validation_data=test,
        callbacks=[keras_soaa.TrustRegionCallback()],
        verbose=verbose,
    )
    _, accuracy = model.evaluate(test, verbose=0)
    print(
        f"[{keras.backend.backend()}] {dataset}: test accuracy {accuracy:.3f}, "
        f"final radius {history.history['radius'][-1]:.3f}"
    )
    return history, accuracy


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="sklearn_digits",
                        help="a tfds name; anything but sklearn_digits must "
                        "already be prepared in --data-dir")
    parser.add_argument("--data-dir", default=None,
                        help="tfds data_dir (default: a folder in the system "
                        "temp dir)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    args = parser.parse_args()
    main(args.dataset, args.data_dir, args.epochs,
         learning_rate=args.learning_rate)
