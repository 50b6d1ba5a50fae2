"""`TrustRegionCallback` during `model.fit`: the losses it feeds and its logs."""

import keras
import numpy as np
import pytest
from conftest import BACKEND, to_numpy
from fed_losses import FedLossRecorder

import keras_soaa
from keras_soaa import SOAA, TrustRegionCallback

# 50 samples in batches of 16: 16, 16, 16 and an uneven last batch of 2.
NUM_SAMPLES, BATCH_SIZE, EPOCHS = 50, 16, 3
BATCH_SLICES = [slice(i, min(i + BATCH_SIZE, NUM_SAMPLES))
                for i in range(0, NUM_SAMPLES, BATCH_SIZE)]


def make_data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_SAMPLES, 3)).astype("float32")
    y = (x @ np.array([[1.0], [-2.0], [0.5]]) + 0.3).astype("float32")
    y[-2:] += 5.0  # the small last batch has a very different loss
    return x, y


def make_model(optimizer, **compile_kwargs):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizer, loss="mse", **compile_kwargs)
    return model


def numpy_mse(model, x, y):
    kernel, bias = (to_numpy(w) for w in model.weights)
    return float(np.mean((x @ kernel + bias - y) ** 2))


def assert_state_fed(optimizer, losses):
    """The controller's loss average is the EMA of exactly `losses`: checks
    what reached the optimizer's state, not only what the callback reports."""
    average = 0.0
    for loss in losses:
        average = optimizer.beta_1 * average + (1 - optimizer.beta_1) * loss
    assert int(to_numpy(optimizer.loss_count)) == len(losses)
    np.testing.assert_allclose(
        float(to_numpy(optimizer.loss_average)), average, rtol=1e-5
    )


def execution_means(model, x, y, steps_per_execution):
    """The losses `fit` should feed when the weights stay as they are: per
    execution of `steps_per_execution` batches, their batch-size weighted
    mean, for `EPOCHS` epochs."""
    batch_losses = [numpy_mse(model, x[s], y[s]) for s in BATCH_SLICES]
    sizes = [s.stop - s.start for s in BATCH_SLICES]
    return [
        np.average(batch_losses[i:i + steps_per_execution],
                   weights=sizes[i:i + steps_per_execution])
        for _ in range(EPOCHS)
        for i in range(0, len(BATCH_SLICES), steps_per_execution)
    ]


class BatchLossTruth(keras.callbacks.Callback):
    """Records the loss of each batch at the weights it is trained from."""

    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.losses = x, y, []

    def on_train_batch_begin(self, batch, logs=None):
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()
        s = BATCH_SLICES[batch]
        self.losses.append(numpy_mse(self.model, self.x[s], self.y[s]))


def test_feeds_exact_batch_losses():
    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer)
    recorder = FedLossRecorder()
    truth = BatchLossTruth(x, y)
    history = model.fit(
        x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False, verbose=0,
        callbacks=[recorder, truth],
    )
    assert len(recorder.fed) == EPOCHS * len(BATCH_SLICES) == len(truth.losses)
    np.testing.assert_allclose(recorder.fed, truth.losses, rtol=2e-6)
    # What Keras logs (the epoch's running mean) is far from it.
    assert not np.allclose(history.history["loss"][-1], truth.losses[-1])
    assert optimizer.total_steps == EPOCHS * len(BATCH_SLICES)
    assert_state_fed(optimizer, truth.losses)


@pytest.mark.parametrize(
    "steps_per_execution",
    # torch's `fit` runs one step per call (Keras refuses more).
    [1, 2, 3] if BACKEND != "torch" else [1],
)
def test_feeds_weighted_mean_with_steps_per_execution(steps_per_execution):
    x, y = make_data()
    # A negligible learning rate keeps the weights: each batch loss is known.
    optimizer = SOAA(learning_rate=1e-30)
    model = make_model(optimizer, steps_per_execution=steps_per_execution)
    expected = execution_means(model, x, y, steps_per_execution)
    recorder = FedLossRecorder()
    model.fit(
        x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False, verbose=0,
        callbacks=[recorder],
    )
    np.testing.assert_allclose(recorder.fed, expected, rtol=2e-6)
    assert_state_fed(optimizer, expected)


