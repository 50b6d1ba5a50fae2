"""`SOAA.update_step`'s skip rule: a non-finite gradient skips its variable.

A variable whose gradient is NaN or infinite, before or after Keras'
clipping and gradient accumulation, or whose step is not finite (a
non-finite learning rate, `g**2` beyond float32), keeps its weights, `m`
and `v` bit for bit and adds nothing to the predicted reduction; the other
variables and later steps go on exactly as the float64 NumPy reference
(`soaa_reference.py`, which skips the same variables) computes them:
eagerly, compiled (XLA, `jax.jit`, `torch.compile`), with `None`
gradients, and inside `fit`.
"""

import math
import warnings

import keras
import numpy as np
import pytest
from conftest import compiled_apply, make_soaa, scalars_of, to_numpy
from keras import ops
from robustness_checks import (
    INF,
    NAN,
    assert_all_finite,
    assert_state_unchanged,
    assert_variable_untouched,
    corrupt,
    count_no_loss_warnings,
    nan_for,
    snapshot,
    tensors,
)
from soaa_reference import ReferenceSOAA

from keras_soaa import SOAA, TrustRegionCallback

SHAPES = [(2, 3), (4,), ()]
SCALES = [1.0, 0.1, 3.0]
# step -> [(variable index, pattern)]: one or all elements, one or several
# variables, every variable at step 5; steps 6 and 8-10 are clean: recovery.
CORRUPTIONS = {
    2: [(0, "one")],
    3: [(1, "all")],
    4: [(0, "one"), (2, "all")],
    5: [(0, "all"), (1, "one"), (2, "one")],
    7: [(1, "one")],
}
STREAM_HYPER = dict(
    learning_rate=0.05, beta_1=0.8, beta_2=0.95, radius_bound=0.2,
    total_steps=8, initial_radius=1.3, weight_decay=0.05,
)


def clean_gradients(step, dtype="float32"):
    rng = np.random.default_rng(100 + step)
    return [(s * rng.normal(size=shape)).astype(dtype)
            for shape, s in zip(SHAPES, SCALES)]


def initial_weights():
    rng = np.random.default_rng(7)
    return [rng.normal(size=shape).astype("float32") for shape in SHAPES]


@pytest.mark.parametrize("pattern", ["one", "all"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF, "mixed"])
def test_non_finite_gradients_skip_exactly_those_variables(bad, pattern):
    check_non_finite_gradients_skip_exactly_those_variables(bad, pattern)


@pytest.mark.parametrize("bad", [NAN, INF])
def test_non_finite_gradients_skip_when_beta_1_exceeds_beta_2(bad):
    """With `beta_1 > beta_2` the step decides from the sums themselves
    (`SOAA.update_step`), not from the new moments: the same skips."""
    check_non_finite_gradients_skip_exactly_those_variables(
        bad, "one", beta_1=0.9, beta_2=0.5
    )


def check_non_finite_gradients_skip_exactly_those_variables(bad, pattern, **betas):
    hyper = dict(STREAM_HYPER, **betas)
    weights = initial_weights()
    variables = [keras.Variable(w) for w in weights]
    optimizer = make_soaa(**hyper)
    optimizer.build(variables)
    reference = ReferenceSOAA(weights, **hyper)
    ratios = [0.5, 2.0, -1.0, 1.0, 30.0]
    for step in range(1, 11):
        grads = clean_gradients(step)
        corrupted = [i for i, _ in CORRUPTIONS.get(step, [])]
        for i, where in CORRUPTIONS.get(step, []):
            grads[i] = corrupt(grads[i], "all" if where == "all" else pattern,
                               bad)
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads), variables)
        reference.step(grads)
        after = snapshot(optimizer, variables)
        for i in corrupted:
            assert_variable_untouched(before, after, i)
        for i in set(range(3)) - set(corrupted):
            assert not np.array_equal(after["weights"][i],
                                      before["weights"][i])
        if len(corrupted) == 3:  # nothing predicted, but the step counts
            assert after["scalars"][3] == before["scalars"][3]
        assert after["iterations"] == step
        assert_all_finite(optimizer, variables)
        np.testing.assert_allclose(
            after["scalars"][3], reference.predicted_reduction,
            rtol=2e-5, atol=1e-7,
        )
        if step % 2 == 0:
            loss = reference.loss_for_ratio(ratios[step % len(ratios)])
            optimizer.observe_loss(loss)
            reference.observe(loss)
    # Recovered: SOAA followed the reference (which skips) all along.
    final = snapshot(optimizer, variables)
    for key in ("weights", "m", "v"):
        for got, expected in zip(final[key], getattr(
                reference, "weights" if key == "weights" else key)):
            np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(final["scalars"], reference.scalars(),
                               rtol=2e-5, atol=1e-7)


