"""`TrustRegionCallback`: feeds each trained batch's loss to SOAA during `fit`."""

import keras
from keras import ops
from keras.src.utils.tracking import DotNotTrackScope

from keras_soaa.optimizer import SCALAR_STATE_NAMES, SOAA


def find_soaa(optimizer) -> SOAA:
    """Returns the `SOAA` inside `optimizer`, unwrapping e.g. loss scaling.

    Raises:
        ValueError: if there is no `SOAA` optimizer in `optimizer`.
    """
    found = optimizer
    while not isinstance(found, SOAA) and hasattr(found, "inner_optimizer"):
        found = found.inner_optimizer
    if not isinstance(found, SOAA):
        raise ValueError(
            "`TrustRegionCallback` only works with the `keras_soaa.SOAA` "
            "optimizer (also when wrapped, e.g. in `LossScaleOptimizer`). The "
            f"model was compiled with {type(optimizer).__name__}: compile it "
            "with `optimizer=keras_soaa.SOAA(...)` or drop the callback."
        )
    return found


class BatchLossMean(keras.metrics.Mean):
    """`fit`'s loss tracker that also keeps the loss it has not handed out.

    A `keras.metrics.Mean` (what `fit` reports as `loss`: the epoch's running
    mean, weighted by batch size) plus `unread_total` and `unread_count`, the
    weighted loss sum and weight added since `TrustRegionCallback` last read
    and cleared them. The callback reads the batch loss from these, not from
    the epoch's running total: in float32 that total loses the low digits of
    a late, small batch loss (off by 14% after 400 batches of a falling
    loss).
    """

    def __init__(self, name="loss", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.unread_total = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, name="unread_total"
        )
        self.unread_count = self.add_variable(
            shape=(), initializer="zeros", dtype=self.dtype, name="unread_count"
        )
        self._read_and_clear = None

    def update_state(self, values, sample_weight=None):
        """Adds `values` (weighted) to the mean and to the unread sums."""
        values = ops.cast(values, self.dtype)
        weights = ops.ones_like(values)
        if sample_weight is not None:
            weights = weights * ops.cast(sample_weight, self.dtype)
        self.unread_total.assign_add(ops.sum(values * weights))
        self.unread_count.assign_add(ops.sum(weights))
        super().update_state(values, sample_weight=sample_weight)

    def read_unread(self):
        """Returns the unread `(total, count)` as floats and clears them."""
        if self._read_and_clear is None:
            self._read_and_clear = self._read_and_clear_unread
            if keras.backend.backend() == "tensorflow":
                import tensorflow as tf

                # One graph call instead of six eager ops.
                self._read_and_clear = tf.function(
                    self._read_and_clear_unread, autograph=False
                )
        total, count = ops.convert_to_numpy(self._read_and_clear())
        return float(total), float(count)

    def _read_and_clear_unread(self):
        # Stacked: one device-to-host transfer for both.
        unread = ops.stack([ops.add(self.unread_total, 0.0),
                            ops.add(self.unread_count, 0.0)])
        self.unread_total.assign(0.0)
        self.unread_count.assign(0.0)
        return unread


def _use_batch_loss_tracker(model) -> BatchLossMean:
    """Gives `model` a `BatchLossMean` loss tracker (once); returns it."""
    tracker = model._loss_tracker
    if isinstance(tracker, BatchLossMean):
        return tracker
    strategy = getattr(model, "distribute_strategy", None)  # TF only
    if strategy is not None:
        with strategy.scope():
            tracker = BatchLossMean(name=tracker.name)
    else:
        tracker = BatchLossMean(name=tracker.name)
    # As `compile` sets it: untracked, or `model.metrics` would list it twice.
    with DotNotTrackScope():
        model._loss_tracker = tracker
    # The train function may have been traced with the old tracker.
    model.make_train_function(force=True)
    return tracker


