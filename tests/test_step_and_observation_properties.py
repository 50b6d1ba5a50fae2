"""Property-based (Hypothesis): SOAA's step and `observe_loss` vs the reference.

Random shapes (empty ones included), hyperparameters, moments, step
numbers, gradients (some not finite) and losses (some not finite): one
step, one observation, and streams of both, each compared with the float64
NumPy reference of the spec (`soaa_reference.py`) from the same state
within its float32 error bound; skipped variables are kept bit for bit,
the state stays finite and the radius within its bounds.
"""

import math

import keras
import numpy as np
from conftest import make_soaa, scalars_of, to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from robustness_checks import (
    INF,
    NAN,
    assert_all_finite,
    assert_observation_matches,
    assert_step_matches,
    corrupt,
    snapshot,
    sync_reference,
    tensors,
)
from soaa_reference import ReferenceSOAA

from keras_soaa import SOAA

PROPERTY_SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture,
                           HealthCheck.too_slow],
)


def log_uniform(low, high):
    return st.floats(math.log10(low), math.log10(high)).map(
        lambda e: float(10.0**e))


shapes_strategy = st.lists(
    st.lists(st.integers(0, 3), max_size=2).map(tuple),
    min_size=1, max_size=3,
)
corruption_strategy = st.sampled_from(
    [None, None, None, ("one", NAN), ("all", INF), ("one", -INF),
     ("all", NAN), ("one", "mixed")])


def make_arrays(shapes, scales, seed):
    rng = np.random.default_rng(seed)
    arrays = []
    for shape, scale in zip(shapes, scales):
        arrays.append(dict(
            theta=rng.normal(size=shape).astype("float32"),
            m=(0.5 * scale * rng.normal(size=shape)).astype("float32"),
            v=((scale * rng.normal(size=shape)) ** 2).astype("float32"),
        ))
    return arrays


def random_gradients(shapes, scales, corruptions, rng):
    grads = []
    for shape, scale, corruption in zip(shapes, scales, corruptions):
        g = (scale * rng.normal(size=shape)).astype("float32")
        if corruption is not None and g.size:
            g = corrupt(g, *corruption)
        grads.append(g)
    return grads


