"""The gradient-driven controllers against the NumPy reference, and their API.

`SOAA(controller="hypergradient")` and `SOAA(controller="gradient_ratio")`.
"""

import os
import tempfile

import keras
import numpy as np
import pytest
from conftest import compiled_apply, make_soaa, scalars_of, to_numpy
from custom_controller import LossTrendController, SignController
from keras import ops
from soaa_reference import ReferenceSOAA
from test_optimizer import make_problem

import keras_soaa
from keras_soaa import SOAA, TrustRegionCallback
from keras_soaa.controllers import (
    GradientRatioController,
    HypergradientController,
    PaperController,
)

# The reference's arguments (its own spelling) and SOAA's for each controller.
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
    optimizer = make_soaa(**config)
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
    # bound (observed losses change nothing).
    steps = np.diff(radii)
    assert np.any(steps > 1e-4) and np.any(steps < -1e-4)
    assert min(radii) == pytest.approx(0.8) and max(radii) == pytest.approx(1.3)
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
                    ("actual_average", "predicted_average")]
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
    with pytest.raises(AttributeError, match="loss_count"):
        _ = optimizer.loss_count  # the paper controller's, not this one's


def test_hypergradient_radius_grows_on_a_steady_slope_and_shrinks_on_overshoot():
    """Same-sign gradients (a long slope) grow d; alternating ones shrink it."""
    for sign, grows in ((1.0, True), (-1.0, False)):
        variable = keras.Variable([0.0, 0.0])
        optimizer = SOAA(controller=HypergradientController(learning_rate=0.1))
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
    "make, name",
    [
        (lambda: SOAA(controller="adaptive"), "controller"),
        (lambda: HypergradientController(learning_rate=-0.1), "learning_rate"),
        (lambda: GradientRatioController(min_radius=0.0), "min_radius"),
        (lambda: HypergradientController(min_radius=2.0, max_radius=1.0),
         "max_radius"),
        (lambda: GradientRatioController(decay=1.0), "decay"),
        (lambda: GradientRatioController(grow_above=0.0), "grow_above"),
        (lambda: PaperController(radius_bound=1.0), "radius_bound"),
        (lambda: SOAA(controller="hypergradient", initial_radius=20.0),
         "initial_radius"),
        # The deprecated spelling is checked by the controller it reaches.
        (lambda: SOAA(controller="hypergradient", radius_learning_rate=-0.1),
         "learning_rate"),
        (lambda: SOAA(radius_bound=0.0), "radius_bound"),
    ],
)
def test_invalid_controller_arguments_name_the_argument(make, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make()


@pytest.mark.parametrize("kwargs, controller", [
    (dict(radius_bound=0.3), PaperController(radius_bound=0.3)),
    (dict(controller="hypergradient", radius_learning_rate=0.2, max_radius=3.0),
     HypergradientController(learning_rate=0.2, max_radius=3.0)),
    (dict(controller=GradientRatioController(decay=0.8), min_radius=0.5),
     GradientRatioController(decay=0.8, min_radius=0.5)),
], ids=["paper", "hypergradient", "gradient_ratio_instance"])
def test_deprecated_arguments_warn_with_the_new_spelling(kwargs, controller):
    with pytest.warns(DeprecationWarning, match=type(controller).__name__):
        optimizer = SOAA(**kwargs, name="soaa")
    assert optimizer.controller == controller
    assert optimizer.get_config() == SOAA(controller=controller,
                                          name="soaa").get_config()


def test_gradient_ratio_grows_on_a_steady_slope_and_shrinks_on_overshoot():
    for sign, grows in ((1.0, True), (-1.0, False)):
        variable = keras.Variable([0.0, 0.0])
        optimizer = SOAA(controller=GradientRatioController(learning_rate=0.1))
        for step in range(10):
            g = [1.0, 2.0] if sign > 0 or step % 2 == 0 else [-3.0, -6.0]
            optimizer.apply([ops.convert_to_tensor(g)], [variable])
        radius = float(to_numpy(optimizer.radius))
        assert (radius > 1.5) if grows else (radius < 0.9), radius


@pytest.mark.parametrize("controller, names", [
    ("paper", ["predicted_reduction", "loss_average", "loss_count",
               "previous_predicted_reduction"]),
    ("hypergradient", ["alignment", "gradient_sq", "direction_sq"]),
    ("gradient_ratio", ["alignment", "momentum_alignment", "actual_average",
                        "predicted_average"]),
])
def test_config_round_trip_and_state_layout(controller, names):
    """Layout 4: `state_layout` before the moments; after them `radius`, the
    controller's sums then state, and nothing a controller does not declare."""
    optimizer = SOAA(controller=controller)
    saved = optimizer.get_config()
    assert saved["controller"] == controller
    assert saved["state_layout_version"] == 4
    restored = SOAA.from_config(saved)
    assert restored.get_config() == saved
    restored.build([keras.Variable([1.0, 2.0])])
    variables = [v.name for v in restored.variables]
    assert variables[-1 - len(names):] == ["radius", *names]
    assert variables[1:3] == ["learning_rate", "state_layout"]
    assert list(restored.controller_state()) == names
    assert float(to_numpy(restored.variables[2])) == 4.0


@pytest.mark.parametrize("controller", [
    "hypergradient", "gradient_ratio", SignController(learning_rate=0.2),
    "test_sign", LossTrendController(factor=1.5),
], ids=["hypergradient", "gradient_ratio", "user_instance", "user_name",
        "user_loss_driven"])
def test_controller_fit_saves_and_resumes_exactly(controller):
    """A model trained with a controller (built in or a user's, driven by
    gradients or by losses) saves, loads and continues exactly as the
    uninterrupted run (its state included)."""
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


@pytest.mark.parametrize("fused", [None, False])
def test_user_controller_follows_its_rule(fused):
    """A constant gradient keeps `sum(g * q_prev) > 0` from the second step:
    `log d` grows by `step` per step until `max_radius`; `state` counts."""
    variable = keras.Variable([1.0, -2.0, 0.5])
    optimizer = SOAA(controller=SignController(learning_rate=0.5, max_radius=4.0),
                     fused=fused)
    radii = []
    for _ in range(6):
        optimizer.apply([ops.convert_to_tensor([0.3, -0.1, 0.2])], [variable])
        radii.append(float(to_numpy(optimizer.radius)))
    expected = np.minimum(np.exp(0.5 * np.arange(6)), 4.0)
    np.testing.assert_allclose(radii, expected, rtol=1e-6)
    state = optimizer.controller_state()
    assert float(to_numpy(state["steps"])) == 6.0
    assert float(to_numpy(state["alignment"])) == 0.0  # consumed


def test_controller_registry_and_serialization():
    assert set(keras_soaa.controllers.names()) >= {
        "paper", "hypergradient", "gradient_ratio", "test_sign"}
    assert SOAA(controller="test_sign").get_config()["controller"] == "test_sign"
    config = SOAA(controller=SignController(learning_rate=0.3)).get_config()
    assert isinstance(config["controller"], dict)
    assert SOAA.from_config(config).controller == SignController(learning_rate=0.3)
    with pytest.raises(ValueError, match="controller"):
        SOAA(controller="no_such_controller")
    with pytest.raises(ValueError, match="already registered"):
        keras_soaa.controllers.register("paper")(SignController)


def test_loss_driven_user_controller_follows_its_rule():
    """A rising loss shrinks `d` by `factor`, a falling one grows it; a NaN
    loss changes nothing; no sums declared, none computed."""
    variable = keras.Variable([1.0, -2.0])
    optimizer = SOAA(controller=LossTrendController(factor=2.0), total_steps=10)
    radii = []
    for loss in (1.0, 0.5, float("nan"), 3.0, 0.1):
        optimizer.apply([ops.convert_to_tensor([0.3, -0.1])], [variable])
        optimizer.observe_loss(loss)
        radii.append(float(to_numpy(optimizer.radius)))
    np.testing.assert_allclose(radii, [1.0, 2.0, 2.0, 1.0, 2.0])
    assert list(optimizer.controller_state()) == ["average", "count"]


def test_a_loss_driven_controller_fed_no_loss_warns_once():
    """In `fit` without the callback (whatever `total_steps` is), and in a
    custom loop that never calls `observe_loss`."""
    x = np.ones((16, 2), "float32")
    for optimizer in (keras_soaa.presets.paper_cosine(0.01, total_steps=4),
                      SOAA(total_steps=100)):
        model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(optimizer=optimizer, loss="mse")
        with pytest.warns(UserWarning, match="TrustRegionCallback") as caught:
            model.fit(x, x[:, :1], batch_size=4, epochs=2, verbose=0)
        assert len([w for w in caught if "no loss" in str(w.message)]) == 1
    variable = keras.Variable([1.0])
    optimizer = SOAA(total_steps=10)
    optimizer.apply([ops.convert_to_tensor([1.0])], [variable])
    with pytest.warns(UserWarning, match="observe_loss"):
        optimizer.apply([ops.convert_to_tensor([1.0])], [variable])


def test_custom_loop_feeding_losses_does_not_warn():
    import warnings

    variable = keras.Variable([1.0])
    optimizer = SOAA(total_steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(3):
            optimizer.apply([ops.convert_to_tensor([1.0])], [variable])
            optimizer.observe_loss(1.0 / (step + 1))