class TrustRegionCallback(keras.callbacks.Callback):
    """Feeds the training loss of every batch to SOAA's trust-region controller.

    Keras reports in `logs["loss"]` the running mean of the epoch, not the
    loss of the batch just trained. So at the start of training this callback
    gives the model a loss tracker that also keeps the loss not yet read
    (`BatchLossMean`: the same running mean for the logs, plus the weighted
    sum and weight since the last read), and after each batch it reads the
    loss of the batch(es) trained since its previous call, weighted by batch
    size as `fit` reports it. With `steps_per_execution > 1` that is their
    weighted mean.

    A loss is observed once the optimizer has taken a step since the previous
    observation. Batches that moved no weights (a step skipped by
    `LossScaleOptimizer` for non-finite gradients, or the first batches of
    `gradient_accumulation_steps`) were trained at the same weights as the
    next applied step, so their losses join that step's weighted mean instead
    of being judged against a prediction no step made.

    It also:
    - sets the optimizer's `total_steps` from `fit`'s epochs and steps per
      epoch when it is `None` (`initial_epoch` included, so a resumed run
      keeps the schedule of the whole run);
    - adds `radius` to the batch and epoch logs, so that `History`,
      `CSVLogger` and `TensorBoard` record it (list this callback before
      the ones that should see it).

    Example:
    ```python
    model.compile(optimizer=keras_soaa.SOAA(), loss="mse")
    model.fit(x, y, epochs=5, callbacks=[keras_soaa.TrustRegionCallback()])
    ```
    """

    def on_train_begin(self, logs=None):
        """Finds the SOAA optimizer and fills in its `total_steps`.

        Raises:
            ValueError: if the optimizer is not SOAA, if `total_steps` is
                `None` and `fit` does not know its number of steps, or (JAX)
                if SOAA was built on other variables than the model trains.
        """
        self._optimizer = find_soaa(self.model.optimizer)
        built_on = getattr(self._optimizer, "_trainable_variables", [])
        trained = self.model.trainable_variables
        if (
            keras.backend.backend() == "jax"
            and self._optimizer.built
            and (len(built_on) != len(trained)
                 or any(a is not b for a, b in zip(built_on, trained)))
        ):
            # Keras' JAX trainer maps the values by position; its failure at
            # the first step would leave the model's variables purged.
            raise ValueError(
                f"SOAA was built for {len(built_on)} trainable variables, but "
                f"the model now trains {len(trained)} others (a layer was "
                "frozen or unfrozen after the optimizer was built). On JAX, "
                "compile with a new optimizer, e.g. "
                "`keras_soaa.SOAA.from_config(optimizer.get_config())`."
            )
        if self._optimizer.total_steps is None:
            epochs = self.params.get("epochs")
            steps = self.params.get("steps")
            if epochs and steps:
                accumulation = self._optimizer.gradient_accumulation_steps or 1
                self._optimizer.total_steps = max(
                    1, (epochs * steps) // accumulation
                )
        if self._optimizer.total_steps is None:
            # Refuse before the first step rather than at the first loss.
            raise ValueError(
                "`TrustRegionCallback` cannot set SOAA's `total_steps`: `fit` "
                "does not know the number of steps per epoch (e.g. a "
                "generator or a dataset of unknown length). Pass "
                "`SOAA(total_steps=...)` (the number of optimizer steps of "
                "the run) or `fit(..., steps_per_epoch=...)`."
            )
        self._optimizer._attach_loss_observer()
        self._tracker = _use_batch_loss_tracker(self.model)
        self._pending_total = 0.0
        self._pending_count = 0.0
        self._observed_iterations = self._iterations()
        self._observed_state = None

    def on_train_batch_end(self, batch, logs=None):
        """Observes the loss of the batch(es) trained since the last step."""
        self._sync_backend_state()
        total, count = self._tracker.read_unread()
        self._pending_total += total
        self._pending_count += count

        iterations = self._iterations()
        if iterations != self._observed_iterations and self._pending_count > 0:
            self._optimizer.observe_loss(
                self._pending_total / self._pending_count
            )
            self._pending_total = self._pending_count = 0.0
            self._observed_iterations = iterations
            if keras.backend.backend() == "jax":
                self._observed_state = self._scalar_values()
        if logs is not None:
            logs["radius"] = self._radius()

    def on_epoch_end(self, epoch, logs=None):
        """Adds the radius to the epoch's logs."""
        # Keras 3.15's JAX `fit` ends an epoch of unknown length by attaching
        # the state it held before the last batch's callbacks, which undoes
        # that batch's observation: write it again (no step came since).
        if (
            self._observed_state is not None
            and self._iterations() == self._observed_iterations
        ):
            for name, value in self._observed_state.items():
                getattr(self._optimizer, name).assign(value)
        if logs is not None:
            logs["radius"] = self._radius()

    def _iterations(self) -> int:
        return int(ops.convert_to_numpy(self._optimizer.iterations))

    def _scalar_values(self):
        # Device copies, not host reads: the trainer donates (deletes) the
        # state's own arrays at its next step.
        return {name: ops.copy(getattr(self._optimizer, name).value)
                for name in SCALAR_STATE_NAMES}

    def _radius(self) -> float:
        return float(ops.convert_to_numpy(self._optimizer.radius))

    def _sync_backend_state(self):
        # During a JAX `fit` the live state is held outside the variables;
        # syncing makes the tracker readable and keeps our writes to the
        # optimizer's variables (the trainer regathers the state after it).
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
