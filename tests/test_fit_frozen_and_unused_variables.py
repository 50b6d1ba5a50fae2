"""SOAA in `fit` with variables that get no step: unused or frozen ones.

A weight the loss does not use (no gradient on TensorFlow and torch, a
zero one on JAX), a layer frozen before `compile`, and a layer frozen
between two fits (re-compiled with the same SOAA; Keras' JAX trainer
refuses that before any step, so there a new SOAA is compiled) stay
exactly as they were, their moments too, while the rest trains.
"""

import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND, to_numpy
from keras import ops
from robustness_checks import (
    assert_all_finite,
    assert_state_unchanged,
    make_data,
    make_model,
    snapshot,
)

from keras_soaa import SOAA, TrustRegionCallback


class WithUnusedWeight(keras.layers.Layer):
    def build(self, input_shape):
        self.kernel = self.add_weight(shape=(3, 1), name="kernel")
        self.unused = self.add_weight(
            shape=(2,), initializer="ones", name="unused")

    def call(self, inputs):
        return ops.matmul(inputs, self.kernel)


def test_variable_unused_by_the_loss_in_fit():
    """TF and torch give it no gradient (None: filtered by Keras), JAX a
    zero one: either way it stays exactly as it was, its moments zero."""
    x, y = make_data()
    keras.utils.set_random_seed(2)
    layer = WithUnusedWeight()
    model = keras.Sequential([keras.Input((3,)), layer])
    optimizer = SOAA(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    kernel = to_numpy(layer.kernel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras: "Gradients do not exist"
        model.fit(x, y, batch_size=8, epochs=2, verbose=0,
                  callbacks=[TrustRegionCallback()])
    i = 1  # kernel, unused: the order the optimizer was built in
    np.testing.assert_array_equal(to_numpy(layer.unused), [1.0, 1.0])
    np.testing.assert_array_equal(to_numpy(optimizer._momentums[i]), 0.0)
    np.testing.assert_array_equal(to_numpy(optimizer._velocities[i]), 0.0)
    assert not np.array_equal(to_numpy(layer.kernel), kernel)
    assert_all_finite(optimizer, model.trainable_variables)


def test_layer_frozen_before_compile():
    x, y = make_data()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)),
                              keras.layers.Dense(4, name="hidden"),
                              keras.layers.Dense(1, name="out")])
    model.layers[0].trainable = False
    optimizer = SOAA(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    frozen = [to_numpy(w) for w in model.layers[0].weights]
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[TrustRegionCallback()])
    for before, w in zip(frozen, model.layers[0].weights):
        np.testing.assert_array_equal(to_numpy(w), before)
    assert len(optimizer._momentums) == 2  # the output layer's kernel, bias
    assert_all_finite(optimizer, model.trainable_variables)


def test_layer_frozen_between_fits():
    """Re-compiling with the same SOAA works on TF and torch: the frozen
    layer and its moments stay as they were. Keras' JAX trainer refuses an
    optimizer built on more variables (before any step: nothing changes);
    there, compile with a new SOAA."""
    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer, hidden=4)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0,
              callbacks=[TrustRegionCallback()])
    hidden = model.get_layer("hidden")
    hidden.trainable = False
    model.compile(optimizer=optimizer, loss="mse")
    before = snapshot(optimizer, model.weights)
    frozen_indices = [0, 1]  # hidden kernel and bias come first
    if BACKEND == "jax":
        with pytest.raises(ValueError, match="compile with a new optimizer"):
            model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                      callbacks=[TrustRegionCallback()])
        assert_state_unchanged(before, snapshot(optimizer, model.weights))
        optimizer = SOAA(learning_rate=0.05)
        model.compile(optimizer=optimizer, loss="mse")
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[TrustRegionCallback()])
        frozen_indices = []
    else:
        model.fit(x, y, batch_size=8, epochs=1, verbose=0,
                  callbacks=[TrustRegionCallback()])
        assert int(to_numpy(optimizer.iterations)) == 8
    after = snapshot(optimizer, model.weights)
    for w, old in zip(hidden.weights, before["weights"]):
        np.testing.assert_array_equal(to_numpy(w), old)
    for i in frozen_indices:
        np.testing.assert_array_equal(after["m"][i], before["m"][i])
        np.testing.assert_array_equal(after["v"][i], before["v"][i])
    out = model.get_layer("out")
    assert not np.array_equal(to_numpy(out.kernel),
                              before["weights"][2])
    assert_all_finite(optimizer, model.trainable_variables)