def test_bad_gradients_compiled_match_reference_and_warn_once():
    """One compiled `apply` (XLA / jax.jit / torch.compile) through a stream of
    NaN, +-inf, float32-overflowing, tiny and zero gradients, with a float16
    variable; `total_steps` is None and no loss is observed: exactly one
    warning, at trace time."""
    weights = initial_weights() + [np.array([1.0, -0.5, 2.0], "float16")]
    variables = [keras.Variable(w) for w in weights]
    hyper = dict(learning_rate=0.05, beta_1=0.8, beta_2=0.95,
                 initial_radius=1.3)
    optimizer = SOAA(**hyper)
    reference = ReferenceSOAA(weights, **hyper)
    stream = {
        2: {0: ("one", NAN), 3: ("one", INF)},
        3: {1: ("all", -INF)},
        4: {0: ("value", 1e30), 2: ("value", 1e-30)},  # 1e30**2 overflows
        5: {0: ("all", NAN), 1: ("one", INF), 2: ("one", -INF),
            3: ("all", NAN)},
        6: {1: ("value", 0.0), 3: ("value", 300.0)},  # 300**2 > float16 max
        7: {0: ("value", -1e25)},
    }
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        apply = compiled_apply(optimizer, variables)
        for step in range(1, 10):
            grads = clean_gradients(step) + [
                np.array([0.5, -1.0, 2.0], "float16") * step
            ]
            skipped = []
            for i, (kind, value) in stream.get(step, {}).items():
                if kind == "value":
                    grads[i] = np.full_like(grads[i], value)
                    if abs(value) > 1e19 and grads[i].dtype == np.float32:
                        skipped.append(i)  # documented: g**2 overflows
                else:
                    grads[i] = corrupt(grads[i], kind, value)
                    skipped.append(i)
            before = snapshot(optimizer, variables)
            apply(grads)
            reference.step(nan_for(grads, skipped))
            after = snapshot(optimizer, variables)
            for i in skipped:
                assert_variable_untouched(before, after, i)
            assert_all_finite(optimizer, variables)
            # The float16 weight is rounded once per step: compare the step.
            error = np.abs(after["weights"][3] - reference.weights[3])
            ulp = np.spacing(np.abs(reference.weights[3]).astype(np.float16))
            assert np.all(error <= ulp.astype(np.float64)), (error, ulp)
            reference.weights[3] = after["weights"][3]
    assert count_no_loss_warnings(record) == 1
    final = snapshot(optimizer, variables)
    assert final["iterations"] == 9
    assert optimizer._momentums[3].dtype == "float32"
    for key, expected in (("weights", reference.weights), ("m", reference.m),
                          ("v", reference.v)):
        for i in range(3):
            np.testing.assert_allclose(final[key][i], expected[i],
                                       rtol=2e-5, atol=2e-5)
    for key, expected in (("m", reference.m), ("v", reference.v)):
        np.testing.assert_allclose(final[key][3], expected[3], rtol=2e-5)
    np.testing.assert_allclose(final["scalars"][3],
                               reference.predicted_reduction, rtol=2e-5)


def test_global_clipnorm_spreads_one_nan_to_every_variable():
    """Keras' global clipping divides every gradient by the global norm,
    which is NaN: so every variable skips the step (documented)."""
    variables = [keras.Variable([1.0, 2.0]), keras.Variable([3.0, -4.0])]
    optimizer = SOAA(learning_rate=0.1, global_clipnorm=1.0, total_steps=10)
    reference = ReferenceSOAA([[1.0, 2.0], [3.0, -4.0]], learning_rate=0.1)

    def clip(grads):
        norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads))
        return [g * 1.0 / max(norm, 1.0) for g in grads]

    stream = [
        [np.array([3.0, 0.0]), np.array([0.0, 4.0])],
        [np.array([np.nan, 1.0]), np.array([0.5, 0.5])],
        [np.array([0.2, 0.1]), np.array([-0.3, 0.4])],
    ]
    for grads in stream:
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads, "float32"), variables)
        reference.step(clip(grads))
        after = snapshot(optimizer, variables)
        if np.isnan(grads[0][0]):
            for i in range(2):
                assert_variable_untouched(before, after, i)
            assert after["scalars"][3] == before["scalars"][3]
        assert_all_finite(optimizer, variables)
    assert int(to_numpy(optimizer.iterations)) == 3
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)


