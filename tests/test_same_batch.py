"""The same-batch controller: its rule against the NumPy reference, `observe_step`
in a custom loop, and `TrustRegionCallback`'s extra forward pass in `fit`."""

import warnings

import keras
import numpy as np
import pytest
from conftest import BACKEND, compiled_apply, to_numpy
from keras import ops
from soaa_reference import ReferenceSOAA
from test_optimizer import make_problem

from keras_soaa import SOAA, TrustRegionCallback
from keras_soaa.controllers import SameBatchController

# Narrow bounds, so that a short run reaches both.
CONSTANTS = dict(min_radius=0.5, max_radius=2.0)


def eager_apply(optimizer, variables):
    return lambda grads: optimizer.apply(
        [ops.convert_to_tensor(g) for g in grads], variables)


# Per step: the ratio each observed pair is made to have (None: no pair), or
# a special pair. Every branch: grow, stay, shrink, both bounds, a step that
# predicts no reduction on its batch (steps 7 and 10: g . u < 0), a non-finite
# loss after the step, a non-finite loss before it, a skipped step.
RATIOS = [1.0, 1.0, 1.0, 1.0, 0.5, 0.1, 0.1, "nan_after", 0.1, 0.0, -2.0,
          "nan_before", 0.9, "skipped", None, 0.9]


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_observe_step_follows_the_reference_rule(mode):
    weights, gradients = make_problem("float32")
    variables = [keras.Variable(w) for w in weights]
    optimizer = SOAA(learning_rate=0.01, controller=SameBatchController(**CONSTANTS))
    reference = ReferenceSOAA(weights, learning_rate=0.01, **CONSTANTS)
    apply = (eager_apply if mode == "eager" else compiled_apply)(optimizer, variables)
    radii = []
    for step, ratio in enumerate(RATIOS, start=1):
        grads = gradients(step)
        if ratio == "skipped":  # every variable non-finite: no step, no prediction
            grads = [np.full_like(g, np.nan) for g in grads]
        apply(grads)
        reference.step(grads)
        before, after = 3.0, 3.0 - (0.5 if isinstance(ratio, str) else ratio or 0) * (
            reference.step_prediction)
        if ratio == "nan_after":
            after = np.nan
        if ratio == "nan_before":
            before = np.inf
        if ratio is not None:
            optimizer.observe_step(before, after)
            reference.observe_step(before, after)
        radii.append(reference.radius)
        assert float(to_numpy(optimizer.radius)) == pytest.approx(reference.radius,
                                                                  rel=1e-6), step
    # The case covers what it claims: growth, shrinking, both bounds, and
    # pairs that leave the radius alone.
    assert max(radii) == 2.0 and min(radii) == 0.5
    assert radii[6] == radii[5] and radii[9] == radii[8]  # p < 0: left alone
    assert radii[7] == radii[6] * 0.5  # nan_after shrinks
    assert radii[11] == radii[10] and radii[13] == radii[12]  # left alone
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=2e-5, atol=2e-5)
    prediction = optimizer.controller_state()["step_prediction"]
    assert float(to_numpy(prediction)) == pytest.approx(reference.step_prediction,
                                                        rel=2e-5)


def test_other_controllers_ignore_pairs_and_same_batch_ignores_single_losses():
    variable = keras.Variable([1.0, 2.0])
    paper = SOAA(total_steps=10)
    same_batch = SOAA(controller="same_batch")
    for optimizer in (paper, same_batch):
        optimizer.apply([ops.convert_to_tensor([0.5, -0.5])], [variable])
    paper.observe_step(1.0, 0.0)
    same_batch.observe_loss(0.0)
    assert float(to_numpy(paper.loss_count)) == 0.0
    assert float(to_numpy(same_batch.radius)) == 1.0
    same_batch.observe_step(1.0, 0.0)
    assert float(to_numpy(same_batch.radius)) == 1.25


def test_custom_loop_without_observe_step_warns_naming_it():
    variable = keras.Variable([1.0, 2.0])
    optimizer = SOAA(controller="same_batch")
    with pytest.warns(UserWarning, match="observe_step"):
        for _ in range(2):
            optimizer.apply([ops.convert_to_tensor([0.5, -0.5])], [variable])


