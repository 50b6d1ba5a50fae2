import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_soaa


def fit_line(optimizer):
    x = np.linspace(-1, 1, 64, dtype="float32").reshape(32, 2)
    y = x @ np.array([[1.0], [-2.0]], "float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    return model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
                     callbacks=[keras_soaa.TrustRegionCallback()])


@pytest.mark.parametrize("preset, controller", [
    (keras_soaa.presets.recommended, "same_batch"),
    (keras_soaa.presets.paper_cosine, "paper"),
])
def test_preset_is_its_controller_with_cosine_decay_to_zero(preset, controller):
    optimizer = preset(0.02, total_steps=8)
    assert optimizer.controller == keras_soaa.controllers.get(controller)
    assert optimizer.total_steps == 8
    history = fit_line(optimizer)
    assert history.history["loss"][-1] < history.history["loss"][0]
    # Cosine from 0.02 at step 0 to 0 at step 8: 0 once every step is taken.
    assert float(to_numpy(optimizer.iterations)) == 8
    assert float(to_numpy(optimizer.learning_rate)) == pytest.approx(0.0, abs=1e-9)
    restored = keras_soaa.SOAA.from_config(optimizer.get_config())
    assert restored.get_config() == optimizer.get_config()


def test_recommended_takes_another_controller():
    optimizer = keras_soaa.presets.recommended(0.02, 8, controller="hypergradient")
    assert optimizer.controller == keras_soaa.controllers.get("hypergradient")


@pytest.mark.parametrize("preset", [keras_soaa.presets.recommended,
                                    keras_soaa.presets.paper_cosine])
@pytest.mark.parametrize("arguments, name", [
    ((0.01, None), "total_steps"), ((0.01, 0), "total_steps"),
    ((0.01, 2.5), "total_steps"), ((-1.0, 10), "learning_rate"),
])
def test_presets_refuse_bad_arguments_by_name(preset, arguments, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        preset(*arguments)
