"""Compiled training traces SOAA once, not once per step.

Counted, not timed: a Python function body runs once per trace when it is
compiled (`tf.function`, `jax.jit`) or replayed (`compile.TorchTrace` on
torch), and at every call when it runs eagerly.
"""

import keras
import numpy as np
import pytest
from conftest import BACKEND

from keras_soaa import SOAA, TrustRegionCallback
from keras_soaa.controllers import PaperController


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of `SOAA.update_step` and of the controller's update."""
    counts = {"update_step": 0, "observe": 0}
    update_step, observe = SOAA.update_step, PaperController.update

    def counted_update_step(self, *args, **kwargs):
        counts["update_step"] += 1
        return update_step(self, *args, **kwargs)

    def counted_observe(self, *args, **kwargs):
        counts["observe"] += 1
        return observe(self, *args, **kwargs)

    monkeypatch.setattr(SOAA, "update_step", counted_update_step)
    monkeypatch.setattr(PaperController, "update", counted_observe)
    return counts


def fit(model, epochs):
    x = np.linspace(-1, 1, 48, dtype="float32").reshape(16, 3)
    y = x.sum(axis=1, keepdims=True)
    model.fit(x, y, batch_size=4, epochs=epochs, verbose=0,
              callbacks=[TrustRegionCallback()])


def test_fit_does_not_retrace_per_step(calls):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2),
                              keras.layers.Dense(1)])
    model.compile(optimizer=SOAA(total_steps=40), loss="mse")
    fit(model, epochs=1)  # 4 steps: traced
    after_first_fit = dict(calls)
    fit(model, epochs=3)  # 12 more steps
    if BACKEND == "torch":
        # The fused path updates every variable, `update_step` never runs;
        # the hand-over is traced at the first batch and replayed.
        assert calls["update_step"] == 0
        assert calls == after_first_fit == {"update_step": 0, "observe": 1}
    else:
        assert after_first_fit["update_step"] >= 4  # one per variable
        assert after_first_fit["observe"] >= 1
        assert calls == after_first_fit


def test_observe_loss_compiles_once_per_configuration(calls):
    variable = keras.Variable([1.0, 2.0])
    optimizer = SOAA(total_steps=10)
    for step in range(6):
        optimizer.apply([keras.ops.convert_to_tensor([0.1, -0.2])], [variable])
        optimizer.observe_loss(1.0 / (step + 1))
    assert calls["observe"] == 1
    optimizer.total_steps = 20  # a new schedule: compiled again
    optimizer.observe_loss(0.5)
    assert calls["observe"] == 2
    assert float(keras.ops.convert_to_numpy(optimizer.loss_count)) == 7



def test_eager_apply_compiles_once_on_tensorflow(calls):
    """Eager TF runs the update as one XLA function, traced at the first
    step; JAX runs `update_step` eagerly per variable and step; torch takes
    its fused path."""
    variables = [keras.Variable(np.ones((3, 2))), keras.Variable(np.ones(2))]
    optimizer = SOAA(total_steps=10)
    for _ in range(5):
        optimizer.apply([keras.ops.ones((3, 2)), keras.ops.ones(2)], variables)
    expected = {"tensorflow": 2, "jax": 2 * 5, "torch": 0}[BACKEND]
    assert calls["update_step"] == expected
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 5


@pytest.mark.skipif(BACKEND != "torch", reason="torch's replayed functions")
def test_torch_trace_replays_per_input_shapes():
    import torch

    from keras_soaa.compile import TorchTrace

    runs = []

    def compute(pair, x):
        runs.append(tuple(x.shape))
        total = keras.ops.add(pair[0], keras.ops.multiply(pair[1], x))
        return keras.ops.where(keras.ops.isfinite(total), total, 0.0), x

    replayed = TorchTrace(compute)
    one, two = torch.tensor(1.0), torch.tensor(2.0)
    for x in ([1.0, 2.0], [3.0, float("nan")], [5.0, 6.0, 7.0], [0.5, 0.5]):
        x = torch.tensor(x)
        total, same = replayed((one, two), x)
        expected = torch.nan_to_num(1.0 + 2.0 * x, nan=0.0)
        torch.testing.assert_close(total, expected)
        assert same.shape == x.shape
    assert runs == [(2,), (3,)]  # traced once per shape, values replayed


@pytest.mark.parametrize("controller", ["paper", "hypergradient", "gradient_ratio"])
def test_compiled_step_has_no_control_flow(controller):
    """No data-dependent branch in the step (docs/algorithm.md, "Overflow
    guard"): XLA cannot fuse across one, and eager JAX would trace it anew
    at every call. Counted in the traced program: JAX's jaxpr, TF's graph."""
    if BACKEND == "torch":
        pytest.skip("torch runs the step eagerly (no traced program)")
    variables = [keras.Variable(np.ones((4, 3), "float32")),
                 keras.Variable(np.ones((3,), "float32"))]
    optimizer = SOAA(total_steps=10, controller=controller)
    optimizer.build(variables)
    grads = [keras.ops.ones((4, 3)), keras.ops.ones((3,))]
    if BACKEND == "jax":
        import jax

        program = str(jax.make_jaxpr(optimizer.stateless_apply)(
            [v.value for v in optimizer.variables], grads,
            [v.value for v in variables]))
        branches = [p for p in ("cond", "while", "switch") if f" {p}[" in program]
    else:
        import tensorflow as tf

        graph = tf.function(lambda g: optimizer.apply(g, variables)
                            ).get_concrete_function(grads).graph
        branches = [op.type for op in graph.get_operations()
                    if op.type in ("If", "StatelessIf", "While", "StatelessWhile",
                                   "Case", "StatelessCase")]
    assert branches == []
