"""The gradient-driven controllers against the NumPy reference, and their API.

`SOAA(controller="hypergradient")` and `SOAA(controller="gradient_ratio")`.
"""

import os
import tempfile

import keras
import numpy as np
import pytest
from conftest import compiled_apply, scalars_of, to_numpy
from custom_controller import SignController
from keras import ops
from soaa_reference import ReferenceSOAA
from test_optimizer import make_problem

import keras_soaa
from keras_soaa import SOAA, TrustRegionCallback

HYPER = dict(
    learning_rate=0.01, beta_1=0.8, beta_2=0.95, weight_decay=0.05,
    controller="hypergradient", radius_learning_rate=0.3, min_radius=0.8,
    max_radius=1.3, initial_radius=1.2,
)
RATIO = dict(HYPER, controller="gradient_ratio", radius_learning_rate=0.1,
             initial_radius=1.0)
CONFIGS = {"hypergradient": HYPER, "gradient_ratio": RATIO}


def ratio_gradients(gradients):
    """A steady slope for 8 steps, then growing oscillation.

    The gradient ratio starts near 1 (grow), falls through the dead zone
    [0.1, 0.5] and below 0.1 (shrink): every branch and both bounds, with
    rho at least 0.003 from a threshold on every step.
    """
    fixed = gradients(0)

    def stream(step):
        sign = 1.0 if step <= 8 else 3.0 * (-1.0) ** step
        return [(sign * f + 0.2 * n).astype(f.dtype)
                for f, n in zip(fixed, gradients(step))]

    return stream


def eager_apply(optimizer, variables):
    return lambda grads: optimizer.apply(
        [ops.convert_to_tensor(g) for g in grads], variables
    )


def run_against_reference(factory, steps=30, nan_at=None, observe=False,
                          controller="hypergradient"):
    weights, gradients = make_problem("float32")
    if controller == "gradient_ratio":
        gradients = ratio_gradients(gradients)
    config = CONFIGS[controller]
    optimizer = SOAA(**config)
    variables = [keras.Variable(w) for w in weights]
    reference = ReferenceSOAA(weights, **config)
    apply = factory(optimizer, variables)
    radii = []
    for step in range(1, steps + 1):
        grads = gradients(step)
        if step == nan_at:
            grads[0] = grads[0].copy()
            grads[0][0, 0] = np.nan
        apply(grads)
        reference.step(grads)
        if observe and step % 2:
            loss = 1.0 / step
            optimizer.observe_loss(loss)
            reference.observe(loss)
        radii.append(reference.radius)
    return optimizer, variables, reference, radii


@pytest.mark.parametrize("controller", ["hypergradient", "gradient_ratio"])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_gradient_controller_matches_reference(mode, controller):
    factory = eager_apply if mode == "eager" else compiled_apply
    optimizer, variables, reference, radii = run_against_reference(
        factory, nan_at=7, observe=True, controller=controller
    )
    # The case covers what it claims: the radius moved both ways and hit a
    # bound; the observed losses were counted.
    steps = np.diff(radii)
    assert np.any(steps > 1e-4) and np.any(steps < -1e-4)
    assert min(radii) == pytest.approx(0.8) and max(radii) == pytest.approx(1.3)
    assert reference.loss_count == 15
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=2e-5,
                                   atol=2e-5)
    np.testing.assert_allclose(
        scalars_of(optimizer), reference.scalars(), rtol=2e-5, atol=1e-7
    )
    # The per-step sums are consumed by the step that made them.
    state = optimizer.controller_state()
    sum_count = len(optimizer.controller.sums)
    for total in list(state.values())[:sum_count]:
        assert float(to_numpy(total)) == 0.0
    if controller == "gradient_ratio":
        averages = [float(to_numpy(state[name])) for name in
                    ("ratio_actual_average", "ratio_predicted_average")]
        np.testing.assert_allclose(
            averages, [reference.ratio_actual, reference.ratio_predicted],
            rtol=2e-5,
        )


def test_hypergradient_radius_ignores_losses():
    variable = keras.Variable([1.0, -2.0])
    optimizer = SOAA(controller="hypergradient")
    optimizer.apply([ops.convert_to_tensor([0.5, -1.0])], [variable])
    radius = float(to_numpy(optimizer.radius))
    for loss in (10.0, 0.001, float("nan")):
        optimizer.observe_loss(loss)  # no total_steps needed
        assert float(to_numpy(optimizer.radius)) == radius
    assert float(to_numpy(optimizer.loss_count)) == 2.0


def test_hypergradient_radius_grows_on_a_steady_slope_and_shrinks_on_overshoot():
    """Same-sign gradients (a long slope) grow d; alternating ones shrink it."""
    for sign, grows in ((1.0, True), (-1.0, False)):
        variable = keras.Variable([0.0, 0.0])
        optimizer = SOAA(controller="hypergradient", radius_learning_rate=0.1)
        for step in range(10):
            g = [1.0, 2.0] if sign > 0 or step % 2 == 0 else [-1.0, -2.0]
            optimizer.apply([ops.convert_to_tensor(g)], [variable])
        radius = float(to_numpy(optimizer.radius))
        assert (radius > 1.2) if grows else (radius < 0.9), radius


def test_hypergradient_does_not_warn_without_losses():
    import warnings

    variable = keras.Variable([1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SOAA(controller="hypergradient").apply(
            [ops.convert_to_tensor([1.0])], [variable]
        )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(controller="adaptive"), "controller"),
        (dict(controller="hypergradient", radius_learning_rate=-0.1),
         "radius_learning_rate"),
        (dict(min_radius=0.0), "min_radius"),
        (dict(min_radius=2.0, max_radius=1.0), "max_radius"),
        (dict(controller="hypergradient", initial_radius=20.0),
         "initial_radius"),
    ],
)
def test_invalid_controller_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        SOAA(**kwargs)


