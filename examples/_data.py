"""Data every example uses: scikit-learn's bundled digits (no download)."""

import numpy as np
from sklearn.datasets import load_digits


def digits(seed=0):
    """Returns `(x_train, y_train), (x_test, y_test)`, 8x8 digits, float32."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype("float32")
    y = y.astype("int32")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])