@pytest.mark.parametrize(
    "steps_per_execution", [1, 2] if BACKEND != "torch" else [1]
)
def test_feeds_exact_losses_when_keras_may_run_batch_ends_async(
    steps_per_execution,
):
    """The plain callback (no subclass reading its reports) lets Keras run
    batch ends on another thread (JAX): in the train step (one step per
    execution) or after the batch, before the next one starts (two), the
    controller gets exactly the batch losses."""
    x, y = make_data()
    optimizer = SOAA(learning_rate=1e-30)  # keeps the weights: losses known
    model = make_model(optimizer, steps_per_execution=steps_per_execution)
    expected = execution_means(model, x, y, steps_per_execution)
    callback = TrustRegionCallback()
    callbacks = keras.callbacks.CallbackList([callback], model=model)
    assert callbacks._async_train == (BACKEND == "jax")
    assert not keras.callbacks.CallbackList(
        [FedLossRecorder()], model=model)._async_train
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False,
              verbose=0, callbacks=[callback])
    assert_state_fed(optimizer, expected)


@pytest.mark.parametrize(
    "steps_per_execution", [1, 2, 3] if BACKEND != "torch" else [1]
)
def test_feeds_exact_losses_on_epochs_of_unknown_length(steps_per_execution):
    """A dataset of unknown length ends each epoch in a batch that finds no
    data: no loss is lost, none is fed twice (whichever thread Keras runs
    the batch ends on)."""
    import tensorflow as tf

    x, y = make_data()
    optimizer = SOAA(learning_rate=1e-30, total_steps=100)
    model = make_model(optimizer, steps_per_execution=steps_per_execution)
    expected = execution_means(model, x, y, steps_per_execution)
    dataset = (tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH_SIZE)
               .filter(lambda *_: True))  # its length: unknown
    assert dataset.cardinality() == tf.data.UNKNOWN_CARDINALITY
    history = model.fit(dataset, epochs=EPOCHS, verbose=0,
                        callbacks=[TrustRegionCallback()])
    assert_state_fed(optimizer, expected)
    assert history.history["radius"][-1] == float(to_numpy(optimizer.radius))


def test_validation_losses_are_not_fed():
    """`fit`'s validation runs through the same loss tracker: none of its
    losses reaches the controller (each epoch starts from cleared sums)."""
    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer)
    recorder, truth = FedLossRecorder(), BatchLossTruth(x, y)
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False,
              verbose=0, validation_data=(x * 3.0, y - 7.0),
              callbacks=[recorder, truth])
    np.testing.assert_allclose(recorder.fed, truth.losses, rtol=2e-6)
    assert_state_fed(optimizer, truth.losses)


def test_radius_in_history_and_csv_logs(tmp_path):
    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer)
    csv_path = tmp_path / "log.csv"
    history = model.fit(
        x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, verbose=0,
        callbacks=[
            TrustRegionCallback(),
            keras.callbacks.CSVLogger(str(csv_path)),
        ],
    )
    radii = history.history["radius"]
    assert len(radii) == EPOCHS
    assert radii[-1] == pytest.approx(float(to_numpy(optimizer.radius)))
    header, *rows = csv_path.read_text().splitlines()
    assert "radius" in header.split(",")
    assert len(rows) == EPOCHS


def test_keeps_explicit_total_steps():
    x, y = make_data()
    optimizer = SOAA(total_steps=1000)
    model = make_model(optimizer)
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0,
              callbacks=[TrustRegionCallback()])
    assert optimizer.total_steps == 1000


def test_unwraps_loss_scale_optimizer():
    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(keras.optimizers.LossScaleOptimizer(optimizer))
    recorder = FedLossRecorder()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0,
              callbacks=[recorder])
    assert len(recorder.fed) == len(BATCH_SLICES)
    assert optimizer.total_steps == len(BATCH_SLICES)
    assert float(to_numpy(optimizer.loss_count)) == len(BATCH_SLICES)


def test_training_reduces_loss():
    x, y = make_data()
    model = make_model(SOAA(learning_rate=0.1))
    history = model.fit(
        x, y, batch_size=BATCH_SIZE, epochs=20, verbose=0,
        callbacks=[TrustRegionCallback()],
    )
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    assert all(np.isfinite(history.history["radius"]))


@pytest.mark.parametrize("accumulation_steps", [2, 3])
def test_feeds_mean_of_accumulated_batches(accumulation_steps):
    """With gradient accumulation, one loss per applied step: the weighted
    mean of the batches accumulated into it (across epoch boundaries too)."""
    x, y = make_data()
    optimizer = SOAA(
        learning_rate=1e-30, gradient_accumulation_steps=accumulation_steps
    )
    model = make_model(optimizer)
    batch_losses = [numpy_mse(model, x[s], y[s]) for s in BATCH_SLICES] * EPOCHS
    sizes = [s.stop - s.start for s in BATCH_SLICES] * EPOCHS
    expected = [
        np.average(batch_losses[i:i + accumulation_steps],
                   weights=sizes[i:i + accumulation_steps])
        for i in range(0, len(sizes) - accumulation_steps + 1,
                       accumulation_steps)
    ]
    recorder = FedLossRecorder()
    model.fit(
        x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False, verbose=0,
        callbacks=[recorder],
    )
    np.testing.assert_allclose(recorder.fed, expected, rtol=2e-6)
    assert_state_fed(optimizer, expected)
    assert optimizer.total_steps == EPOCHS * len(BATCH_SLICES) // accumulation_steps


