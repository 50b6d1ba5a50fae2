"""Trains one small model with SOAA under a distribution setup; saves the result.

    python tests/distributed_worker.py SETUP OUTPUT.npz

Run in a fresh process by tests/test_distributed.py, because devices must be
configured before TensorFlow or JAX starts. SETUP is one of:

- `single`: one device, the baseline (backend from KERAS_BACKEND);
- `tf_mirrored`: TF `MirroredStrategy` over 2 logical CPU devices;
- `tf_single_loop`: one device, TF custom training loop (the baseline of
  `tf_multi_worker`);
- `tf_multi_worker`: one worker of a TF `MultiWorkerMirroredStrategy`
  (`TF_CONFIG` set by the caller), in a custom training loop (Keras 3's `fit`
  fails under this strategy: keras-team/keras#20585); each worker trains on
  its half of every global batch;
- `jax_data_parallel`: `keras.distribution.DataParallel` over 2 host devices;
- `jax_model_parallel`: `keras.distribution.ModelParallel` sharding the first
  Dense kernel over 2 host devices.

Every setup trains on the same global batches in the same order.
"""

import os
import sys

SETUP, OUTPUT = sys.argv[1], sys.argv[2]
NUM_DEVICES = 2

if SETUP.startswith("jax"):
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    )
elif SETUP.startswith("tf"):
    os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_soaa import SOAA, TrustRegionCallback, controllers  # noqa: E402

GLOBAL_BATCH, NUM_SAMPLES, EPOCHS = 16, 64, 3


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_SAMPLES, 6)).astype("float32")
    y = np.tanh(x @ rng.normal(size=(6, 3))).astype("float32")
    return x, y


def make_model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(3, name="output"),
        ]
    )
    controller = os.environ.get("SOAA_CONTROLLER", "paper")
    if controller != "paper":
        controller = type(controllers.get(controller))(learning_rate=0.2)
    model.compile(
        optimizer=SOAA(learning_rate=0.05, controller=controller),
        loss="mse",
    )
    return model


class RadiusTrace(keras.callbacks.Callback):
    """Records the radius after every batch (from TrustRegionCallback's logs)."""

    def __init__(self):
        super().__init__()
        self.radii = []

    def on_train_batch_end(self, batch, logs=None):
        self.radii.append(logs["radius"])


def tf_dataset(x, y):
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


def train_tf_custom_loop(strategy, model, data):
    """SOAA in a `strategy.run` loop; returns the radius after every step."""
    import tensorflow as tf

    x, y = data
    optimizer = model.optimizer
    optimizer.total_steps = EPOCHS * NUM_SAMPLES // GLOBAL_BATCH

    def dataset_fn(context):
        # Element i of every global batch goes to input pipeline i % count,
        # so the workers' batches together are the single-device batch.
        per_replica_batch = context.get_per_replica_batch_size(GLOBAL_BATCH)
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
        dataset = dataset.shard(
            context.num_input_pipelines, context.input_pipeline_id
        )
        return dataset.batch(per_replica_batch)

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            per_example = tf.reduce_mean(tf.square(model(xb) - yb), axis=-1)
            loss = tf.nn.compute_average_loss(
                per_example, global_batch_size=GLOBAL_BATCH
            )
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    @tf.function
    def train_step(iterator):
        losses = strategy.run(replica_step, args=next(iterator))
        loss = strategy.reduce(tf.distribute.ReduceOp.SUM, losses, axis=None)
        optimizer.observe_loss(loss)

    with strategy.scope():
        optimizer.build(model.trainable_variables)
    radii = []
    for _ in range(EPOCHS):
        iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
        for _ in range(NUM_SAMPLES // GLOBAL_BATCH):
            train_step(iterator)
            radii.append(float(optimizer.radius.numpy()))
    return radii


def train(model, data, trace):
    x, y = data
    callbacks = [TrustRegionCallback(), trace]
    if isinstance(x, np.ndarray):
        return model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=EPOCHS,
                         shuffle=False, verbose=0, callbacks=callbacks)
    return model.fit(x, epochs=EPOCHS, verbose=0, callbacks=callbacks)


def main():
    x, y = make_data()
    data = (x, y)
    if SETUP == "tf_mirrored":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_DEVICES
        )
        strategy = tf.distribute.MirroredStrategy(
            [f"/cpu:{i}" for i in range(NUM_DEVICES)]
        )
        with strategy.scope():
            model = make_model()
        data = (tf_dataset(x, y), None)
    elif SETUP in ("tf_multi_worker", "tf_single_loop"):
        import tensorflow as tf

        strategy = (
            tf.distribute.MultiWorkerMirroredStrategy()
            if SETUP == "tf_multi_worker"
            else tf.distribute.get_strategy()
        )
        with strategy.scope():
            model = make_model()
        save(model, train_tf_custom_loop(strategy, model, data))
        return
    elif SETUP == "jax_data_parallel":
        devices = keras.distribution.list_devices()
        assert len(devices) == NUM_DEVICES, devices
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices)
        )
        model = make_model()
    elif SETUP == "jax_model_parallel":
        devices = keras.distribution.list_devices()
        mesh = keras.distribution.DeviceMesh(
            (NUM_DEVICES,), axis_names=["model"], devices=devices
        )
        layout_map = keras.distribution.LayoutMap(mesh)
        layout_map["hidden/kernel"] = (None, "model")
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(
                layout_map=layout_map, batch_dim_name=None
            )
        )
        model = make_model()
        kernel = model.get_layer("hidden").kernel.value
        assert len(kernel.sharding.device_set) == NUM_DEVICES, kernel.sharding
    elif SETUP == "single":
        model = make_model()
    else:
        raise ValueError(f"unknown setup {SETUP!r}")

    trace = RadiusTrace()
    train(model, data, trace)
    save(model, trace.radii)


def save(model, radii):
    optimizer = model.optimizer
    np.savez(
        OUTPUT,
        weights=np.concatenate(
            [keras.ops.convert_to_numpy(w).ravel() for w in model.weights]
        ),
        # The radius and every variable of the controller (the paper's: the
        # predicted reduction, loss average and count, previous prediction).
        scalars=np.array(
            [
                float(keras.ops.convert_to_numpy(variable))
                for variable in (optimizer.radius,
                                 *optimizer.controller_state().values())
            ]
        ),
        iterations=int(keras.ops.convert_to_numpy(optimizer.iterations)),
        radii=np.array(radii),
    )


if __name__ == "__main__":
    main()
