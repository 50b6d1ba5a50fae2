"""Keras' tf.distribute optimizer tests, with SOAA as the optimizer under test.

Adapted from keras-team/keras v3.15.1
`keras/src/backend/tensorflow/optimizer_distribute_test.py` (Apache License
2.0, Copyright The Keras team). TensorFlow only, like the original. Changes:

- Keras' `SGD` is `keras_soaa.SOAA` (same `learning_rate`, `weight_decay`,
  clipping, EMA and gradient accumulation arguments; SGD's `momentum` and
  `nesterov` dropped).
- Where a test checked its result with SGD's arithmetic, the expected values
  come from a plain `SOAA` stepped on one device on the gradient that the
  strategy applies (`reference_values`): the two replicas' sum, except in
  `test_ema`, whose gradient, made outside `strategy.run`, is applied once
  (Keras' expected values for SGD there step by the gradient, not twice it).
- Not applicable to SOAA, left out: `test_correctness_with_golden` asserts
  SGD's (Nesterov's) own numbers. `test_single_step`'s `tf_keras` SGD case is
  left out (it tests `tf_keras`, not the optimizer under test).
- `test_weight_decay` is unchanged: with zero gradients only the decoupled
  weight decay moves the variables, so SGD's numbers hold for SOAA too.
- SOAA's "no loss is fed" warning is filtered (these tests feed no loss).
"""

import numpy as np
import pytest
from keras.src import backend, testing

from keras_soaa import SOAA

if backend.backend() == "tensorflow":
    import tensorflow as tf
    from tensorflow.python.eager import context

pytestmark = pytest.mark.filterwarnings(
    "ignore:SOAA optimizer .* no loss is fed:UserWarning")

REPLICAS = 2


def reference_values(initial, grads_sequence, replicas=REPLICAS, **kwargs):
    """A variable's values after each step of a plain `SOAA(**kwargs)` on one
    device, given the sum of `replicas` equal gradients."""
    variable = backend.Variable(initial)
    optimizer = SOAA(**kwargs)
    values = []
    for grads in grads_sequence:
        summed = backend.convert_to_tensor(np.asarray(grads) * replicas)
        optimizer.apply_gradients([(summed, variable)])
        values.append(backend.convert_to_numpy(variable))
    # The oracle must move the variable, else the checks are vacuous.
    assert not np.allclose(values[0], initial)
    return values


