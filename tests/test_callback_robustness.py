"""`TrustRegionCallback` misused or reused: refusals, and `total_steps` across fits.

The callback refuses a model compiled with another optimizer (also one
wrapped in `LossScaleOptimizer`) and a `fit` of unknown length when SOAA
has no `total_steps`, both before any step, so nothing changes; the first
`fit` sets `total_steps`, and later or resumed fits keep it while the step
and loss counts go on and the radius stays within its bounds.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from robustness_checks import assert_all_finite, make_data, make_model

from keras_soaa import SOAA, TrustRegionCallback
from keras_soaa.controllers import PaperController


def test_callback_refuses_other_optimizers_before_any_step():
    x, y = make_data()
    for optimizer in [
        keras.optimizers.Adam(),
        keras.optimizers.SGD(),
        keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam()),
    ]:
        model = make_model(optimizer, jit_compile=False)
        weights = [to_numpy(w) for w in model.weights]
        with pytest.raises(ValueError, match="only works with the `keras_soaa"):
            model.fit(x, y, epochs=1, verbose=0,
                      callbacks=[TrustRegionCallback()])
        for before, w in zip(weights, model.weights):
            np.testing.assert_array_equal(to_numpy(w), before)


def test_unknown_total_steps_in_fit_is_refused_before_training():
    x, y = make_data()

    def batches(repeat=False):
        while True:
            for i in range(4):
                yield x[i * 8:(i + 1) * 8], y[i * 8:(i + 1) * 8]
            if not repeat:
                return

    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer, jit_compile=False)
    weights = [to_numpy(w) for w in model.weights]
    with pytest.raises(ValueError, match="total_steps.*steps_per_epoch"):
        model.fit(batches(), epochs=2, verbose=0,
                  callbacks=[TrustRegionCallback()])
    for before, w in zip(weights, model.weights):
        np.testing.assert_array_equal(to_numpy(w), before)
    assert int(to_numpy(optimizer.iterations)) == 0
    assert optimizer.total_steps is None
    # Telling fit the epoch length, or SOAA the run length, fixes it.
    model.fit(batches(repeat=True), steps_per_epoch=4, epochs=2, verbose=0,
              callbacks=[TrustRegionCallback()])
    assert optimizer.total_steps == 8
    assert float(to_numpy(optimizer.loss_count)) == 8
    optimizer = SOAA(learning_rate=0.05, total_steps=20)
    model = make_model(optimizer, jit_compile=False)
    model.fit(batches(), epochs=1, verbose=0,
              callbacks=[TrustRegionCallback()])
    assert optimizer.total_steps == 20
    assert float(to_numpy(optimizer.loss_count)) == 4


def test_fit_twice_and_resumed_fit_continue_the_schedule():
    """The first `fit` sets `total_steps`; later fits (resumed with
    `initial_epoch` or not) keep it, `t` and the loss count keep counting,
    and the radius stays within the bounds at `t` (final ones past T)."""
    x, y = make_data()
    gamma = 0.2
    optimizer = SOAA(learning_rate=0.05,
                     controller=PaperController(radius_bound=gamma))
    model = make_model(optimizer)

    class Record(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.radii = []

        def on_train_batch_end(self, batch, logs=None):
            # Through `self.model`, as a Keras callback reads variables
            # during a JAX `fit` (the access syncs the training state).
            t = int(to_numpy(self.model.optimizer.iterations))
            self.radii.append((t, float(logs["radius"])))

    record = Record()
    callbacks = [TrustRegionCallback(), record]
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=callbacks)
    assert optimizer.total_steps == 8
    model.fit(x, y, batch_size=8, epochs=4, initial_epoch=2, verbose=0,
              callbacks=callbacks)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=callbacks)
    assert optimizer.total_steps == 8
    assert int(to_numpy(optimizer.iterations)) == 20
    assert float(to_numpy(optimizer.loss_count)) == 20
    assert [t for t, _ in record.radii] == list(range(1, 21))
    for t, radius in record.radii:
        e = min(t - 1, 8) / 8
        lower, upper = (1 - gamma) ** e, 1 + gamma**e
        assert lower * (1 - 1e-6) <= radius <= upper * (1 + 1e-6), (t, radius)
    assert_all_finite(optimizer, model.trainable_variables)
    # A fresh optimizer resumed at initial_epoch: T covers the whole run.
    fresh = SOAA(learning_rate=0.05)
    make_model(fresh).fit(x, y, batch_size=8, epochs=4, initial_epoch=2,
                          verbose=0, callbacks=[TrustRegionCallback()])
    assert fresh.total_steps == 16
    assert int(to_numpy(fresh.iterations)) == 8
