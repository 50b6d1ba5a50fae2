"""Keras' generic optimizer tests, with SOAA as the optimizer under test.

Adapted from keras-team/keras v3.15.1 `keras/src/optimizers/optimizer_test.py`
(Apache License 2.0, Copyright The Keras team). Changes:

- The optimizer under test (Keras' `Adam` or `SGD`) is `keras_soaa.SOAA`
  (same `learning_rate`; `weight_decay`, clipping, EMA, loss scaling and
  gradient accumulation arguments as given).
- Where a behaviour test checked its result with SGD's arithmetic
  (`v - learning_rate * g`), the expected values come from a plain `SOAA` of
  the same hyperparameters stepped on the same gradients (`reference_values`),
  the way Keras' `adam_test.test_ema_overwrite_frequency` checks Adam's EMA.
- Tests parameterized over Keras' optimizers run on `SOAA` only;
  `test_get_method` and `test_optimizer_auto_naming` check SOAA's registered
  name and its auto names (Keras' own lines kept).
- The `requires_trainable_backend` marker (Keras' conftest) is removed: every
  backend here trains; SOAA's "no loss is fed" warning is filtered (these
  tests feed no loss).
"""

import os
import pickle

import numpy as np
import pytest
from keras.src import backend, constraints, layers, models, optimizers, testing

from keras_soaa import SOAA

pytestmark = pytest.mark.filterwarnings(
    "ignore:SOAA optimizer .* no loss is fed:UserWarning")


def reference_values(initial, grads_sequence, **kwargs):
    """The values of a variable after each step of a plain `SOAA(**kwargs)`."""
    variable = backend.Variable(initial)
    optimizer = SOAA(**kwargs)
    values = []
    for grads in grads_sequence:
        optimizer.apply_gradients([(backend.convert_to_tensor(grads), variable)])
        values.append(backend.convert_to_numpy(variable))
    # The oracle must move the variable, else the checks below are vacuous.
    assert not np.allclose(values[0], initial)
    return values


