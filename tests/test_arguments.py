"""`SOAA`'s constructor arguments: validation, NumPy scalars, edge values.

Every invalid argument (out of range, not finite, or not a real number, a
bool or a string included) raises a `ValueError` naming the argument, its
valid range and the value received; NumPy scalars and valid edge values
are accepted, and the config they give stays JSON and round-trips. (The
controllers' own arguments, e.g. `PaperController(radius_bound=...)`, are
checked in tests/test_controllers.py.)
"""

import json
from fractions import Fraction

import keras
import numpy as np
import pytest
from conftest import to_numpy
from robustness_checks import INF, NAN, tensors

from keras_soaa import SOAA
from keras_soaa.controllers import PaperController

RULES = {
    "learning_rate": "> 0",
    "beta_1": "in [0, 1)",
    "beta_2": "in [0, 1)",
    "epsilon": "> 0",
    "total_steps": "integer >= 1",
    "initial_radius": "> 0",
    "weight_decay": ">= 0",
    "fused": "`None`",
}

_NOT_NUMBERS = ["0.5", None, True, False, np.bool_(True), [0.5], 1j]
INVALID_HYPERPARAMETERS = (
    [("learning_rate", v) for v in [
        0.0, 0, -1e-3, np.float64(-0.1), NAN, np.float32("nan"), INF, -INF,
        10**400, "0.01", "fast", None, True, False, np.bool_(True), [0.01],
        1j, np.array(0.01),
    ]]
    + [(name, v) for name in ("beta_1", "beta_2") for v in [
        1.0, 1, 1.5, -0.1, -1e-3, -1e-12, np.float32(1.0), NAN, INF, -INF,
        "0.9", *_NOT_NUMBERS,
    ]]
    + [("epsilon", v) for v in [
        0.0, -1e-8, np.float64(0), NAN, INF, *_NOT_NUMBERS,
    ]]
    + [("total_steps", v) for v in [
        0, -5, np.int64(0), 10.5, 10.0, np.float64(10.0), NAN, INF, "100",
        True, False, np.bool_(True), [10], 10**400 * -1,
    ]]
    + [("initial_radius", v) for v in [
        0.0, -1.0, NAN, INF, *_NOT_NUMBERS,
    ]]
    + [("weight_decay", v) for v in [
        -0.1, NAN, INF, "0.01", True, [0.1], 1j,
    ]]
    + [("fused", v) for v in [1, 0, "yes", np.bool_(True), "compile"]]
)


@pytest.mark.parametrize("argument", RULES)
def test_invalid_hyperparameters_name_argument_and_valid_range(argument):
    # One test per argument, not per value: each test pays Keras' session
    # reset.
    assert {a for a, _ in INVALID_HYPERPARAMETERS} == set(RULES)
    values = [v for a, v in INVALID_HYPERPARAMETERS if a == argument]
    for value in values:
        with pytest.raises(ValueError) as info:
            SOAA(**{argument: value})
        message = str(info.value)
        assert f"`{argument}`" in message, (argument, value, message)
        assert RULES[argument] in message, (argument, value, message)
        assert "Received" in message, (argument, value, message)


def test_numpy_scalars_are_accepted_and_config_stays_json():
    optimizer = SOAA(
        learning_rate=np.float32(0.01),
        beta_1=np.float32(0.9),
        beta_2=np.float64(0.99),
        epsilon=np.float32(1e-7),
        controller=PaperController(radius_bound=np.float16(0.25)),
        total_steps=np.int64(10),
        initial_radius=np.int32(2),
        weight_decay=np.float32(0.01),
        clipnorm=np.float32(1.0),
        use_ema=True,
        ema_momentum=np.float64(0.9),
        ema_overwrite_frequency=np.int64(5),
        loss_scale_factor=np.float32(2.0),
        gradient_accumulation_steps=np.int64(2),
    )
    config = optimizer.get_config()
    restored = SOAA.from_config(json.loads(json.dumps(config)))
    assert restored.get_config() == config
    for key, value in config.items():
        if key == "controller":  # serialized: its arguments are its config
            key, value = "radius_bound", value["config"]["radius_bound"]
        assert value is None or type(value) in (int, float, bool, str), key
    assert config["beta_1"] == float(np.float32(0.9))
    assert config["total_steps"] == 10 and type(config["total_steps"]) is int
    assert config["initial_radius"] == 2.0
    # And it trains.
    theta = keras.Variable([1.0, -2.0])
    for _ in range(2):
        optimizer.apply(tensors([[1.0, -2.0]]), [theta])
    assert np.all(np.isfinite(to_numpy(theta)))
    assert not np.array_equal(to_numpy(theta), [1.0, -2.0])


VALID_EDGE_HYPERPARAMETERS = [
    dict(beta_1=0.0, beta_2=0.0),
    dict(beta_1=float(np.nextafter(1.0, 0.0)), beta_2=0.999999),
    dict(controller=PaperController(radius_bound=1e-9)),
    dict(controller=PaperController(radius_bound=1 - 1e-9)),
    dict(total_steps=1),
    dict(total_steps=np.uint8(3)),
    dict(learning_rate=1),
    dict(learning_rate=Fraction(1, 100)),
    dict(learning_rate=1e6),
    dict(initial_radius=1e-6),
    dict(initial_radius=1e6),
    dict(epsilon=1e-30),
    dict(weight_decay=0),
    dict(fused=True),
    dict(fused=False),
    dict(learning_rate=keras.optimizers.schedules.ExponentialDecay(
        0.1, 10, 0.5)),
]


def test_valid_edge_hyperparameters_are_accepted():
    for kwargs in VALID_EDGE_HYPERPARAMETERS:
        optimizer = SOAA(**kwargs)
        config = optimizer.get_config()
        json.dumps(config)
        assert SOAA.from_config(config).get_config() == config, kwargs
    optimizer = SOAA(learning_rate=1, beta_1=0.0, beta_2=0.0, total_steps=1)
    assert optimizer.get_config()["learning_rate"] == 1.0