@PROPERTY_SETTINGS
@given(
    shapes=shapes_strategy,
    data=st.data(),
    learning_rate=log_uniform(1e-4, 1.0),
    beta_1=st.one_of(st.sampled_from([0.0, 0.9]), st.floats(0.0, 0.999)),
    beta_2=st.one_of(st.sampled_from([0.0, 0.999]), st.floats(0.0, 0.9999)),
    epsilon=log_uniform(1e-12, 1e-3),
    weight_decay=st.one_of(st.none(), st.floats(0.0, 0.1)),
    radius=st.floats(0.05, 3.0),
    t=st.integers(1, 500),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_one_step_matches_reference(
        shapes, data, learning_rate, beta_1, beta_2, epsilon, weight_decay,
        radius, t, seed):
    scales = [data.draw(log_uniform(1e-4, 1e4)) for _ in shapes]
    corruptions = [data.draw(corruption_strategy) for _ in shapes]
    arrays = make_arrays(shapes, scales, seed)
    lr32 = float(np.float32(learning_rate))
    wd32 = None if weight_decay is None else float(np.float32(weight_decay))
    hyper = dict(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon)
    variables = [keras.Variable(a["theta"]) for a in arrays]
    optimizer = SOAA(learning_rate=learning_rate, weight_decay=weight_decay,
                     total_steps=10, **hyper)
    optimizer.build(variables)
    for i, a in enumerate(arrays):
        optimizer._momentums[i].assign(a["m"])
        optimizer._velocities[i].assign(a["v"])
    optimizer.radius.assign(radius)
    optimizer.predicted_reduction.assign(0.25)
    optimizer.iterations.assign(t - 1)
    reference = ReferenceSOAA([a["theta"] for a in arrays],
                              learning_rate=lr32, weight_decay=wd32, **hyper)
    sync_reference(reference, optimizer, variables)
    grads = random_gradients(shapes, scales, corruptions,
                             np.random.default_rng(seed + 1))
    before = snapshot(optimizer, variables)
    optimizer.apply(tensors(grads), variables)
    reference.step(grads)
    assert_step_matches(optimizer, variables, reference, before, grads)


@PROPERTY_SETTINGS
@given(
    radius=st.floats(0.05, 3.0),
    average=st.floats(-1e3, 1e3),
    count=st.integers(0, 200),
    predicted=st.floats(-10.0, 10.0),
    previous=st.one_of(st.floats(-1.0, 10.0), log_uniform(1e-12, 1e-3)),
    t=st.integers(0, 400),
    total_steps=st.integers(1, 300),
    radius_bound=st.floats(1e-3, 0.999),
    beta_1=st.one_of(st.just(0.0), st.floats(0.0, 0.999)),
    epsilon=log_uniform(1e-12, 1e-2),
    loss=st.one_of(st.floats(-1e3, 1e3, width=32),
                   st.sampled_from([NAN, INF, -INF])),
)
def test_property_one_observation_matches_reference(
        radius, average, count, predicted, previous, t, total_steps,
        radius_bound, beta_1, epsilon, loss):
    theta = keras.Variable([1.0])
    hyper = dict(total_steps=total_steps, radius_bound=radius_bound,
                 beta_1=beta_1, epsilon=epsilon)
    optimizer = make_soaa(**hyper)
    optimizer.build([theta])
    for variable, value in zip(
            [optimizer.radius, optimizer.loss_average, optimizer.loss_count,
             optimizer.predicted_reduction,
             optimizer.previous_predicted_reduction],
            [radius, average, count, predicted, previous]):
        variable.assign(value)
    optimizer.iterations.assign(t)
    reference = ReferenceSOAA([[1.0]], **hyper)
    sync_reference(reference, optimizer, [theta])
    before = scalars_of(optimizer)
    optimizer.observe_loss(loss)
    reference.observe(loss)
    assert np.all(np.isfinite(scalars_of(optimizer)))
    assert_observation_matches(optimizer, reference, before, loss)


@PROPERTY_SETTINGS
@given(
    shapes=shapes_strategy,
    data=st.data(),
    learning_rate=log_uniform(1e-3, 0.3),
    beta_1=st.floats(0.0, 0.99),
    beta_2=st.floats(0.0, 0.999),
    epsilon=log_uniform(1e-10, 1e-4),
    radius_bound=st.floats(0.01, 0.9),
    total_steps=st.integers(1, 8),
    initial_radius=st.floats(0.1, 3.0),
    weight_decay=st.one_of(st.none(), st.floats(0.0, 0.1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_streams_keep_every_invariant(
        shapes, data, learning_rate, beta_1, beta_2, epsilon, radius_bound,
        total_steps, initial_radius, weight_decay, seed):
    """A stream of steps (some with non-finite gradients) and observations
    (some of non-finite losses): every step and observation matches the
    reference from the same state, skipped variables are kept bit for bit,
    the state stays finite and the radius within its bounds."""
    scales = [data.draw(log_uniform(1e-3, 1e3)) for _ in shapes]
    steps = data.draw(st.integers(2, 6))
    hyper = dict(beta_1=beta_1, beta_2=beta_2, epsilon=epsilon,
                 radius_bound=radius_bound, total_steps=total_steps,
                 initial_radius=initial_radius)
    arrays = make_arrays(shapes, scales, seed)
    variables = [keras.Variable(a["theta"]) for a in arrays]
    optimizer = make_soaa(learning_rate=learning_rate,
                          weight_decay=weight_decay, **hyper)
    reference = ReferenceSOAA(
        [a["theta"] for a in arrays],
        learning_rate=float(np.float32(learning_rate)),
        weight_decay=(None if weight_decay is None
                      else float(np.float32(weight_decay))), **hyper)
    optimizer.build(variables)
    rng = np.random.default_rng(seed + 1)
    finite_losses = 0
    for _ in range(steps):
        corruptions = [data.draw(corruption_strategy) for _ in shapes]
        grads = random_gradients(shapes, scales, corruptions, rng)
        sync_reference(reference, optimizer, variables)
        before = snapshot(optimizer, variables)
        optimizer.apply(tensors(grads), variables)
        reference.step(grads)
        assert_step_matches(optimizer, variables, reference, before, grads)
        kind = data.draw(st.sampled_from(
            [None, "ratio", "ratio", "ratio", NAN, INF, -INF]))
        if kind is None:
            continue
        sync_reference(reference, optimizer, variables)
        if kind != "ratio":
            loss = kind
        elif reference.loss_count == 0 or beta_1 < 1e-3:
            loss = float(np.float32(data.draw(st.floats(-10.0, 10.0))))
        else:
            rho = data.draw(st.floats(-3.0, 3.0))
            loss = float(np.float32(reference.loss_for_ratio(rho)))
        finite_losses += math.isfinite(loss)
        before_scalars = scalars_of(optimizer)
        optimizer.observe_loss(loss)
        reference.observe(loss)
        assert_observation_matches(optimizer, reference, before_scalars, loss)
    assert int(to_numpy(optimizer.iterations)) == steps
    assert scalars_of(optimizer)[2] == finite_losses
    assert_all_finite(optimizer, variables)