def test_exact_late_losses_in_a_long_epoch():
    """A loss falling by 1e8 within one epoch of 300 batches: the late, tiny
    batch losses are read exactly (an epoch-long float32 running total would
    have lost them entirely)."""
    # x = 0: the prediction is the bias, exactly, so only the loss is rounded.
    x = np.zeros((300, 3), "float32")
    optimizer = SOAA(learning_rate=1e-30)  # keeps the weights: losses known
    model = make_model(optimizer)
    offsets = np.logspace(2, -2, 300)[:, None]  # error per sample: 100 .. 0.01
    y = (to_numpy(model.weights[1]) + offsets).astype("float32")
    expected = [numpy_mse(model, x[i:i + 1], y[i:i + 1]) for i in range(300)]
    recorder = FedLossRecorder()
    model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0,
              callbacks=[recorder])
    np.testing.assert_allclose(recorder.fed, expected, rtol=1e-6)


def test_model_metrics_keep_one_loss_tracker():
    x, y = make_data()
    model = make_model(SOAA(learning_rate=0.05), metrics=["mae"])
    before = model.evaluate(x, y, verbose=0)
    for _ in range(2):  # a second fit reuses the callback's tracker
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0,
                  callbacks=[TrustRegionCallback()])
    assert [m.name for m in model.metrics].count("loss") == 1
    after = model.evaluate(x, y, verbose=0)
    assert len(after) == len(before) == 2
    assert after[0] < before[0]


@pytest.mark.parametrize("setup", ["plain", "loss_scale", "accumulation"])
def test_host_transfers_per_batch(monkeypatch, setup):
    """The loss and the controller step stay on the device. Where the
    hand-over runs inside the compiled train step (TF, JAX; also with a
    `LossScaleOptimizer` or gradient accumulation) the callback reads
    nothing per batch (the radius goes into the logs on the device) and one
    small array per epoch; elsewhere (torch) one per batch."""
    from keras_soaa import callback

    class CountingOps:
        transfers = 0

        def __getattr__(self, name):
            return getattr(keras.ops, name)

        def convert_to_numpy(self, x):
            CountingOps.transfers += 1
            return keras.ops.convert_to_numpy(x)

    x, y = make_data()
    accumulation = 2 if setup == "accumulation" else None
    optimizer = SOAA(learning_rate=0.05, gradient_accumulation_steps=accumulation)
    model = make_model(
        keras.optimizers.LossScaleOptimizer(optimizer)
        if setup == "loss_scale" else optimizer
    )
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0,
              callbacks=[TrustRegionCallback()])  # builds and traces
    monkeypatch.setattr(callback, "ops", CountingOps())
    history = model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, verbose=0,
                        callbacks=[TrustRegionCallback()])
    per_epoch = 1 if BACKEND != "torch" else len(BATCH_SLICES)
    assert CountingOps.transfers == EPOCHS * per_epoch
    steps = (EPOCHS + 1) * len(BATCH_SLICES) // (accumulation or 1)
    assert float(to_numpy(optimizer.loss_count)) == steps
    assert history.history["radius"][-1] == float(to_numpy(optimizer.radius))


class SyncsEveryBatch(keras.callbacks.Callback):
    """Reads the model at every batch end: on JAX, `self.model` syncs the
    whole training state into the variables (the next step regathers it)."""

    def on_train_batch_end(self, batch, logs=None):
        self.model.optimizer.iterations  # noqa: B018 (the access syncs)


