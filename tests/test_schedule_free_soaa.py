"""The research candidate `research/schedule_free_soaa.py`: SOAA's momentum-free
step under schedule-free averaging, against a float64 NumPy reference of its
docstring's step (written here, from the formulas alone)."""

import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import to_numpy
from test_benchmark import TINY

import keras_soaa
from keras_soaa.controllers import HypergradientController, PaperController

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "research"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import optimizers  # noqa: E402
import runner  # noqa: E402
import schedule_free_soaa  # noqa: E402
from schedule_free_soaa import ScheduleFreeSOAA  # noqa: E402

SHAPES = [(3, 4), (5,)]
# The first variable's large gradients put most of its elements in the Fisher
# regime at d = 2 (sqrt(v_hat) > 1 / (d * c)), the second's small ones in Adam's.
SCALES = [2.0, 0.05]
BETA_2, EPSILON = 0.95, 1e-8


def gradients(step):
    rng = np.random.default_rng(10 + step)
    return [s * rng.normal(size=shape) for shape, s in zip(SHAPES, SCALES)]


def initial_weights():
    rng = np.random.default_rng(0)
    return [rng.normal(size=shape) for shape in SHAPES]


class Reference:
    """The docstring's step in float64, with the hypergradient controller (kappa
    = 0 pins d) and SOAA's skip rule: a variable with a non-finite gradient
    keeps y, z, v and its previous gradient, and adds nothing to the sums."""

    def __init__(self, weights, learning_rate, beta_1, radius, kappa,
                 weight_decay=None, power=0):
        self.y = [w.copy() for w in weights]
        self.z = [w.copy() for w in weights]
        self.v = [np.zeros_like(w) for w in weights]
        self.previous = [np.zeros_like(w) for w in weights]
        self.lr, self.beta_1, self.d, self.kappa = learning_rate, beta_1, radius, kappa
        self.weight_decay = weight_decay or 0.0
        self.power = power
        self.t = 0
        self.regimes = set()

    def x(self):
        return [(y - (1 - self.beta_1) * z) / self.beta_1
                for y, z in zip(self.y, self.z)]

    def step(self, grads):
        self.t = t = self.t + 1
        b1, d = self.beta_1, self.d
        alignment = gradient_sq = direction_sq = predicted = 0.0
        for i, g in enumerate(grads):
            if not np.all(np.isfinite(g)):
                continue
            v_old = self.v[i]
            q_prev = (self.previous[i] / (np.sqrt(v_old / (1 - BETA_2 ** (t - 1)))
                                          + EPSILON) if t > 1 else 0 * g)
            alignment += np.sum(g * q_prev)
            gradient_sq += np.sum(g * g)
            direction_sq += np.sum(q_prev * q_prev)
            v = BETA_2 * v_old + (1 - BETA_2) * g**2
            v_hat = v / (1 - BETA_2**t)
            c = 1 + np.sum(g**2) / np.sum(v_hat + EPSILON)
            fisher = d * c * v_hat
            self.regimes |= set(np.where(fisher > np.sqrt(v_hat), "fisher", "adam")
                                .ravel())
            u = d * g / (np.maximum(fisher, np.sqrt(v_hat)) + EPSILON)
            predicted += self.lr * np.sum(g * u - 0.5 * v_hat * u**2)
            z_old, y = self.z[i], self.y[i]
            z = z_old - self.lr * self.weight_decay * z_old - self.lr * u
            x_old = (y - (1 - b1) * z_old) / b1
            # The average weighs step i's z by i**power.
            w = t**self.power / sum(i**self.power for i in range(1, t + 1))
            x = (1 - w) * x_old + w * z
            self.y[i], self.z[i], self.v[i] = (1 - b1) * z + b1 * x, z, v
            self.previous[i] = g
        norms = np.sqrt(gradient_sq) * np.sqrt(direction_sq)
        cosine = alignment / norms if norms > 0 else 0.0
        self.d = float(np.clip(np.exp(np.log(d) + self.kappa * cosine), 0.1, 10.0))
        return predicted