def test_clipnorm_and_clipvalue_with_non_finite_gradients():
    """Per-variable clipping keeps a NaN a NaN (skip); `clipnorm` turns an
    inf into NaN (inf / inf: skip); `clipvalue` turns +-inf into +-clipvalue,
    a finite gradient that is applied: the rule holds after clipping."""
    grads = [np.array([np.nan, 1.0]), np.array([np.inf, -np.inf]),
             np.array([3.0, -0.1])]
    cases = {
        "clipnorm": (dict(clipnorm=1.0),
                     [None, None, np.array([3.0, -0.1]) / np.hypot(3, 0.1)]),
        "clipvalue": (dict(clipvalue=0.5),
                      [None, np.array([0.5, -0.5]), np.array([0.5, -0.1])]),
    }
    for clip_kwargs, clipped in cases.values():
        variables = [keras.Variable([1.0, 2.0]) for _ in range(3)]
        optimizer = SOAA(learning_rate=0.1, total_steps=5, **clip_kwargs)
        reference = ReferenceSOAA([[1.0, 2.0]] * 3, learning_rate=0.1)
        optimizer.apply(tensors(grads, "float32"), variables)
        reference.step([np.full(2, np.nan) if c is None else c
                        for c in clipped])
        after = snapshot(optimizer, variables)
        for i, c in enumerate(clipped):
            if c is None:
                np.testing.assert_array_equal(after["weights"][i], [1.0, 2.0])
                np.testing.assert_array_equal(after["m"][i], [0.0, 0.0])
                np.testing.assert_array_equal(after["v"][i], [0.0, 0.0])
            np.testing.assert_allclose(after["weights"][i],
                                       reference.weights[i], rtol=1e-6)
        assert_all_finite(optimizer, variables)


def test_gradient_accumulation_with_a_nan_micro_batch():
    variables = [keras.Variable([1.0, -2.0]), keras.Variable([0.5])]
    optimizer = SOAA(learning_rate=0.1, gradient_accumulation_steps=2,
                     total_steps=5)
    reference = ReferenceSOAA([[1.0, -2.0], [0.5]], learning_rate=0.1)
    micro = [
        [[1.0, 1.0], [0.5]], [[3.0, -1.0], [np.nan]],  # var 1 skips
        [[0.5, 0.0], [1.0]], [[0.5, 2.0], [-3.0]],  # both recover
    ]
    for k in range(0, 4, 2):
        before = snapshot(optimizer, variables)
        for grads in micro[k:k + 2]:
            optimizer.apply(tensors(grads, "float32"), variables)
        reference.step([(np.array(a) + np.array(b)) / 2
                        for a, b in zip(*micro[k:k + 2])])
        after = snapshot(optimizer, variables)
        if k == 0:
            assert_variable_untouched(before, after, 1)
        assert_all_finite(optimizer, variables)  # accumulators reset too
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)


def test_non_finite_learning_rate_skips_every_variable():
    rates = iter([0.1, NAN, INF, 0.1])
    variables = [keras.Variable([1.0, -2.0]), keras.Variable([[0.5, 3.0]])]
    optimizer = SOAA(learning_rate=lambda: next(rates), total_steps=9)
    reference = ReferenceSOAA([[1.0, -2.0], [[0.5, 3.0]]])
    for step, lr in enumerate([0.1, NAN, INF, 0.1], start=1):
        grads = [np.array([0.3, -0.2]) * step, np.array([[1.0, -1.0]])]
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads, "float32"), variables)
        after = snapshot(optimizer, variables)
        if math.isfinite(lr):
            reference.step(grads, learning_rate=lr)
        else:
            reference.step(nan_for(grads, {0, 1}))
            for i in range(2):
                assert_variable_untouched(before, after, i)
            np.testing.assert_array_equal(after["scalars"], before["scalars"])
        assert after["iterations"] == step
        assert_all_finite(optimizer, variables)
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)


def test_none_gradients_in_apply():
    weights = [np.array([1.0, -2.0]), np.array([0.5, 0.5, 0.5]),
               np.array(3.0)]
    variables = [keras.Variable(w, dtype="float32") for w in weights]
    hyper = dict(learning_rate=0.1, weight_decay=0.1)
    optimizer = SOAA(total_steps=10, **hyper)
    reference = ReferenceSOAA(weights, **hyper)
    stream = [
        [[0.5, 1.0], [1.0, -1.0, 0.5], 2.0],
        [[0.5, 1.0], None, 2.0],
        [None, None, -1.0],
        [[0.1, 0.2], [1.0, 1.0, 1.0], None],
    ]
    for grads in stream:
        before = snapshot(optimizer, variables) if optimizer.built else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Keras: "Gradients do not exist"
            optimizer.apply(
                [None if g is None else ops.convert_to_tensor(g, "float32")
                 for g in grads], variables)
        reference.step([np.nan if g is None else np.asarray(g)
                        for g in grads])
        after = snapshot(optimizer, variables)
        for i, g in enumerate(grads):
            if g is None:
                assert_variable_untouched(before, after, i)
        assert_all_finite(optimizer, variables)
    for variable, expected in zip(variables, reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-6)
    # No gradient at all: Keras refuses, nothing changes.
    before = snapshot(optimizer, variables)
    with pytest.raises(ValueError, match="No gradients"):
        optimizer.apply([None, None, None], variables)
    assert_state_unchanged(before, snapshot(optimizer, variables))


