"""`TrustRegionCallback`: feeds each trained batch's loss to SOAA during `fit`."""

import keras
from keras import ops

from keras_soaa.optimizer import SOAA


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


class TrustRegionCallback(keras.callbacks.Callback):
    """Feeds the training loss of every batch to SOAA's trust-region controller.

    Keras reports in `logs["loss"]` the running mean of the epoch, not the
    loss of the batch just trained, so this callback reads the loss from the
    model's loss tracker (a batch-size weighted `Mean`) instead: the change of
    its weighted sum over the change of its weight is the loss of the batch(es)
    trained since the previous call, weighted by batch size as `fit` reports
    it. With `steps_per_execution > 1` that is their weighted mean.

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
        """Finds the SOAA optimizer and fills in its `total_steps`."""
        self._optimizer = find_soaa(self.model.optimizer)
        if self._optimizer.total_steps is None:
            epochs = self.params.get("epochs")
            steps = self.params.get("steps")
            if epochs and steps:
                accumulation = self._optimizer.gradient_accumulation_steps or 1
                self._optimizer.total_steps = max(
                    1, (epochs * steps) // accumulation
                )
        self._reset_tracker_reading()
        self._pending_total = 0.0
        self._pending_count = 0.0
        self._observed_iterations = self._iterations()

    def on_epoch_begin(self, epoch, logs=None):
        """Follows `fit`'s reset of the loss tracker."""
        # `fit` resets its metrics, the loss tracker included, at each epoch.
        self._reset_tracker_reading()

    def on_train_batch_end(self, batch, logs=None):
        """Observes the loss of the batch(es) trained since the last step."""
        self._sync_backend_state()
        tracker = self.model._loss_tracker
        total = float(ops.convert_to_numpy(tracker.total))
        count = float(ops.convert_to_numpy(tracker.count))
        self._pending_total += total - self._seen_total
        self._pending_count += count - self._seen_count
        self._seen_total, self._seen_count = total, count

        iterations = self._iterations()
        if iterations != self._observed_iterations and self._pending_count > 0:
            self._optimizer.observe_loss(
                self._pending_total / self._pending_count
            )
            self._pending_total = self._pending_count = 0.0
            self._observed_iterations = iterations
        if logs is not None:
            logs["radius"] = self._radius()

    def on_epoch_end(self, epoch, logs=None):
        """Adds the radius to the epoch's logs."""
        if logs is not None:
            logs["radius"] = self._radius()

    def _reset_tracker_reading(self):
        self._seen_total = 0.0
        self._seen_count = 0.0

    def _iterations(self) -> int:
        return int(ops.convert_to_numpy(self._optimizer.iterations))

    def _radius(self) -> float:
        return float(ops.convert_to_numpy(self._optimizer.radius))

    def _sync_backend_state(self):
        # During a JAX `fit` the live state is held outside the variables;
        # syncing makes the tracker readable and keeps our writes to the
        # optimizer's variables (the trainer regathers the state after it).
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