def test_custom_loop_feeding_pairs_does_not_warn():
    variable = keras.Variable([1.0, 2.0])
    optimizer = SOAA(controller="same_batch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            optimizer.apply([ops.convert_to_tensor([0.5, -0.5])], [variable])
            optimizer.observe_step(1.0, 0.9)


@pytest.mark.parametrize("make, name", [
    (lambda: SameBatchController(every=0), "every"),
    (lambda: SameBatchController(every=2.0), "every"),
    (lambda: SameBatchController(shrink=0.0), "shrink"),
    (lambda: SameBatchController(grow=0.9), "grow"),
    (lambda: SameBatchController(shrink_below=0.5, grow_above=0.4), "grow_above"),
    (lambda: SameBatchController(min_radius=2.0, max_radius=1.0), "max_radius"),
    (lambda: SOAA(controller="same_batch", initial_radius=1000.0), "initial_radius"),
])
def test_invalid_arguments_name_the_argument(make, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        make()


def test_observe_step_refuses_a_non_scalar_loss_and_keeps_the_state():
    variable = keras.Variable([1.0, 2.0])
    optimizer = SOAA(controller="same_batch")
    optimizer.apply([ops.convert_to_tensor([0.5, -0.5])], [variable])
    with pytest.raises(ValueError, match="`loss_after`"):
        optimizer.observe_step(1.0, [0.5, 0.4])
    assert float(to_numpy(optimizer.radius)) == 1.0


class Recorder(keras.callbacks.Callback):
    """Weights, radius and the step's prediction before and after each batch."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_begin(self, batch, logs=None):
        self.before = [w.copy() for w in self.model.get_weights()]

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        radius = float(to_numpy(optimizer.radius))
        assert float(to_numpy(logs["radius"])) == radius  # every batch's logs
        self.rows.append((self.before, [w.copy() for w in self.model.get_weights()],
                          radius, float(to_numpy(
                              optimizer.controller_state()["step_prediction"]))))


def mse(weights, x, y):
    kernel, bias = (np.asarray(w, np.float64) for w in weights)
    return float(np.mean((x @ kernel + bias - y) ** 2))


def test_fit_tests_each_every_th_step_on_its_own_batch():
    """In `fit`, every 2nd batch's loss before and after its step (the step's
    own weights, that batch) reaches the rule; other batches leave `d`."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 3)).astype("float32")
    y = (x @ [[1.0], [-2.0], [0.5]] + 0.3 * rng.normal(size=(128, 1))).astype(
        "float32")
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.set_weights([np.zeros((3, 1), "float32"), np.zeros(1, "float32")])
    controller = SameBatchController(every=2, shrink_below=1.1, grow_above=1.4,
                                     **CONSTANTS)
    model.compile(SOAA(learning_rate=0.3, controller=controller), "mse")
    recorder = Recorder()
    model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
              callbacks=[TrustRegionCallback(), recorder])
    radius, moves = 1.0, set()
    for index, (before, after, observed_radius, prediction) in enumerate(recorder.rows):
        if index % 2 == 0:
            batch = slice(16 * (index % 8), 16 * (index % 8 + 1))
            rho = (mse(before, x[batch], y[batch]) - mse(after, x[batch], y[batch])
                   ) / prediction
            assert min(abs(rho - 1.1), abs(rho - 1.4)) > 1e-3  # a clear case
            # The batch's quadratic model is exact but for the Fisher: rho
            # stays near 1, so the thresholds sit there.
            factor = (1.0 if prediction <= 0 else 0.5 if rho < 1.1
                      else 1.25 if rho > 1.4 else 1.0)
            moves.add(factor)
            radius = float(np.clip(radius * factor, 0.5, 2.0))
        assert observed_radius == pytest.approx(radius, rel=1e-6), index
    assert moves == {0.5, 1.25, 1.0}  # the case covers every branch


def test_fit_where_the_test_cannot_run_in_the_train_step():
    """`run_eagerly` on TensorFlow and JAX is refused, naming `observe_step`;
    torch runs the test either way."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(SOAA(controller="same_batch"), "mse", run_eagerly=True)
    x, y = np.ones((8, 2), "float32"), np.zeros((8, 1), "float32")
    fit = lambda: model.fit(x, y, batch_size=4, verbose=0,  # noqa: E731
                            callbacks=[TrustRegionCallback()])
    if BACKEND == "torch":
        fit()
        assert float(to_numpy(model.optimizer.radius)) != 1.0
    else:
        with pytest.raises(ValueError, match="observe_step"):
            fit()


def test_fit_without_the_callback_warns():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(SOAA(controller="same_batch"), "mse")
    with pytest.warns(UserWarning, match="TrustRegionCallback"):
        model.fit(np.ones((8, 2), "float32"), np.zeros((8, 1), "float32"),
                  batch_size=4, verbose=0)



def test_fit_tests_the_step_with_its_own_dropout_masks():
    """The loss after the step is of the same function as the step's own:
    the same dropout masks (the seed generators as they were before it). A
    small step's ratio is then near 1, so with `shrink_below=0.5` no test
    shrinks `d`; with other masks the loss changes by far more than such a
    step predicts, and `d` falls to its lower bound within 16 tests."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype("float32")
    y = x @ rng.normal(size=(4, 1)).astype("float32")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(32),
                              keras.layers.Dropout(0.5, seed=1), keras.layers.Dense(1)])
    controller = SameBatchController(every=1, shrink_below=0.5, grow_above=2.0)
    model.compile(SOAA(learning_rate=1e-3, controller=controller), "mse")
    radii = []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: radii.append(float(logs["radius"])))
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, shuffle=False,
              callbacks=[TrustRegionCallback(), record])
    assert len(radii) == 16 and min(radii) >= 1.0
