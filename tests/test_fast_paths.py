"""The backend's own update path gives the numbers of the portable one.

On torch, SOAA updates all variables with fused `torch._foreach_*` kernels
(keras_soaa/backends/torch.py), compiled by `torch.compile` with
`fused=True`; on eager TF, `apply` runs the portable
`update_step` per variable inside one XLA-compiled function; on JAX, the
plain `update_step` per variable. Either way, `apply` must match the plain
eager loop of `update_step` over the variables, state included.
"""

import keras
import numpy as np
import pytest
from conftest import compiled_apply, scalars_of, to_numpy
from custom_controller import SignController
from keras import ops

import keras_soaa
from keras_soaa import SOAA

SHAPES = [(30, 40), (40,), (), (7, 3, 2)]
SCALES = [1.0, 10.0, 1e-3, 0.1]




def train(optimizer, steps, non_finite_at=None):
    variables = [
        keras.Variable(np.random.default_rng(i).normal(size=s), dtype="float32")
        for i, s in enumerate(SHAPES)
    ]
    for step in range(steps):
        rng = np.random.default_rng(100 + step)
        grads = [(c * rng.normal(size=s)).astype("float32")
                 for s, c in zip(SHAPES, SCALES)]
        if step == non_finite_at:
            grads[1][3] = np.nan
            grads[3][:] = np.inf
        optimizer.apply([ops.convert_to_tensor(g) for g in grads], variables)
        if step % 2:
            optimizer.observe_loss(1.0 / (step + 1))
        else:  # the same-batch controller's pair (the others ignore it)
            optimizer.observe_step(1.0, 1.0 - 0.3 * step)
    return variables


@pytest.mark.parametrize("controller", [
    "paper", "hypergradient", "gradient_ratio", SignController(learning_rate=0.2),
    keras_soaa.controllers.SameBatchController(min_radius=0.5, max_radius=2.0)])
@pytest.mark.parametrize("non_finite_at", [None, 4])
@pytest.mark.parametrize("weight_decay", [None, 0.05])
def test_backend_path_matches_portable_path(weight_decay, non_finite_at,
                                            controller):
    if isinstance(controller, str) and controller != "paper":
        controller = type(keras_soaa.controllers.get(controller))(learning_rate=0.2)
    kwargs = dict(learning_rate=0.01, total_steps=10, weight_decay=weight_decay,
                  controller=controller)
    fast, plain = SOAA(**kwargs), SOAA(fused=False, **kwargs)
    assert_same_training(fast, plain, non_finite_at)


def assert_same_training(fast, plain, non_finite_at=None):
    """`train` gives `fast` the weights and state it gives `plain`."""
    fast_vars = train(fast, 12, non_finite_at)
    plain_vars = train(plain, 12, non_finite_at)
    # Same maths in another op order: float32 rounding, relative to the
    # size of each array.
    for a, b in zip(fast_vars + fast.variables, plain_vars + plain.variables):
        a, b = to_numpy(a), to_numpy(b)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(
        scalars_of(fast), scalars_of(plain), rtol=1e-5, atol=1e-9
    )


torch_only = pytest.mark.skipif(keras.backend.backend() != "torch",
                                reason="`fused=True` compiles only on torch")


@torch_only
@pytest.mark.parametrize("kwargs", [
    dict(controller="paper", weight_decay=0.05, non_finite_at=4),
    dict(controller=keras_soaa.controllers.SameBatchController(
        min_radius=0.5, max_radius=2.0), weight_decay=None, non_finite_at=None),
])
def test_compiled_torch_step_matches_portable_path(kwargs):
    """`fused=True`: the multi-tensor step under `torch.compile` (its own
    kernels, fused by Inductor), non-finite gradients and decay included."""
    kwargs = dict(kwargs, learning_rate=0.01, total_steps=10)  # not the param's
    non_finite_at = kwargs.pop("non_finite_at")
    assert_same_training(SOAA(fused=True, **kwargs), SOAA(fused=False, **kwargs),
                         non_finite_at)


@torch_only
def test_compiled_torch_step_compiles_once_per_optimizer():
    """Later steps reuse the first step's compiled graph (no recompiles), and
    a second optimizer compiles its own (a code object of its own: it does
    not use up the first's `recompile_limit`)."""
    from torch._dynamo.utils import counters

    for _ in range(2):
        before = counters["stats"]["unique_graphs"]
        train(SOAA(fused=True, total_steps=10), 6)
        assert counters["stats"]["unique_graphs"] - before == 1