def test_gradient_ratio_grows_on_a_steady_slope_and_shrinks_on_overshoot():
    for sign, grows in ((1.0, True), (-1.0, False)):
        variable = keras.Variable([0.0, 0.0])
        optimizer = SOAA(controller="gradient_ratio", radius_learning_rate=0.1)
        for step in range(10):
            g = [1.0, 2.0] if sign > 0 or step % 2 == 0 else [-3.0, -6.0]
            optimizer.apply([ops.convert_to_tensor(g)], [variable])
        radius = float(to_numpy(optimizer.radius))
        assert (radius > 1.5) if grows else (radius < 0.9), radius


@pytest.mark.parametrize(
    "config, version, extra",
    [(HYPER, 2, 3), (RATIO, 3, 4)],
    ids=["hypergradient", "gradient_ratio"],
)
def test_config_round_trip_and_state_layout_versions(config, version, extra):
    optimizer = SOAA(**config)
    saved = optimizer.get_config()
    assert saved["controller"] == config["controller"]
    assert saved["state_layout_version"] == version
    assert SOAA().get_config()["state_layout_version"] == 1
    restored = SOAA.from_config(saved)
    assert restored.get_config() == saved
    variable = keras.Variable([1.0, 2.0])
    restored.build([variable])
    paper = SOAA()
    paper.build([keras.Variable([1.0, 2.0])])
    assert len(restored.variables) == len(paper.variables) + extra


@pytest.mark.parametrize("controller", [
    "hypergradient", "gradient_ratio", SignController(step=0.2), "test_sign",
], ids=["hypergradient", "gradient_ratio", "user_instance", "user_name"])
def test_gradient_controller_fit_saves_and_resumes_exactly(controller):
    """A model trained with a gradient-driven controller (built in or a
    user's) saves, loads and continues exactly as the uninterrupted run (its
    averages included)."""
    x = np.linspace(-1, 1, 64, dtype="float32").reshape(32, 2)
    y = (x @ np.array([[2.0], [-1.0]], "float32")) + 0.5

    def make():
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(4),
                                  keras.layers.Dense(1)])
        model.compile(optimizer=SOAA(learning_rate=0.05,
                                     controller=controller), loss="mse")
        return model

    def fit(model, epochs):
        return model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False,
                         verbose=0, callbacks=[TrustRegionCallback()])

    straight = make()
    history = fit(straight, 4)
    radii = history.history["radius"]
    assert np.max(np.abs(np.asarray(radii) - 1.0)) > 1e-3  # moved, logged
    halves = make()
    fit(halves, 2)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        halves.save(path)
        loaded = keras.saving.load_model(path)
    assert loaded.optimizer.controller == keras_soaa.controllers.get(controller)
    fit(loaded, 2)
    for a, b in zip(straight.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    for a, b in zip(straight.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6,
                                   atol=1e-7, err_msg=a.name)
    np.testing.assert_allclose(scalars_of(loaded.optimizer),
                               scalars_of(straight.optimizer),
                               rtol=1e-6, atol=1e-7)


def test_hypergradient_fit_on_a_generator_needs_no_total_steps():
    def batches():
        rng = np.random.default_rng(0)
        for _ in range(6):
            x = rng.normal(size=(8, 2)).astype("float32")
            yield x, x.sum(axis=1, keepdims=True)

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    optimizer = SOAA(learning_rate=0.05, controller="hypergradient")
    model.compile(optimizer=optimizer, loss="mse")
    history = model.fit(batches(), epochs=1, verbose=0,
                        callbacks=[TrustRegionCallback()])
    assert optimizer.total_steps is None
    assert len(history.history["radius"]) == 1
    assert float(to_numpy(optimizer.loss_count)) >= 5  # losses still counted


@pytest.mark.parametrize("fused", [None, False])
def test_user_controller_follows_its_rule(fused):
    """A constant gradient keeps `sum(g * q_prev) > 0` from the second step:
    `log d` grows by `step` per step until `max_radius`; `state` counts."""
    variable = keras.Variable([1.0, -2.0, 0.5])
    optimizer = SOAA(controller=SignController(step=0.5), max_radius=4.0,
                     fused=fused)
    radii = []
    for _ in range(6):
        optimizer.apply([ops.convert_to_tensor([0.3, -0.1, 0.2])], [variable])
        radii.append(float(to_numpy(optimizer.radius)))
    expected = np.minimum(np.exp(0.5 * np.arange(6)), 4.0)
    np.testing.assert_allclose(radii, expected, rtol=1e-6)
    state = optimizer.controller_state()
    assert float(to_numpy(state["test_sign_steps"])) == 6.0
    assert float(to_numpy(state["test_sign_alignment"])) == 0.0  # consumed


def test_controller_registry_and_serialization():
    assert set(keras_soaa.controllers.names()) >= {
        "paper", "hypergradient", "gradient_ratio", "test_sign"}
    assert SOAA(controller="test_sign").get_config()["controller"] == "test_sign"
    config = SOAA(controller=SignController(step=0.3)).get_config()
    assert isinstance(config["controller"], dict)
    assert SOAA.from_config(config).controller == SignController(step=0.3)
    with pytest.raises(ValueError, match="controller"):
        SOAA(controller="no_such_controller")
    with pytest.raises(ValueError, match="already registered"):
        keras_soaa.controllers.register("paper")(SignController)
