"""`TrustRegionCallback`: feeds each trained batch's loss to SOAA during `fit`."""

import contextlib
import functools

import keras
from keras import ops
from keras.src.utils.tracking import DotNotTrackScope

from keras_soaa import trust_region
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
        # The `TrustRegionCallback` hand-over that reads and clears them.
        self.hand_over = None

    def update_state(self, values, sample_weight=None):
        """Adds `values` (weighted) to the mean and to the unread sums."""
        values = ops.cast(values, self.dtype)
        weights = ops.ones_like(values)
        if sample_weight is not None:
            weights = weights * ops.cast(sample_weight, self.dtype)
        self.unread_total.assign_add(ops.sum(values * weights))
        self.unread_count.assign_add(ops.sum(weights))
        super().update_state(values, sample_weight=sample_weight)


def hand_over_loss(state, iterations, observed_iterations, pending, unread,
                   *, observe):
    """One batch's hand-over of the tracked loss to the controller (pure).

    Adds the tracker's `unread` `(total, count)` to the `pending` ones. If
    the optimizer has stepped since the last observation (`iterations !=
    observed_iterations`) and some loss is pending, observes the pending
    weighted mean and clears it; otherwise keeps it for the next step.

    Returns:
        `(state, observed_iterations, pending, unread, report)`: the new
        values, with `unread` cleared, and `report` a float32 vector
        `[observed (0 or 1), loss, *state]`.
    """
    total = pending[0] + unread[0]
    count = pending[1] + unread[1]
    ready = ops.logical_and(
        ops.not_equal(iterations, observed_iterations), ops.greater(count, 0.0)
    )
    loss = ops.divide(total, ops.where(ready, count, 1.0))
    observed = observe(state, loss, iterations)
    state = type(state)(
        *(ops.where(ready, new, old) for new, old in zip(observed, state))
    )
    zero = ops.zeros_like(total)
    return (
        state,
        ops.where(ready, iterations, observed_iterations),
        (ops.where(ready, zero, total), ops.where(ready, zero, count)),
        (zero, zero),
        ops.stack([ops.cast(ready, "float32"), loss, *state]),
    )


class _LossHandOver:
    """Runs `hand_over_loss` on the device, once per batch, in one call.

    Owns the pending loss sums and the step of the last observation (three
    scalar variables, outside the optimizer's saved state) and compiles the
    hand-over where the backend compiles, so that a batch costs one call and
    one small device-to-host transfer: the report.
    """

    def __init__(self, optimizer: SOAA, tracker: BatchLossMean, strategy=None):
        self.optimizer = optimizer
        self._tracker = tracker
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            self._observed_iterations = keras.Variable(
                0, dtype=optimizer.iterations.dtype, trainable=False,
                aggregation="only_first_replica", name="observed_iterations",
            )
            self._pending = tuple(
                keras.Variable(
                    0.0, dtype=tracker.dtype, trainable=False,
                    aggregation="only_first_replica", name=name,
                )
                for name in ("pending_total", "pending_count")
            )
        self._compiled = None

    def restart(self):
        """Drops the pending loss; the next loss waits for the next step."""
        for variable in self._pending:
            variable.assign(0.0)
        # A copy: on JAX the trainer donates (deletes) the iterations' array.
        self._observed_iterations.assign(ops.add(self.optimizer.iterations, 0))

    def __call__(self):
        """Hands the unread loss over; returns the report as NumPy."""
        return ops.convert_to_numpy(self._compiled_run()())

    def _compiled_run(self):
        key = self.optimizer._controller_key()
        if self._compiled is not None and self._compiled[0] == key:
            return self._compiled[1]
        step = functools.partial(
            hand_over_loss, observe=self.optimizer._controller()
        )
        backend = keras.backend.backend()
        if backend == "jax":
            import jax

            step = jax.jit(step)

            def run():
                # Values in, values out: the variables are assigned outside.
                return self._assign(step(*self._inputs(value=True)))
        else:
            def run():
                return self._assign(step(*self._inputs(value=False)))

            if backend == "tensorflow":
                import tensorflow as tf

                run = tf.function(run, autograph=False)
        self._compiled = (key, run)
        return run

    def _inputs(self, value):
        read = (lambda v: v.value) if value else (lambda v: ops.add(v, 0))
        tracker = self._tracker
        return (
            trust_region.TrustRegionState(
                *(read(getattr(self.optimizer, name))
                  for name in SCALAR_STATE_NAMES)
            ),
            ops.convert_to_tensor(self.optimizer.iterations),
            read(self._observed_iterations),
            tuple(read(v) for v in self._pending),
            (read(tracker.unread_total), read(tracker.unread_count)),
        )

    def _assign(self, outputs):
        state, observed_iterations, pending, unread, report = outputs
        for name, value in zip(SCALAR_STATE_NAMES, state):
            getattr(self.optimizer, name).assign(value)
        self._observed_iterations.assign(observed_iterations)
        for variable, value in zip(self._pending, pending):
            variable.assign(value)
        self._tracker.unread_total.assign(unread[0])
        self._tracker.unread_count.assign(unread[1])
        return report


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
    sum and weight since the last read), and after each batch it hands the
    loss of the batch(es) trained since its previous call, weighted by batch
    size as `fit` reports it, to the controller. With `steps_per_execution >
    1` that is their weighted mean.

    The hand-over runs on the device, in one compiled call per batch (on
    torch, eagerly) that applies `SOAA.observe_loss`'s controller step to the
    tracked loss: the loss never travels to the host and back. The batch's
    only device-to-host transfer is one small report (whether a loss was
    observed, the loss, the new controller state) from which the radius is
    logged.

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
        tracker = _use_batch_loss_tracker(self.model)
        # Reused by later `fit`s (and callbacks): its compiled call too.
        self._hand_over = tracker.hand_over
        if self._hand_over is None or self._hand_over.optimizer is not self._optimizer:
            self._hand_over = tracker.hand_over = _LossHandOver(
                self._optimizer, tracker,
                getattr(self.model, "distribute_strategy", None),  # TF only
            )
        self._hand_over.restart()
        self._last_report = None

    def on_train_batch_end(self, batch, logs=None):
        """Observes the loss of the batch(es) trained since the last step."""
        self._sync_backend_state()
        report = self._hand_over()
        self._last_report = report
        if logs is not None:
            logs["radius"] = float(report[2])

    def on_epoch_end(self, epoch, logs=None):
        """Adds the radius to the epoch's logs."""
        report = self._last_report
        if (
            keras.backend.backend() == "jax"
            and report is not None
            and report[0]
        ):
            # Keras 3.15's JAX `fit` ends an epoch of unknown length by
            # attaching the state it held before the last batch's callbacks,
            # which undoes that batch's observation: write it again (no step
            # came since; normally this writes the values already there).
            for name, value in zip(SCALAR_STATE_NAMES, report[2:]):
                getattr(self._optimizer, name).assign(value)
        if logs is not None:
            radius = (
                report[2] if report is not None  # else no batch yet: read it
                else ops.convert_to_numpy(self._optimizer.radius)
            )
            logs["radius"] = float(radius)

    def _sync_backend_state(self):
        # During a JAX `fit` the live state is held outside the variables;
        # syncing makes the tracker readable and keeps our writes to the
        # optimizer's variables (the trainer regathers the state after it).
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