@pytest.mark.skipif(
    backend.backend() != "tensorflow",
    reason="The distribute test can only run with TF backend.",
)
class OptimizerDistributeTest(testing.TestCase):
    def setUp(self):
        super().setUp()
        # Need at least 2 devices for distribution related tests.
        cpus = tf.config.list_physical_devices("CPU")
        context._reset_context()
        tf.config.set_logical_device_configuration(
            cpus[0],
            [
                tf.config.LogicalDeviceConfiguration(),
                tf.config.LogicalDeviceConfiguration(),
            ],
        )
        self.strategy = tf.distribute.MirroredStrategy(["CPU:0", "CPU:1"])

    def test_config(self):
        with self.strategy.scope():
            optimizer = SOAA(
                learning_rate=0.5,
                weight_decay=0.004,
            )
        self.run_class_serialization_test(optimizer)

    def test_single_step(self):
        with self.strategy.scope():
            optimizer = SOAA(
                learning_rate=0.5,
            )
            # use tf variable to work both in k2 & k3.
            vars = tf.Variable([1.0, 2.0, 3.0, 4.0])

            def update():
                grads = tf.constant([1.0, 6.0, 7.0, 2.0])
                optimizer.apply_gradients(zip([grads], [vars]))

            self.strategy.run(update)
        (expected,) = reference_values(
            [1.0, 2.0, 3.0, 4.0], [[1.0, 6.0, 7.0, 2.0]], learning_rate=0.5)
        self.assertAllClose(vars, expected, rtol=1e-4, atol=1e-4)

    def test_weight_decay(self):
        with self.strategy.scope():
            grads, var1, var2, var3 = (
                tf.zeros(()),
                backend.Variable(2.0),
                backend.Variable(3.0, name="exclude"),
                backend.Variable(4.0),
            )
            optimizer_1 = SOAA(learning_rate=1.0, weight_decay=0.004)
            self.strategy.run(
                lambda: optimizer_1.apply_gradients(zip([grads], [var1]))
            )

            optimizer_2 = SOAA(learning_rate=1.0, weight_decay=0.004)

            def opt2_run():
                optimizer_2.exclude_from_weight_decay(var_names=["exclude"])
                optimizer_2.apply_gradients(zip([grads, grads], [var1, var2]))

            self.strategy.run(opt2_run)

            optimizer_3 = SOAA(learning_rate=1.0, weight_decay=0.004)

            def opt3_run():
                optimizer_3.exclude_from_weight_decay(var_list=[var3])
                optimizer_3.apply_gradients(zip([grads, grads], [var1, var3]))

            self.strategy.run(opt3_run)

        self.assertAlmostEqual(var1.numpy(), 1.9760959)
        self.assertAlmostEqual(var2.numpy(), 3.0)
        self.assertAlmostEqual(var3.numpy(), 4.0)

    def test_clip_norm(self):
        with self.strategy.scope():
            optimizer = SOAA(clipnorm=1)
            grad = [np.array([100.0, 100.0])]
            clipped_grad = optimizer._clip_gradients(grad)
            self.assertAllClose(clipped_grad[0], [2**0.5 / 2, 2**0.5 / 2])

    def test_clip_value(self):
        with self.strategy.scope():
            optimizer = SOAA(clipvalue=1)
            grad = [np.array([100.0, 100.0])]
            clipped_grad = optimizer._clip_gradients(grad)
            self.assertAllClose(clipped_grad[0], [1.0, 1.0])

    def test_stateless_not_supported(self):
        optimizer = SOAA(learning_rate=0.5)
        grads = [np.array([1.0, 6.0, 7.0, 2.0])]
        vars = [backend.Variable([1.0, 2.0, 3.0, 4.0])]
        optimizer.build(vars)
        with self.assertRaisesRegex(ValueError, "not supported"):
            optimizer.stateless_apply(optimizer.variables, grads, vars)

    def test_ema(self):
        # A gradient made outside `strategy.run` is not summed over the
        # replicas (Keras' SGD values here step by 1 * g).
        v1, v2, v3 = reference_values(
            [[3.0, 4.0], [5.0, 6.0]], [[[1.0, 1.0], [1.0, 1.0]]] * 3,
            replicas=1, learning_rate=1.0)
        with self.strategy.scope():
            v = backend.Variable([[3.0, 4.0], [5.0, 6.0]])
            grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
            optimizer = SOAA(
                learning_rate=1.0,
                use_ema=True,
                ema_momentum=0.9,
                ema_overwrite_frequency=3,
            )
            self.strategy.run(lambda: optimizer.apply_gradients([(grads, v)]))
            self.assertAllClose(v, v1)
            self.assertAllClose(
                optimizer._model_variables_moving_average[0],
                v1,  # initialized after first step
            )
            self.strategy.run(lambda: optimizer.apply_gradients([(grads, v)]))
            self.assertAllClose(v, v2)
            ema = 0.9 * v1 + 0.1 * v2
            self.assertAllClose(optimizer._model_variables_moving_average[0], ema)
            self.strategy.run(lambda: optimizer.apply_gradients([(grads, v)]))
            # Variables were overwritten with EMA
            ema = 0.9 * ema + 0.1 * v3
            self.assertAllClose(v, ema)
            self.assertAllClose(optimizer._model_variables_moving_average[0], ema)

    def test_gradient_accumulation(self):
        (stepped,) = reference_values(
            [[1.0, 2.0], [3.0, 4.0]], [[[1.0, 1.0], [2.0, 2.0]]],
            learning_rate=1.0)
        with self.strategy.scope():
            v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
            grads = backend.convert_to_tensor([[1.0, 1.0], [2.0, 2.0]])
            optimizer = SOAA(learning_rate=1.0, gradient_accumulation_steps=3)
            self.assertEqual(optimizer.gradient_accumulation_steps, 3)
            self.strategy.run(lambda: optimizer.apply_gradients([(grads, v)]))
            self.assertAllClose(v, [[1.0, 2.0], [3.0, 4.0]])
            self.assertAllClose(
                optimizer._accumulated_gradients[0], [[1.0, 1.0], [2.0, 2.0]]
            )
            self.assertAllClose(optimizer._iterations, 1)
            self.assertAllClose(optimizer.iterations, 0)
            self.strategy.run(lambda: optimizer.apply_gradients([(grads, v)]))
            self.assertAllClose(v, [[1.0, 2.0], [3.0, 4.0]])
            self.assertAllClose(
                optimizer._accumulated_gradients[0], [[2.0, 2.0], [4.0, 4.0]]
            )
            self.assertAllClose(optimizer._iterations, 2)
            self.assertAllClose(optimizer.iterations, 0)
            self.strategy.run(lambda: optimizer.apply_gradients([(grads, v)]))
            self.assertAllClose(v, stepped)
            self.assertAllClose(
                optimizer._accumulated_gradients[0], [[0.0, 0.0], [0.0, 0.0]]
            )
            self.assertAllClose(optimizer._iterations, 3)
            self.assertAllClose(optimizer.iterations, 1)
