"""Config round trips and `.keras` files (argument validation: test_arguments.py)."""

import keras
import numpy as np
import pytest
from conftest import scalars_of, to_numpy

from keras_soaa import SOAA, TrustRegionCallback
from keras_soaa.controllers import PaperController

FULL_CONFIG = dict(
    learning_rate=0.02,
    beta_1=0.8,
    beta_2=0.99,
    epsilon=1e-6,
    total_steps=77,
    initial_radius=1.5,
    weight_decay=0.01,
    clipnorm=2.0,
    name="my_soaa",
)


def test_config():
    optimizer = SOAA(**FULL_CONFIG, controller=PaperController(radius_bound=0.3))
    config = optimizer.get_config()
    for key, value in FULL_CONFIG.items():
        assert config[key] == pytest.approx(value), key
    assert config["controller"]["config"] == {"radius_bound": 0.3}
    restored = SOAA.from_config(config)
    assert restored.get_config() == config


def test_keras_serialize_round_trip():
    optimizer = SOAA(**FULL_CONFIG)
    serialized = keras.optimizers.serialize(optimizer)
    assert serialized["registered_name"] == "keras_soaa>SOAA"
    restored = keras.optimizers.deserialize(serialized)
    assert isinstance(restored, SOAA)
    assert restored.get_config() == optimizer.get_config()


def test_config_with_learning_rate_schedule():
    schedule = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=100)
    optimizer = SOAA(learning_rate=schedule)
    restored = SOAA.from_config(optimizer.get_config())
    assert isinstance(
        restored._learning_rate, keras.optimizers.schedules.CosineDecay
    )
    assert restored._learning_rate.get_config() == schedule.get_config()


def make_trained_model(steps=7):
    keras.utils.set_random_seed(3)
    rng = np.random.default_rng(3)
    x = rng.normal(size=(steps * 8, 4)).astype("float32")
    y = rng.normal(size=(steps * 8, 2)).astype("float32")
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
         keras.layers.Dense(2)]
    )
    model.compile(optimizer=SOAA(learning_rate=0.03, initial_radius=1.2),
                  loss="mse")
    model.fit(x, y, batch_size=8, epochs=2, verbose=0,
              callbacks=[TrustRegionCallback()])
    return model, x, y


def test_save_and_load_model_restores_optimizer_state(tmp_path):
    model, x, y = make_trained_model()
    path = str(tmp_path / "model.keras")
    model.save(path)
    # No custom_objects: importing keras_soaa registered SOAA.
    loaded = keras.saving.load_model(path)

    assert isinstance(loaded.optimizer, SOAA)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    assert loaded.optimizer.total_steps == 14
    assert len(loaded.optimizer.variables) == len(model.optimizer.variables)
    for saved, restored in zip(
        model.optimizer.variables, loaded.optimizer.variables
    ):
        np.testing.assert_array_equal(to_numpy(restored), to_numpy(saved))
    scalars = scalars_of(loaded.optimizer)
    assert scalars[2] == 14  # loss_count: one loss per trained batch
    assert scalars[0] != 1.2  # the radius has moved from initial_radius
    for saved, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(to_numpy(restored), to_numpy(saved))