class OptimizerTest(testing.TestCase):
    def test_iterations_counter(self):
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        optimizer = SOAA(learning_rate=1.0)
        self.assertAllClose(optimizer.iterations, 0)
        optimizer.apply_gradients([(grads, v)])
        self.assertAllClose(optimizer.iterations, 1)
        optimizer.apply_gradients([(grads, v)])
        self.assertAllClose(optimizer.iterations, 2)

    def test_empty_gradients(self):
        # Test no valid gradient
        v = backend.Variable([[3.0, 4.0], [5.0, 6.0]])
        grads = None
        optimizer = SOAA(learning_rate=1.0)
        with self.assertRaisesRegex(
            ValueError, "No gradients provided for any variable."
        ):
            optimizer.apply_gradients([(grads, v)])

        # Test filtering of empty gradients
        v2 = backend.Variable([[3.0, 4.0], [5.0, 6.0]])
        grads2 = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        optimizer = SOAA(learning_rate=1.0)
        with self.assertWarns(Warning):
            optimizer.apply_gradients([(grads, v), (grads2, v2)])
        self.assertAllClose(v, [[3.0, 4.0], [5.0, 6.0]])
        (expected,) = reference_values(
            [[3.0, 4.0], [5.0, 6.0]], [grads2], learning_rate=1.0)
        self.assertAllClose(v2, expected)

    def test_clip_args(self):
        optimizer = SOAA(learning_rate=1.0, clipnorm=0.1)
        self.assertEqual(optimizer.clipnorm, 0.1)
        optimizer = SOAA(learning_rate=1.0, clipvalue=0.1)
        self.assertEqual(optimizer.clipvalue, 0.1)
        optimizer = SOAA(learning_rate=1.0, global_clipnorm=0.1)
        self.assertEqual(optimizer.global_clipnorm, 0.1)

        # Test invalid arguments
        with self.assertRaisesRegex(
            ValueError,
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can",
        ):
            SOAA(
                learning_rate=1.0,
                clipnorm=0.1,
                clipvalue=0.1,
            )
        with self.assertRaisesRegex(
            ValueError,
            "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can",
        ):
            SOAA(
                learning_rate=1.0,
                clipnorm=0.1,
                global_clipnorm=0.1,
            )

    def test_clip_norm(self):
        optimizer = SOAA(clipnorm=1)
        grad = backend.convert_to_tensor([100.0, 100.0])
        clipped_grad = optimizer._clip_gradients([grad])
        self.assertAllClose(clipped_grad[0], [2**0.5 / 2, 2**0.5 / 2])

    def test_clip_value(self):
        optimizer = SOAA(clipvalue=1)
        grad = backend.convert_to_tensor([100.0, 100.0])
        clipped_grad = optimizer._clip_gradients([grad])
        self.assertAllClose(clipped_grad[0], [1.0, 1.0])

    def test_global_clip_norm(self):
        optimizer = SOAA(global_clipnorm=1)
        grad = np.array([50.0, 100.0], dtype="float32")
        global_norm = np.linalg.norm(grad)
        clipped_grad = optimizer._clip_gradients(
            [backend.convert_to_tensor(grad)]
        )
        self.assertAllClose(clipped_grad[0], grad / global_norm)

    def test_ema(self):
        v = backend.Variable([[3.0, 4.0], [5.0, 6.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        optimizer = SOAA(
            learning_rate=1.0,
            use_ema=True,
            ema_momentum=0.9,
            ema_overwrite_frequency=3,
        )
        v1, v2, v3 = reference_values(
            [[3.0, 4.0], [5.0, 6.0]], [grads] * 3, learning_rate=1.0)
        optimizer.apply_gradients([(grads, v)])
        self.assertAllClose(v, v1)
        self.assertAllClose(
            optimizer._model_variables_moving_average[0],
            v1,  # initialized after first step
        )
        optimizer.apply_gradients([(grads, v)])
        self.assertAllClose(v, v2)
        ema = 0.9 * v1 + 0.1 * v2
        self.assertAllClose(optimizer._model_variables_moving_average[0], ema)
        optimizer.apply_gradients([(grads, v)])
        # Variables were overwritten with EMA
        ema = 0.9 * ema + 0.1 * v3
        self.assertAllClose(v, ema)
        self.assertAllClose(optimizer._model_variables_moving_average[0], ema)

    def test_ema_with_model_fit(self):
        x_train = np.ones((1, 1)).astype("float32")
        y_train = np.zeros((1, 1)).astype("float32")
        optimizer = SOAA(
            learning_rate=0.1, use_ema=True, ema_momentum=0.9
        )
        model = models.Sequential(
            [layers.Dense(2, kernel_initializer="ones", use_bias=False)]
        )
        model.compile(loss="mse", optimizer=optimizer, run_eagerly=True)
        model.fit(x_train, y_train, batch_size=1, epochs=2)
        # The MSE's gradient for the kernel `w` is `w` (x = 1, y = 0).
        w = np.ones((1, 2), "float32")
        reference = backend.Variable(w)
        plain = SOAA(learning_rate=0.1)
        w1 = None
        for _ in range(2):
            plain.apply_gradients(
                [(backend.convert_to_tensor(reference.numpy()), reference)])
            w1 = reference.numpy() if w1 is None else w1
        expected = 0.9 * w1 + 0.1 * reference.numpy()
        self.assertAllClose(
            optimizer._model_variables_moving_average[0].numpy(),
            expected,
            atol=1e-5,
        )
        self.assertAllClose(
            model.trainable_variables[0].numpy(),
            expected,
            atol=1e-5,
        )

    def test_constraints_are_applied(self):
        v = backend.Variable(np.random.random((2, 2)) - 1.0)
        v.constraint = constraints.NonNeg()
        optimizer = SOAA(learning_rate=0.0001)
        grad = backend.numpy.zeros((2, 2))
        optimizer.apply_gradients([(grad, v)])
        self.assertAlmostEqual(np.min(v), 0.0)

    def test_get_method(self):
        obj = optimizers.get("keras_soaa>SOAA")
        self.assertIsInstance(obj, SOAA)
        obj = optimizers.get(optimizers.serialize(SOAA(learning_rate=0.5)))
        self.assertIsInstance(obj, SOAA)
        self.assertAllClose(obj.learning_rate, 0.5)
        obj = optimizers.get("sgd")
        self.assertIsInstance(obj, optimizers.SGD)
        obj = optimizers.get("adamw")
        self.assertIsInstance(obj, optimizers.AdamW)

        obj = optimizers.get(None)
        self.assertEqual(obj, None)

        with self.assertRaises(ValueError):
            optimizers.get("typo")

    def test_static_loss_scaling(self):
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 2.0], [3.0, 4.0]]) * 1024.0
        optimizer = SOAA(learning_rate=1.0, loss_scale_factor=1024.0)
        optimizer.apply_gradients([(grads, v)])
        self.assertEqual(optimizer.scale_loss(1.0), 1024.0)
        (expected,) = reference_values(
            [[1.0, 2.0], [3.0, 4.0]], [[[1.0, 2.0], [3.0, 4.0]]],
            learning_rate=1.0)
        self.assertAllClose(v, expected)

    def test_set_weights(self):
        x = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        optimizer_1 = SOAA()
        grads = backend.convert_to_tensor([[1.0, 2.0], [3.0, 4.0]])
        optimizer_1.apply_gradients(zip([grads], [x]))
        optimizer_2 = SOAA()
        with self.assertRaisesRegex(ValueError, "You are calling*"):
            optimizer_2.set_weights(optimizer_1.variables)
        optimizer_2.build([x])
        optimizer_2.set_weights(optimizer_1.variables)
        for i in range(len(optimizer_1.variables)):
            self.assertAllClose(
                optimizer_1.variables[i],
                optimizer_2.variables[i],
            )

    def test_gradient_accumulation(self):
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        optimizer = SOAA(
            learning_rate=1.0, gradient_accumulation_steps=3
        )
        self.assertEqual(optimizer.gradient_accumulation_steps, 3)
        (stepped,) = reference_values(
            [[1.0, 2.0], [3.0, 4.0]], [grads], learning_rate=1.0)

        # Iteration 1
        optimizer.apply_gradients([(grads, v)])
        self.assertAllClose(v, [[1.0, 2.0], [3.0, 4.0]])
        self.assertAllClose(
            optimizer._accumulated_gradients[0], [[1.0, 1.0], [1.0, 1.0]]
        )
        self.assertAllClose(optimizer._iterations, 1)
        self.assertAllClose(optimizer.iterations, 0)

        # Iteration 2
        optimizer.apply_gradients([(grads, v)])
        self.assertAllClose(v, [[1.0, 2.0], [3.0, 4.0]])
        self.assertAllClose(
            optimizer._accumulated_gradients[0], [[2.0, 2.0], [2.0, 2.0]]
        )
        self.assertAllClose(optimizer._iterations, 2)
        self.assertAllClose(optimizer.iterations, 0)

        # Iteration 3
        optimizer.apply_gradients([(grads, v)])
        self.assertAllClose(v, stepped)
        self.assertAllClose(
            optimizer._accumulated_gradients[0], [[0.0, 0.0], [0.0, 0.0]]
        )
        self.assertAllClose(optimizer._iterations, 3)
        self.assertAllClose(optimizer.iterations, 1)

        # Iteration 4
        optimizer.apply_gradients([(grads, v)])
        self.assertAllClose(v, stepped)
        self.assertAllClose(
            optimizer._accumulated_gradients[0], [[1.0, 1.0], [1.0, 1.0]]
        )
        self.assertAllClose(optimizer._iterations, 4)
        self.assertAllClose(optimizer.iterations, 1)

    @pytest.mark.skipif(backend.backend() != "tensorflow", reason="Requires TF")
    def test_tf_checkpointing(self):
        import tensorflow as tf

        model = models.Sequential([layers.Dense(2)])
        # A rate of 0.01 (Keras' test: Adam at 0.001): SOAA's first steps
        # can be shorter than Adam's (its Fisher term), and the test needs the
        # second step to move the predictions by more than 1e-3.
        optimizer = SOAA(learning_rate=0.01)
        rng = np.random.default_rng(0)
        x, y = rng.random((1, 2)), rng.random((1, 2))
        model.compile(optimizer, "mse")
        model.train_on_batch(x, y)
        ref_pred = model.predict(x)

        # Both model and optimizer are Trackables
        checkpoint = tf.train.Checkpoint(model, optimizer=optimizer)
        temp_filepath = os.path.join(self.get_temp_dir(), "tf_ckpt")
        save_path = checkpoint.save(temp_filepath)

        # Keep training the model (predictions now differ)
        model.train_on_batch(x, y)
        pred = model.predict(x)
        self.assertNotAllClose(pred, ref_pred, atol=1e-3)

        # Restore the model and check prediction correctness
        checkpoint.restore(save_path)
        pred = model.predict(x)
        self.assertAllClose(pred, ref_pred, atol=1e-5)

    def test_callable_learning_rate(self):
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        optimizer = SOAA(learning_rate=lambda: 0.1)
        self.assertAllClose(optimizer.iterations, 0)
        optimizer.apply_gradients([(grads, v)])
        (expected,) = reference_values(
            [[1.0, 2.0], [3.0, 4.0]], [grads], learning_rate=0.1)
        self.assertAllClose(v, expected)
        self.assertAllClose(optimizer.iterations, 1)

    def test_overwrite_with_gradient(self):
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        v.overwrite_with_gradient = True
        v2 = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        grads2 = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])

        optimizer = SOAA(learning_rate=1.0)
        optimizer.apply_gradients([(grads, v), (grads2, v2)])

        # `v` is overwritten by its gradient but `v2` is updated normally
        self.assertAllClose(v, [[1.0, 1.0], [1.0, 1.0]])
        (expected,) = reference_values(
            [[1.0, 2.0], [3.0, 4.0]], [grads2], learning_rate=1.0)
        self.assertAllClose(v2, expected)

    def test_overwrite_with_gradient_with_gradient_accumulation(self):
        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        v.overwrite_with_gradient = True
        v2 = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grad_ones = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        grad_twos = backend.convert_to_tensor([[2.0, 2.0], [2.0, 2.0]])
        optimizer = SOAA(
            learning_rate=1.0, gradient_accumulation_steps=2
        )
        (stepped,) = reference_values(
            [[1.0, 2.0], [3.0, 4.0]], [[[1.5, 1.5], [1.5, 1.5]]],
            learning_rate=1.0)

        # Iteration 1
        optimizer.apply_gradients([(grad_ones, v), (grad_ones, v2)])
        self.assertAllClose(optimizer._iterations, 1)
        self.assertAllClose(optimizer.iterations, 0)
        self.assertAllClose(v, [[1.0, 2.0], [3.0, 4.0]])
        self.assertAllClose(v2, [[1.0, 2.0], [3.0, 4.0]])
        self.assertAllClose(
            optimizer._accumulated_gradients[0], [[1.0, 1.0], [1.0, 1.0]]
        )
        self.assertAllClose(
            optimizer._accumulated_gradients[1], [[1.0, 1.0], [1.0, 1.0]]
        )

        # Iteration 2
        optimizer.apply_gradients([(grad_twos, v), (grad_twos, v2)])
        self.assertAllClose(optimizer._iterations, 2)
        self.assertAllClose(optimizer.iterations, 1)
        self.assertAllClose(v, [[2.0, 2.0], [2.0, 2.0]])
        self.assertAllClose(v2, stepped)
        self.assertAllClose(
            optimizer._accumulated_gradients[0], [[0.0, 0.0], [0.0, 0.0]]
        )
        self.assertAllClose(
            optimizer._accumulated_gradients[1], [[0.0, 0.0], [0.0, 0.0]]
        )

        # Iteration 3
        optimizer.apply_gradients([(grad_ones, v), (grad_ones, v2)])
        self.assertAllClose(optimizer._iterations, 3)
        self.assertAllClose(optimizer.iterations, 1)
        self.assertAllClose(v, [[2.0, 2.0], [2.0, 2.0]])
        self.assertAllClose(v2, stepped)
        self.assertAllClose(
            optimizer._accumulated_gradients[0], [[1.0, 1.0], [1.0, 1.0]]
        )
        self.assertAllClose(
            optimizer._accumulated_gradients[1], [[1.0, 1.0], [1.0, 1.0]]
        )

    def test_gradient_accumulation_with_weigth_decay(self):
        optimizer1 = SOAA(weight_decay=0.05)
        optimizer3 = SOAA(weight_decay=0.05, gradient_accumulation_steps=3)
        variable1 = backend.Variable([[0.9], [0.5]])
        variable3 = backend.Variable([[0.9], [0.5]])

        for _epoch in range(8):
            grads3 = np.random.random([3, 2, 1]).astype("float32")

            grads1 = backend.convert_to_tensor(grads3.mean(axis=0))
            optimizer1.apply_gradients([(grads1, variable1)])

            for batch in range(3):
                grads3_ = backend.convert_to_tensor(grads3[batch])
                optimizer3.apply_gradients([(grads3_, variable3)])

        self.assertAllClose(variable1, variable3)

    def test_setting_lr_to_callable_untracks_lr_var(self):
        soaa = SOAA(learning_rate=0.001)
        self.assertLen(soaa.variables, 2)
        soaa.learning_rate = optimizers.schedules.PolynomialDecay(
            soaa.learning_rate, 4
        )
        self.assertLen(soaa.variables, 1)

    def test_pickleable_optimizers(self):
        optimizer = SOAA()
        reloaded = pickle.loads(pickle.dumps(optimizer))

        self.assertEqual(optimizer.get_config(), reloaded.get_config())

    @pytest.mark.skipif(
        backend.backend() != "tensorflow",
        reason="The tf.Variable test can only run with TensorFlow backend.",
    )
    def test_mixed_with_tf_variables(self):
        import tensorflow as tf

        v = backend.Variable([[1.0, 2.0], [3.0, 4.0]])
        grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        tf_v = tf.Variable([[1.0, 2.0], [3.0, 4.0]])
        tf_grads = backend.convert_to_tensor([[1.0, 1.0], [1.0, 1.0]])
        optimizer = SOAA(learning_rate=1.0)
        optimizer.apply_gradients([(grads, v), (tf_grads, tf_v)])
        self.assertAllClose(optimizer.iterations, 1)

        # Test with no grads
        with self.assertWarnsRegex(
            UserWarning, "Gradients do not exist for variables"
        ):
            optimizer.apply_gradients([(grads, v), (None, tf_v)])
            self.assertAllClose(optimizer.iterations, 2)

    def test_optimizer_auto_naming(self):
        soaa_1 = SOAA()
        soaa_2 = SOAA()
        sgd_1 = optimizers.SGD()
        sgd_2 = optimizers.SGD()
        adamw_1 = optimizers.AdamW()
        adamw_2 = optimizers.AdamW()

        self.assertEqual(soaa_1.name, "soaa")
        self.assertEqual(soaa_2.name, "soaa_1")
        self.assertEqual(sgd_1.name, "sgd")
        self.assertEqual(sgd_2.name, "sgd_1")
        self.assertEqual(adamw_1.name, "adam_w")
        self.assertEqual(adamw_2.name, "adam_w_1")

        # Test explicit naming
        custom_soaa = SOAA(name="my_soaa")
        self.assertEqual(custom_soaa.name, "my_soaa")

        # Test serialization and deserialization preserves name
        config_soaa_2 = optimizers.serialize(soaa_2)
        reloaded_soaa_2 = optimizers.deserialize(config_soaa_2)
        self.assertEqual(reloaded_soaa_2.name, "soaa_1")

        config_custom = optimizers.serialize(custom_soaa)
        reloaded_custom = optimizers.deserialize(config_custom)
        self.assertEqual(reloaded_custom.name, "my_soaa")