@torch_only
def test_compiled_torch_step_inside_torch_compile_is_the_outer_graph():
    """Under `torch.compile` of the train step (`jit_compile=True`), `fused=True`
    steps as `fused=None` does, in the same number of graphs: the outer
    compilation covers the step."""
    from torch._dynamo.utils import counters

    results, graphs = [], []
    for fused in (None, True):
        variables = [keras.Variable(np.linspace(-1.0, 1.0, 6).reshape(2, 3))]
        optimizer = SOAA(learning_rate=0.1, total_steps=10, fused=fused)
        apply = compiled_apply(optimizer, variables)
        before = counters["stats"]["unique_graphs"]
        for step in range(4):
            apply([np.full((2, 3), 0.5 - step, "float32")])
        graphs.append(counters["stats"]["unique_graphs"] - before)
        results.append([to_numpy(v) for v in variables + optimizer.variables])
    assert graphs[0] == graphs[1]
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


@torch_only
def test_compiled_torch_step_without_a_compiler_warns_and_runs_uncompiled():
    """Where Inductor finds no C++ compiler, `fused=True` warns once and
    trains as `fused=None` does."""
    import torch
    from torch._inductor import config

    torch.compiler.reset()
    compiled = SOAA(fused=True, total_steps=10)
    with (config.patch({"cpp.cxx": ("/nonexistent/c++",)}),
          pytest.warns(UserWarning, match="could not compile") as record):
        compiled_vars = train(compiled, 4)
    assert sum("could not compile" in str(w.message) for w in record) == 1
    eager = SOAA(total_steps=10)
    for a, b in zip(compiled_vars + compiled.variables,
                    train(eager, 4) + eager.variables):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))


@pytest.mark.parametrize("fused", [
    None, pytest.param(True, marks=pytest.mark.skipif(
        keras.backend.backend() != "torch", reason="as `None` but on torch"))])
def test_backend_path_matches_portable_path_for_mixed_dtypes(fused):
    """float16 and bfloat16 variables (float32 moments), an empty variable
    and a huge gradient whose plain sums overflow (the scaled branch)."""
    def make():
        return [
            keras.Variable(np.linspace(-1, 1, 12).reshape(3, 4), dtype="float16"),
            keras.Variable(np.linspace(-2, 2, 6), dtype="bfloat16"),
            keras.Variable(np.zeros((0, 3)), dtype="float32"),
            keras.Variable(np.linspace(-3, 3, 8), dtype="float32"),
        ]

    # beta_2 = 0.5: v = g**2 / 2 ~ 5e37 at the huge step, summed: inf.
    kwargs = dict(total_steps=8, beta_2=0.5)
    fast, plain = SOAA(fused=fused, **kwargs), SOAA(fused=False, **kwargs)
    fast_vars, plain_vars = make(), make()
    for step in range(6):
        rng = np.random.default_rng(step)
        grads = [rng.normal(size=v.shape).astype("float32") for v in fast_vars]
        if step == 2:
            grads[3][:] = 1e19  # g**2 = 1e38 fits, the sum of v overflows
        for optimizer, variables in ((fast, fast_vars), (plain, plain_vars)):
            optimizer.apply(
                [ops.cast(g, v.dtype) for g, v in zip(grads, variables)],
                variables,
            )
            optimizer.observe_loss(1.0 / (step + 1))
    # The huge step was taken, not skipped: v holds it.
    assert float(np.max(to_numpy(fast._velocities[3]))) > 1e30
    for a, b in zip(fast_vars + fast.variables, plain_vars + plain.variables):
        assert a.dtype == b.dtype
        a, b = to_numpy(a), to_numpy(b)
        scale = max(float(np.max(np.abs(b), initial=0.0)), 1e-30)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(
        scalars_of(fast), scalars_of(plain), rtol=1e-5, atol=1e-9
    )


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="raw tf.Variable and tf.IndexedSlices are TensorFlow's")
def test_raw_tf_variables_and_sparse_gradients_on_the_fast_path():
    """As Keras' `test_mixed_with_tf_variables` and `optimizer_sparse_test`:
    raw `tf.Variable`s (no `.path`) train, and `IndexedSlices` (tensor or
    tuple indices) give the dense gradient's result, eager fast path and
    portable path alike."""
    import tensorflow as tf

    for fused in (None, False):
        results = []
        for kind in ("dense", "tensor", "tuple"):
            variables = [tf.Variable([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]),
                         keras.Variable([0.5, -0.5])]
            optimizer = SOAA(learning_rate=0.1, total_steps=5, fused=fused)
            values = tf.constant([[0.1, -0.2], [0.3, 0.4]])
            for _ in range(3):
                if kind == "dense":
                    sparse = tf.constant([[0.1, -0.2], [0.0, 0.0], [0.3, 0.4]])
                else:
                    indices = tf.constant([0, 2]) if kind == "tensor" else (0, 2)
                    sparse = tf.IndexedSlices(values, indices, dense_shape=(3, 2))
                optimizer.apply([sparse, tf.constant([0.2, 0.1])], variables)
            results.append([v.numpy() for v in variables])
        for result in results[1:]:
            for a, b in zip(result, results[0]):
                np.testing.assert_array_equal(a, b)
        assert not np.array_equal(results[0][0], [[1, 2], [3, 4], [5, 6]])
