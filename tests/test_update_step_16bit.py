"""`SOAA.update_step` on float16 and bfloat16 variables.

Their `m` and `v` are float32 and the update is computed in float32, so
gradients whose squares overflow float16 still train, and the only 16-bit
rounding is the new weight's (at most one ulp from the float64 NumPy
reference step); a weight that would round to inf keeps its dtype's
largest value; a non-finite gradient skips the variable. Eagerly and in a
16-bit `fit`.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy
from keras import ops
from robustness_checks import (
    assert_all_finite,
    assert_variable_untouched,
    make_data,
    snapshot,
)
from soaa_reference import ReferenceSOAA

from keras_soaa import SOAA, TrustRegionCallback

SIXTEEN_BIT_GRADIENTS = {
    "float16": [
        [300.0, -1.0, 1e-3, 1000.0],  # 300**2 and 1000**2 overflow float16
        [60000.0, 2.0, -3.0, 0.5],  # near float16's max, 65504
        [np.nan, 1.0, 1.0, 1.0],  # skipped
        [1e-4, -60000.0, 0.0, 7.0],
        [0.1, 0.2, 0.3, 0.4],
    ],
    "bfloat16": [
        [300.0, -1.0, 1e-3, 1000.0],
        [1e30, 2.0, -3.0, 0.5],  # (1e30)**2 overflows float32: skipped
        [1e15, -1e12, 0.0, 7.0],
        [np.inf, 1.0, 1.0, 1.0],  # skipped
        [0.1, 0.2, 0.3, 0.4],
    ],
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_variables_keep_float32_moments_and_match_reference(dtype):
    """m and v of 16-bit variables are float32 and the update is computed in
    float32: the only 16-bit rounding is the new weight's (at most one ulp
    from the float64 reference step)."""
    weights = np.array([1.0, -2.0, 0.5, 3.0])
    variable = keras.Variable(weights, dtype=dtype)
    hyper = dict(learning_rate=0.01, weight_decay=0.01)
    optimizer = SOAA(total_steps=10, **hyper)
    optimizer.build([variable])
    assert optimizer._momentums[0].dtype == "float32"
    assert optimizer._velocities[0].dtype == "float32"
    reference = ReferenceSOAA([to_numpy(variable)], **hyper)
    for raw in SIXTEEN_BIT_GRADIENTS[dtype]:
        grad = ops.cast(ops.convert_to_tensor(np.float32(raw)), dtype)
        g = to_numpy(grad)
        skip = not np.all(np.isfinite(g)) or np.max(np.abs(g)) > 1e19
        before = snapshot(optimizer, [variable])
        reference.weights = [before["weights"][0]]  # the rounded weight
        optimizer.apply([grad], [variable])
        reference.step([np.full(4, np.nan)] if skip else [g])
        after = snapshot(optimizer, [variable])
        assert variable.dtype == dtype
        assert_all_finite(optimizer, [variable])
        if skip:
            assert_variable_untouched(before, after, 0)
            continue
        ulp = np.abs(to_numpy(ops.cast(reference.weights[0], dtype))) * (
            2.0**-10 if dtype == "float16" else 2.0**-7) + 1e-7
        assert np.all(np.abs(after["weights"][0] - reference.weights[0])
                      <= ulp), (after["weights"][0], reference.weights[0])
        np.testing.assert_allclose(after["m"][0], reference.m[0], rtol=1e-5)
        np.testing.assert_allclose(after["v"][0], reference.v[0], rtol=1e-5)


def test_float16_weight_that_would_overflow_saturates():
    """Finite sums decide the step (spec, "Non-finite steps"): the step is
    applied, and a 16-bit weight that would round to inf keeps its dtype's
    largest value; the other element and the moments follow the reference."""
    variable = keras.Variable([65504.0, 1.0], dtype="float16")
    optimizer = SOAA(learning_rate=100.0, total_steps=5)
    reference = ReferenceSOAA([to_numpy(variable)], learning_rate=100.0)
    optimizer.apply([ops.convert_to_tensor([-1.0, 1.0], "float16")],
                    [variable])  # 65504 + 100 * 0.5 would round to inf
    reference.step([np.array([-1.0, 1.0])])
    after = snapshot(optimizer, [variable])
    assert reference.weights[0][0] > 65504.0
    np.testing.assert_array_equal(after["weights"][0][0], 65504.0)
    np.testing.assert_allclose(after["weights"][0][1], reference.weights[0][1],
                               rtol=2.0**-10)
    np.testing.assert_allclose(after["m"][0], reference.m[0], rtol=1e-6)
    np.testing.assert_allclose(after["v"][0], reference.v[0], rtol=1e-6)
    np.testing.assert_allclose(after["scalars"][3],
                               reference.predicted_reduction, rtol=1e-5)
    assert after["iterations"] == 1
    assert_all_finite(optimizer, [variable])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16bit_model_fit(dtype):
    """Targets of ~200 give gradients whose squares overflow float16."""
    x, y = make_data()
    keras.utils.set_random_seed(4)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(8, activation="relu", dtype=dtype),
        keras.layers.Dense(1, dtype=dtype),
    ])
    optimizer = SOAA(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, 100 * y, batch_size=8, epochs=6, verbose=0,
                        callbacks=[TrustRegionCallback()])
    losses = history.history["loss"]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(w.dtype == dtype for w in model.weights)
    assert all(m.dtype == "float32" for m in optimizer._momentums)
    # v <= (1 - beta_2**t) max g**2: some g**2 overflowed float16 (65504).
    largest_v = max(float(np.max(to_numpy(v))) for v in optimizer._velocities)
    assert largest_v / (1 - 0.999**24) > 65504
    assert_all_finite(optimizer, model.trainable_variables)