def make(learning_rate, beta_1, radius, kappa, weight_decay=None, power=0):
    weights = initial_weights()
    variables = [keras.Variable(w.astype("float32"), name=f"w{i}")
                 for i, w in enumerate(weights)]
    optimizer = ScheduleFreeSOAA(
        learning_rate=learning_rate, beta_1=beta_1, beta_2=BETA_2, epsilon=EPSILON,
        initial_radius=radius, weight_decay=weight_decay,
        controller=HypergradientController(learning_rate=kappa),
        averaging_power=power)
    optimizer.build(variables)
    reference = Reference(weights, learning_rate, beta_1, radius, kappa, weight_decay,
                          power)
    return optimizer, variables, reference


def slots(optimizer, variable):
    z, v = optimizer._moments_of(variable)
    index = optimizer._get_variable_index(variable)
    return [to_numpy(variable), to_numpy(z), to_numpy(v),
            to_numpy(optimizer._previous_gradients[index])]


def assert_matches(optimizer, variables, reference):
    for i, variable in enumerate(variables):
        y, z, v, previous = slots(optimizer, variable)
        np.testing.assert_allclose(y, reference.y[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z, reference.z[i], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(v, reference.v[i], rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(previous, reference.previous[i], rtol=1e-6)
        np.testing.assert_allclose(to_numpy(optimizer.averaged_point(variable)),
                                   reference.x()[i], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(to_numpy(optimizer.radius)), reference.d,
                               rtol=1e-5)


@pytest.mark.parametrize("kappa, beta_1, weight_decay, power", [
    (0.0, 0.9, None, 0),  # d pinned at 2
    (0.05, 0.8, 0.1, 0),  # d moved by the hypergradient; decay on z
    (0.0, 0.9, None, 1),  # the average weighs step t by t
    (0.05, 0.8, None, 2),  # ... by t**2
])
def test_steps_match_the_float64_reference(kappa, beta_1, weight_decay, power):
    optimizer, variables, reference = make(0.05, beta_1, 2.0, kappa, weight_decay,
                                           power)
    for step in range(5):
        grads = gradients(step)
        optimizer.apply([g.astype("float32") for g in grads], variables)
        reference.step(grads)
        assert_matches(optimizer, variables, reference)
    assert reference.regimes == {"fisher", "adam"}
    if kappa:
        assert reference.d != 2.0


def test_averaged_point_interpolates_y_between_z_and_x():
    optimizer, variables, reference = make(0.05, 0.8, 1.0, 0.0)
    for step in range(3):
        optimizer.apply([g.astype("float32") for g in gradients(step)], variables)
        reference.step(gradients(step))
    for i, variable in enumerate(variables):
        y, z, _, _ = slots(optimizer, variable)
        x = to_numpy(optimizer.averaged_point(variable))
        np.testing.assert_allclose(x, reference.x()[i], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(0.2 * z + 0.8 * x, y, rtol=1e-5, atol=1e-6)
    # Before any step x = y = z: the weights.
    fresh, variables, _ = make(0.05, 0.8, 1.0, 0.0)
    for variable, weights in zip(variables, initial_weights()):
        np.testing.assert_allclose(to_numpy(fresh.averaged_point(variable)),
                                   weights, rtol=1e-6, atol=1e-6)


def test_a_nan_gradient_leaves_its_variable_and_slots_unchanged():
    optimizer, variables, reference = make(0.05, 0.9, 1.0, 0.05)
    for step in range(2):
        optimizer.apply([g.astype("float32") for g in gradients(step)], variables)
        reference.step(gradients(step))
    before = slots(optimizer, variables[0])
    grads = gradients(2)
    grads[0][1, 2] = np.nan
    optimizer.apply([g.astype("float32") for g in grads], variables)
    reference.step(grads)
    for kept, now in zip(before, slots(optimizer, variables[0])):
        np.testing.assert_array_equal(now, kept)
    assert_matches(optimizer, variables, reference)  # the other one went on
    for step in range(3, 5):  # and both recover
        optimizer.apply([g.astype("float32") for g in gradients(step)], variables)
        reference.step(gradients(step))
    assert_matches(optimizer, variables, reference)


def test_predicted_reduction_is_the_base_steps():
    """The paper controller's p_cur: lr * sum(g * u - v_hat * u**2 / 2) of the
    momentum-free base step; its variables are SOAA's."""
    weights = initial_weights()
    variables = [keras.Variable(w.astype("float32")) for w in weights]
    optimizer = ScheduleFreeSOAA(learning_rate=0.05, beta_2=BETA_2, epsilon=EPSILON,
                                 initial_radius=1.5, total_steps=10,
                                 controller=PaperController())
    optimizer.build(variables)
    soaa = keras_soaa.SOAA(total_steps=10)
    soaa.build([keras.Variable(w.astype("float32")) for w in weights])
    assert len(optimizer.variables) == len(soaa.variables)
    reference = Reference(weights, 0.05, 0.9, 1.5, 0.0)
    grads = gradients(0)
    optimizer.apply([g.astype("float32") for g in grads], variables)
    predicted = reference.step(grads)
    np.testing.assert_allclose(float(to_numpy(optimizer.predicted_reduction)),
                               predicted, rtol=1e-5)
    for i, variable in enumerate(variables):
        np.testing.assert_allclose(to_numpy(variable), reference.y[i], rtol=1e-5,
                                   atol=1e-6)


def test_always_portable_and_round_trips_its_config():
    optimizer = ScheduleFreeSOAA(fused=None, controller="hypergradient",
                                 averaging_power=2)
    assert optimizer.fused is False and optimizer.beta_1 == 0.9
    copy = ScheduleFreeSOAA.from_config(optimizer.get_config())
    assert copy.get_config() == optimizer.get_config()
    with pytest.raises(ValueError, match="fused"):
        ScheduleFreeSOAA(fused=True)
    with pytest.raises(ValueError, match="beta_1"):
        ScheduleFreeSOAA(beta_1=0.0)
    with pytest.raises(ValueError, match="averaging_power"):
        ScheduleFreeSOAA(averaging_power=3)


def test_fit_with_the_trust_region_callback():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    optimizer = ScheduleFreeSOAA(learning_rate=0.05)
    model.compile(optimizer=optimizer, loss="mse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=8, epochs=3, verbose=0,
                            callbacks=[keras_soaa.TrustRegionCallback()])
    assert not [w for w in caught if "no loss is fed" in str(w.message)]
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert optimizer.total_steps == 12 and int(to_numpy(optimizer.iterations)) == 12
    assert np.isfinite(float(to_numpy(optimizer.previous_predicted_reduction)))
    for variable in model.trainable_variables:
        z, _ = optimizer._moments_of(variable)
        x_point = to_numpy(optimizer.averaged_point(variable))
        np.testing.assert_allclose(0.1 * to_numpy(z) + 0.9 * x_point,
                                   to_numpy(variable), rtol=1e-5, atol=1e-6)


@pytest.fixture
def installed():
    """`install()`'s rows in the benchmark's table for one test."""
    table = dict(optimizers.OPTIMIZERS)
    schedule_free_soaa.install()
    yield
    optimizers.OPTIMIZERS.clear()
    optimizers.OPTIMIZERS.update(table)


@pytest.mark.parametrize("name", ["sf_soaa", "sf_soaa_hd", "sf_soaa_r2"])
def test_benchmark_rows_run_reused_and_evaluate_at_x(installed, name):
    """The rows run in the benchmark's runner (a reused compiled model gives
    the fresh runs' curves: `z` starts at each run's fresh weights), with the
    held-out metric also at the averaged point x; no Fisher-share probe."""
    assert optimizers.label(name) == schedule_free_soaa.LABELS[name]
    reused = runner.sweep(TINY, name, [0.1], [0, 1], reuse=True)
    fresh = runner.sweep(TINY, name, [0.1], [0, 1], reuse=False)
    for a, b in zip(reused["0.1"], fresh["0.1"]):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
        assert a["held_out_x"] is not None and a["held_out_x"] != a["held_out"]
        np.testing.assert_allclose(a["held_out_x"], b["held_out_x"], rtol=1e-4)
        assert a["fisher_share"] is None and len(a["radius"]) == TINY.steps
    assert reused["0.1"][0]["loss"] != reused["0.1"][1]["loss"]
