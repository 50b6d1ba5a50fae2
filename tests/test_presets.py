import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_soaa


def test_recommended_is_paper_soaa_with_cosine_decay_to_zero():
    optimizer = keras_soaa.presets.recommended(0.02, total_steps=8)
    assert optimizer.controller == keras_soaa.controllers.get("paper")
    assert optimizer.total_steps == 8
    x = np.linspace(-1, 1, 64, dtype="float32").reshape(32, 2)
    y = x @ np.array([[1.0], [-2.0]], "float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
                        callbacks=[keras_soaa.TrustRegionCallback()])
    assert history.history["loss"][-1] < history.history["loss"][0]
    # Cosine from 0.02 at step 0 to 0 at step 8: 0 once every step is taken.
    assert float(to_numpy(optimizer.iterations)) == 8
    assert float(to_numpy(optimizer.learning_rate)) == pytest.approx(0.0, abs=1e-9)
    restored = keras_soaa.SOAA.from_config(optimizer.get_config())
    assert restored.get_config() == optimizer.get_config()


@pytest.mark.parametrize("arguments, name", [
    ((0.01, None), "total_steps"), ((0.01, 0), "total_steps"),
    ((0.01, 2.5), "total_steps"), ((-1.0, 10), "learning_rate"),
])
def test_recommended_refuses_bad_arguments_by_name(arguments, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        keras_soaa.presets.recommended(*arguments)