@pytest.mark.parametrize("syncing_first", [True, False])
def test_exact_losses_next_to_a_callback_that_syncs(syncing_first):
    """Another callback syncing the state before or after this one's
    hand-over changes nothing (on JAX, either path feeds the next step)."""
    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer)
    recorder, truth = FedLossRecorder(), BatchLossTruth(x, y)
    callbacks = [SyncsEveryBatch(), recorder, truth]
    if not syncing_first:
        callbacks = callbacks[1:] + callbacks[:1]
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=2, shuffle=False, verbose=0,
              callbacks=callbacks)
    np.testing.assert_allclose(recorder.fed, truth.losses, rtol=2e-6)
    assert_state_fed(optimizer, truth.losses)


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's training state")
def test_jax_hand_over_needs_no_state_sync_per_batch():
    """On JAX the hand-over runs inside the train step, on its state: `fit`
    syncs the variables only at the end of each epoch, as without the
    callback; afterwards the model has its own train function back."""
    from keras_soaa._keras_internals import HookedTrainFunction

    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer)
    syncs = []
    # Keras 3.16 names it `state_sync` (`jax_state_sync` an alias); 3.15
    # has only `jax_state_sync`.
    name = "state_sync" if hasattr(model, "state_sync") else "jax_state_sync"
    sync = getattr(model, name)

    def counting_sync():
        syncs.append(not model._jax_state_synced)  # True: a real sync
        sync()

    setattr(model, name, counting_sync)
    recorder = FedLossRecorder()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=EPOCHS, shuffle=False,
              verbose=0, callbacks=[recorder])
    assert sum(syncs) == EPOCHS
    assert len(recorder.fed) == EPOCHS * len(BATCH_SLICES)
    assert not isinstance(model.train_function, HookedTrainFunction)
    # Without the callback, no loss is handed over.
    count = float(to_numpy(optimizer.loss_count))
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0)
    model.train_on_batch(x[:BATCH_SIZE], y[:BATCH_SIZE])
    assert float(to_numpy(optimizer.loss_count)) == count


def test_fit_that_raises_leaves_no_hand_over_behind():
    """A `fit` stopped by an exception leaves no hand-over running (on JAX:
    no train function wrapper) in later `fit`s without the callback."""
    from keras_soaa._keras_internals import HookedTrainFunction

    class Fails(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:
                raise RuntimeError("stop")

    x, y = make_data()
    optimizer = SOAA(learning_rate=0.05)
    model = make_model(optimizer)
    with pytest.raises(RuntimeError, match="stop"):
        model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0,
                  callbacks=[TrustRegionCallback(), Fails()])
    count = float(to_numpy(optimizer.loss_count))
    assert count == 2
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0)
    assert float(to_numpy(optimizer.loss_count)) == count
    recorder = FedLossRecorder()
    model.fit(x, y, batch_size=BATCH_SIZE, epochs=1, verbose=0,
              callbacks=[recorder])
    assert len(recorder.fed) == len(BATCH_SLICES)
    assert not isinstance(model.train_function, HookedTrainFunction)


def test_fit_past_total_steps_with_a_rate_decayed_to_zero_warns_once():
    """`presets.recommended(..., total_steps=4)` in a `fit` of 12 steps: the
    rate is 0 from step 4 on; the callback says so and names the fix."""
    x = np.ones((16, 2), "float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_soaa.presets.recommended(0.01, total_steps=4),
                  loss="mse")
    with pytest.warns(UserWarning, match="total_steps=12") as caught:
        model.fit(x, x[:, :1], batch_size=4, epochs=3, verbose=0,
                  callbacks=[TrustRegionCallback()])
    assert len([w for w in caught if "reaches 0" in str(w.message)]) == 1


def test_fit_within_total_steps_does_not_warn():
    import warnings

    x = np.ones((16, 2), "float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras_soaa.presets.recommended(0.01, total_steps=12),
                  loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model.fit(x, x[:, :1], batch_size=4, epochs=3, verbose=0,
                  callbacks=[TrustRegionCallback()])


NNX_SCRIPT = """
import numpy as np, keras, keras_soaa
assert keras.config.is_nnx_enabled()
x = np.random.default_rng(0).normal(size=(256, 8)).astype("float32")
model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                          keras.layers.Dense(1)])
model.compile(optimizer=keras_soaa.presets.paper_cosine(3e-3, total_steps=32),
              loss="mse")
history = model.fit(x, 2 * x[:, :1], batch_size=32, epochs=4, verbose=0,
                    callbacks=[keras_soaa.TrustRegionCallback()])
assert float(keras.ops.convert_to_numpy(model.optimizer.loss_count)) == 32
assert len(set(history.history["radius"])) > 1
assert history.history["loss"][-1] < history.history["loss"][0]
"""


@pytest.mark.skipif(BACKEND != "jax", reason="Flax NNX runs on JAX")
def test_fit_under_flax_nnx_feeds_every_batch_loss():
    """With `KERAS_NNX_ENABLED` Keras compiles the class's train step: the
    loss is handed over after each batch instead (a fresh process: NNX is
    chosen when Keras is imported)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("flax")
    env = dict(os.environ, KERAS_BACKEND="jax", KERAS_NNX_ENABLED="true")
    result = subprocess.run([sys.executable, "-c", NNX_SCRIPT], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