class TriggeredNanGradient(keras.layers.Layer):
    """`x @ kernel + bias + offset`, where `offset`'s gradient is NaN on the
    batches whose 4th input column is 1 (the loss stays finite there)."""

    def build(self, input_shape):
        self.kernel = self.add_weight(
            shape=(3, 1), initializer=keras.initializers.Constant(0.3),
            name="kernel")
        self.bias = self.add_weight(shape=(1,), initializer="zeros",
                                    name="bias")
        self.offset = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(0.5),
            name="offset")

    def call(self, inputs):
        features, trigger = inputs[:, :3], ops.max(inputs[:, 3])
        s = self.offset
        # sqrt(0) on trigger batches: value 0, derivative inf * 0 = NaN.
        nan_gradient = ops.sqrt(s * trigger - s * trigger + (1.0 - trigger))
        return ops.matmul(features, self.kernel) + self.bias + s + nan_gradient


def test_nan_gradient_batch_inside_fit_matches_reference():
    rng = np.random.default_rng(5)
    batch, batches, epochs = 8, 4, 3
    features = rng.normal(size=(batch * batches, 3))
    trigger = np.zeros((batch * batches, 1))
    trigger[batch:2 * batch] = 1.0  # the second batch of every epoch
    x = np.concatenate([features, trigger], axis=1).astype("float32")
    y = (features @ [[1.0], [-2.0], [0.5]] + 0.7).astype("float32")
    hyper = dict(learning_rate=0.05, beta_1=0.8, beta_2=0.95)

    keras.utils.set_random_seed(0)
    layer = TriggeredNanGradient()
    model = keras.Sequential([keras.Input((4,)), layer])
    optimizer = SOAA(**hyper)
    model.compile(optimizer=optimizer, loss="mse")

    class WatchOffset(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.unchanged = []

        def _state(self):
            if hasattr(self.model, "jax_state_sync"):
                self.model.jax_state_sync()
            if not optimizer.built:  # TF builds it at the first step
                return [to_numpy(layer.offset), None, None,
                        to_numpy(layer.kernel)]
            i = 2  # offset: the 3rd trainable variable
            return [to_numpy(x) for x in (
                layer.offset, optimizer._momentums[i],
                optimizer._velocities[i], layer.kernel)]

        def on_train_batch_begin(self, batch, logs=None):
            self.before = self._state()

        def on_train_batch_end(self, batch, logs=None):
            after = self._state()
            same = [b is not None and np.array_equal(a, b)
                    for a, b in zip(after, self.before)]
            # (offset, its m and its v all kept; kernel kept)
            self.unchanged.append((all(same[:3]), same[3]))

    watch = WatchOffset()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=batch, epochs=epochs,
                            shuffle=False, verbose=0,
                            callbacks=[TrustRegionCallback(), watch])
    assert count_no_loss_warnings(record) == 0

    # The reference: the same linear model and MSE, by hand, in float64.
    reference = ReferenceSOAA(
        [np.full((3, 1), 0.3), np.zeros(1), np.array(0.5)],
        total_steps=epochs * batches, **hyper)
    for _ in range(epochs):
        for b in range(batches):
            rows = slice(b * batch, (b + 1) * batch)
            kernel, bias, offset = reference.weights
            out = features[rows] @ kernel + bias + offset
            out = out + np.sqrt(1.0 - trigger[rows][0, 0])
            residual = out - y[rows]
            delta = 2 * residual / batch
            d_offset = np.sum(delta) if trigger[rows][0, 0] == 0 else np.nan
            loss = float(np.mean(residual**2))
            reference.step([features[rows].T @ delta, delta.sum(axis=0),
                            np.array(d_offset)])
            reference.observe(loss)

    # On trigger batches: offset (and its m, v) kept, the kernel trained.
    assert watch.unchanged == [
        (b == 1, False) for _ in range(epochs) for b in range(batches)
    ]
    assert all(np.isfinite(history.history["loss"]))
    assert_all_finite(optimizer, model.trainable_variables)
    assert int(to_numpy(optimizer.iterations)) == epochs * batches
    for variable, expected in zip(model.trainable_variables,
                                  reference.weights):
        np.testing.assert_allclose(to_numpy(variable), expected, rtol=1e-5,
                                   atol=1e-6)
    np.testing.assert_allclose(scalars_of(optimizer), reference.scalars(),
                               rtol=1e-4, atol=1e-7)
