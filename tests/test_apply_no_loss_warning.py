"""`SOAA.apply`'s warning when no loss reaches the paper's controller.

`fit` without `TrustRegionCallback`, or a custom loop that applies steps
but never calls `observe_loss`, warns exactly once (a `UserWarning` saying
how to feed losses); `fit` with the callback (also through a
`LossScaleOptimizer`) and a custom loop that observes losses do not warn.
"""

import warnings

import keras
import numpy as np
from conftest import to_numpy
from robustness_checks import (
    NO_LOSS_WARNING,
    count_no_loss_warnings,
    make_data,
    make_model,
    tensors,
)

from keras_soaa import SOAA, TrustRegionCallback


def test_fit_without_callback_warns_exactly_once():
    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=2, verbose=0)
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    ours = [w for w in record if NO_LOSS_WARNING in str(w.message)]
    assert len(ours) == 1
    assert issubclass(ours[0].category, UserWarning)
    message = str(ours[0].message)
    assert "TrustRegionCallback" in message and "total_steps" in message
    assert float(to_numpy(optimizer.radius)) == 1.0  # indeed never adapted


def test_fit_with_callback_and_custom_loops_do_not_warn():
    x, y = make_data()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_model(SOAA(learning_rate=0.05), jit_compile=False).fit(
            x, y, batch_size=8, epochs=1, verbose=0,
            callbacks=[TrustRegionCallback()])
        make_model(keras.optimizers.LossScaleOptimizer(SOAA()),
                   jit_compile=False).fit(
            x, y, batch_size=8, epochs=1, verbose=0,
            callbacks=[TrustRegionCallback()])
        # A custom loop: total_steps set, observe_loss after each apply.
        theta = keras.Variable([1.0, -2.0])
        optimizer = SOAA(learning_rate=0.1, total_steps=5)
        for _ in range(5):
            loss = float(np.sum(to_numpy(theta) ** 2) / 2)
            optimizer.apply(tensors([to_numpy(theta)], "float32"), [theta])
            optimizer.observe_loss(loss)
    assert count_no_loss_warnings(record) == 0
    # A custom loop that never observes: warned, once.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        optimizer = SOAA(learning_rate=0.1)
        for _ in range(5):
            optimizer.apply(tensors([to_numpy(theta)], "float32"), [theta])
    assert count_no_loss_warnings(record) == 1
