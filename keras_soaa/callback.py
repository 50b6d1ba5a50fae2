"""`TrustRegionCallback`: feeds each trained batch's loss to SOAA during `fit`."""

import contextlib
import functools
import threading
import warnings
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_soaa import _keras_internals as internals
from keras_soaa.compile import (
    CompiledCache,
    assign_values,
    compile_state_update,
    read_value,
    replayed_on_torch,
)
from keras_soaa.controllers import LossPair
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
            "`TrustRegionCallback` only works with the `keras_soaa.SOAA` optimizer "
            "(also when wrapped, e.g. in `LossScaleOptimizer`). The model was "
            f"compiled with {type(optimizer).__name__}: compile it with "
            "`optimizer=keras_soaa.SOAA(...)` or drop the callback."
        )
    return found


class BatchLossMean(keras.metrics.Mean):
    """`fit`'s loss tracker that also keeps the loss it has not handed out.

    The `keras.metrics.Mean` `fit` reports as `loss`, plus `unread_total` and
    `unread_count` (weighted loss sum and weight since `TrustRegionCallback`
    last read them) and `pending_total` and `pending_count` (read but not yet
    handed over: batches that applied no step). Not the epoch's running total:
    in float32 it loses the low digits of a late, small batch loss.
    """

    def __init__(self, name="loss", dtype=None):
        super().__init__(name=name, dtype=dtype)
        for name in ("unread_total", "unread_count", "pending_total", "pending_count"):
            setattr(self, name, self.add_variable(
                shape=(), initializer="zeros", dtype=self.dtype, name=name))
        # The `TrustRegionCallback` hand-over that reads and clears them.
        self.hand_over = None

    def reset_state(self):
        """Resets all but the pending sums.

        They join the next applied step's loss across epochs, until `fit` restarts.
        """
        pending = (self.pending_total, self.pending_count)
        for variable in self.variables:
            if not any(variable is p for p in pending):
                variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def update_state(self, values, sample_weight=None):
        """Adds `values` (weighted) to the mean and to the unread sums."""
        values = ops.cast(values, self.dtype)
        weights = ops.ones_like(values)
        if sample_weight is not None:
            weights = weights * ops.cast(sample_weight, self.dtype)
        self.unread_total.assign_add(ops.sum(values * weights))
        self.unread_count.assign_add(ops.sum(weights))
        super().update_state(values, sample_weight=sample_weight)


def hand_over_loss(values, iterations, observed_iterations, pending, unread,
                   *, observe):
    """One batch's hand-over of the tracked loss to the controller (pure).

    Adds `unread` `(total, count)` to `pending`. If the optimizer has stepped
    since the last observation and some loss is pending, observes its weighted
    mean and clears it; else keeps it for the next step.

    Returns:
        `(values, observed_iterations, pending, unread, report)`: the new
        controller values `(radius, *sums, *state)`, `unread` cleared, and a
        float32 `report` `[observed (0 or 1), loss, *values]`
        (`HandOverReport.from_vector`).
    """
    total, count = pending[0] + unread[0], pending[1] + unread[1]
    ready = ops.logical_and(ops.not_equal(iterations, observed_iterations),
                            ops.greater(count, 0.0))
    loss = ops.divide(total, ops.where(ready, count, 1.0))
    observed = observe(values, loss, iterations)
    values = tuple(ops.where(ready, new, old) for new, old in zip(observed, values))
    zero = ops.zeros_like(total)
    return (
        values,
        ops.where(ready, iterations, observed_iterations),
        (ops.where(ready, zero, total), ops.where(ready, zero, count)),
        (zero, zero),
        ops.stack([ops.cast(ready, "float32"), loss, *values]),
    )


def observe_pair(values, iterations, unread, kept, loss_after, *, update):
    """One same-batch test's observation of the batch's loss pair (pure).

    `unread`: the tracker's unread `(total, count)` after the step; `kept`:
    the optimizer's count and those sums before it, whose growth is the
    batch's loss before the step. Observes `(before, loss_after)` with
    `update` if the optimizer stepped.

    Returns:
        `(values, report)`: the controller's new `(radius, *sums, *state)`
        and the float32 report `[observed (0 or 1), loss before, *values]`.
    """
    iterations_before, total, count = kept
    count = unread[1] - count
    before = (unread[0] - total) / ops.where(count > 0.0, count, 1.0)
    ready = ops.logical_and(ops.not_equal(iterations, iterations_before),
                            count > 0.0)
    new = update(values, LossPair(before, loss_after), iterations)
    values = tuple(ops.where(ready, n, o) for n, o in zip(new, values))
    return values, ops.stack([ops.cast(ready, "float32"), before, *values])


# Where the train step returns the hand-over's report (see `_LossHandOver.in_step`).
REPORT_LOG = "_keras_soaa_report"


class HandOverReport(NamedTuple):
    """What one batch's hand-over reports to the host (one transfer)."""

    observed: bool  # whether the controller observed a loss this batch
    loss: float  # the loss handed over (the pending weighted mean)
    values: tuple  # the controller's `(radius, *sums, *state)` after it

    @property
    def radius(self) -> float:
        """The radius after the hand-over."""
        return self.values[0]

    @classmethod
    def from_vector(cls, vector) -> "HandOverReport":
        """Reads the vector that `hand_over_loss` returns."""
        vector = np.asarray(vector)
        return cls(bool(vector[0]), float(vector[1]), tuple(map(float, vector[2:])))


class _LossHandOver:
    """Runs `hand_over_loss` on the device, once per batch.

    Inside the compiled train step (`train_function`, `in_step`), or after
    the batch (`__call__`): then it owns the step of the last observation (a
    variable outside the optimizer's saved state) and compiles the hand-over,
    so a batch costs one call and one small transfer, the report.
    """

    def __init__(self, optimizer: SOAA, tracker: BatchLossMean, strategy=None):
        self.optimizer = optimizer
        self._tracker = tracker
        with strategy.scope() if strategy is not None else contextlib.nullcontext():
            self._observed_iterations = keras.Variable(
                0, dtype=optimizer.iterations.dtype, trainable=False,
                aggregation="only_first_replica", name="observed_iterations",
            )
        self._compiled = CompiledCache()
        self._in_step_function = (None, None, None)

    def restart(self):
        """Drops the pending loss; the next loss waits for the next step."""
        self._tracker.pending_total.assign(0.0)
        self._tracker.pending_count.assign(0.0)
        # A copy: on JAX the trainer donates (deletes) the iterations' array.
        self._observed_iterations.assign(ops.add(self.optimizer.iterations, 0))

    def __call__(self) -> HandOverReport:
        """Hands the unread loss over; returns the batch's report."""
        observer = self.optimizer._loss_update()
        run = self._compiled.get(observer, lambda: compile_state_update(
            self._inputs, lambda *inputs: hand_over_loss(*inputs, observe=observer),
            self._assign))
        return HandOverReport.from_vector(ops.convert_to_numpy(run()))

    def in_step(self, iterations_before, observer):
        """`__call__` inside the train step, right after it (uncompiled).

        For `internals.train_function_around`: the optimizer has stepped if
        its count is no longer `iterations_before`. Returns what the step adds
        to its logs: the report vector and the new radius.
        """
        values, _, pending, unread, report = hand_over_loss(
            self.optimizer._controller_values(), read_value(self.optimizer.iterations),
            iterations_before, *self._tracked_sums(), observe=observer)
        self._assign_tracked(values, pending, unread)
        return {REPORT_LOG: report, "radius": values[0]}

    def pair_in_step(self, kept, batch_loss, update):
        """The same-batch test inside the train step (`needs_loss_pair`).

        `kept`: the optimizer's count and the tracker's unread sums before
        the step, whose growth is the batch's loss before it. Observes the
        pair if the optimizer stepped (`observe_pair`); returns what
        `in_step` returns.
        """
        tracker = self._tracker
        # On torch the step runs uncompiled: its scalar maths replayed.
        observe = self._compiled.get(("pair", update), lambda: replayed_on_torch(
            functools.partial(observe_pair, update=update)))
        values, report = observe(
            self.optimizer._controller_values(), read_value(self.optimizer.iterations),
            (read_value(tracker.unread_total), read_value(tracker.unread_count)),
            tuple(kept), ops.cast(batch_loss(), "float32"))
        self.optimizer._assign_controller_values(values)
        return {REPORT_LOG: report, "radius": values[0]}

    def train_function(self, model):
        """`model`'s train function with `in_step` after each step.

        (`pair_in_step` for a controller with `needs_loss_pair`.)

        Built once per train function and observer: later `fit`s reuse it.
        """
        own = internals.own_train_function(model)
        observer = self.optimizer._loss_update()
        if self._in_step_function[:2] == (own, observer):
            return self._in_step_function[2]
        optimizer, tracker = self.optimizer, self._tracker
        if observer.controller.needs_loss_pair:
            def before(data):
                # `iterations` is computed (gradient accumulation): read it here.
                return tuple(map(read_value, (optimizer.iterations,
                                              tracker.unread_total,
                                              tracker.unread_count)))

            def after(kept, data, batch_loss):
                return self.pair_in_step(kept, batch_loss, observer)
        else:
            def before(data):
                return read_value(optimizer.iterations)

            def after(kept, data, batch_loss):
                return self.in_step(kept, observer)
        function = internals.train_function_around(
            model, before, after, tests_step=observer.controller.needs_loss_pair)
        self._in_step_function = (own, observer, function)
        return function

    def _tracked_sums(self):
        # `(pending, unread)`, each `(total, count)`, from the tracker.
        tracker = self._tracker
        return (
            (read_value(tracker.pending_total), read_value(tracker.pending_count)),
            (read_value(tracker.unread_total), read_value(tracker.unread_count)),
        )

    def _assign_tracked(self, values, pending, unread, observed_iterations=None):
        tracker = self._tracker
        variables = [*self.optimizer._controller_variables, tracker.pending_total,
                     tracker.pending_count, tracker.unread_total, tracker.unread_count]
        values = [*values, *pending, *unread]
        if observed_iterations is not None:
            variables.append(self._observed_iterations)
            values.append(observed_iterations)
        assign_values(variables, values)

    def _inputs(self):
        return (self.optimizer._controller_values(),
                read_value(self.optimizer.iterations),
                read_value(self._observed_iterations), *self._tracked_sums())

    def _assign(self, outputs):
        values, observed_iterations, pending, unread, report = outputs
        self._assign_tracked(values, pending, unread, observed_iterations)
        return report


def _hands_over_in_step(model) -> bool:
    """Whether `fit` can run the hand-over inside its compiled train step.

    Where it runs one compiled step per execution (right after it, the
    hand-over sees what it would after the batch): JAX, also under a
    `keras.distribution`, and TensorFlow without a strategy (a replica would
    read per-replica loss sums). Not under Flax NNX, where Keras compiles the
    class's `train_step`, not the one set on the model for the hand-over.
    """
    backend = keras.backend.backend()
    if (backend not in ("tensorflow", "jax") or model.run_eagerly
            or model.steps_per_execution != 1):
        return False
    if backend == "jax":
        return not keras.config.is_nnx_enabled()
    import tensorflow as tf

    return (not tf.distribute.has_strategy()
            and model.distribute_strategy is tf.distribute.get_strategy())


def _use_batch_loss_tracker(model) -> BatchLossMean:
    """Gives `model` a `BatchLossMean` loss tracker (once); returns it."""
    tracker = internals.loss_tracker(model)
    if isinstance(tracker, BatchLossMean):
        return tracker
    strategy = getattr(model, "distribute_strategy", None)  # TF only
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        tracker = BatchLossMean(name=tracker.name)
    internals.replace_loss_tracker(model, tracker)
    return tracker


class TrustRegionCallback(keras.callbacks.Callback):
    """Feeds the training loss of every batch to SOAA's trust-region controller.

    Keras' `logs["loss"]` is the epoch's running mean, not the loss of the
    batch just trained. So this callback gives the model a loss tracker that
    also keeps the loss not yet read, and after each batch hands the loss of
    the batch(es) trained since its previous call to the controller, weighted
    by batch size as `fit` reports it (with `steps_per_execution > 1`, their
    weighted mean).

    With a controller that tests each step on its own batch
    (`needs_loss_pair`: `"same_batch"`), it instead hands over, every
    `controller.every`-th batch, the batch's loss before the step and after
    it, from one more forward pass of that batch inside the train step.

    The hand-over runs on the device: inside the compiled train step where
    `fit` runs one step per execution on JAX or on TensorFlow without a
    strategy (no call and no transfer per batch), else after the batch in one
    compiled call that returns a small report (`last_report`).

    A loss is observed once the optimizer has stepped since the previous
    observation. Batches that moved no weights (a step `LossScaleOptimizer`
    skipped, or the first batches of `gradient_accumulation_steps`) were
    trained at the weights of the next applied step, so their losses join
    that step's weighted mean instead of facing a prediction no step made.

    It also:
    - sets the optimizer's `total_steps` from `fit`'s epochs and steps per
      epoch when it is `None` (`initial_epoch` included, so a resumed run
      keeps the whole run's schedule);
    - adds `radius` to the batch and epoch logs, for `History`, `CSVLogger`
      and `TensorBoard` (list this callback before them).

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
        built_on = internals.trained_variables_of(self._optimizer)
        trained = self.model.trainable_variables
        if keras.backend.backend() == "jax" and self._optimizer.built and (
            len(built_on) != len(trained)
            or any(a is not b for a, b in zip(built_on, trained))
        ):
            # Keras' JAX trainer maps the values by position; its failure at
            # the first step would leave the model's variables purged.
            raise ValueError(
                f"SOAA was built for {len(built_on)} trainable variables, but the "
                f"model now trains {len(trained)} others (a layer was frozen or "
                "unfrozen after the optimizer was built). On JAX, compile with a "
                "new optimizer, e.g. "
                "`keras_soaa.SOAA.from_config(optimizer.get_config())`."
            )
        if self._optimizer.total_steps is None:
            epochs, steps = self.params.get("epochs"), self.params.get("steps")
            if epochs and steps:
                accumulation = self._optimizer.gradient_accumulation_steps or 1
                self._optimizer.total_steps = max(1, (epochs * steps) // accumulation)
        self._warn_if_past_total_steps()
        if (self._optimizer.total_steps is None
                and self._optimizer.controller.needs_total_steps):
            # Refuse before the first step rather than at the first loss.
            raise ValueError(
                "`TrustRegionCallback` cannot set SOAA's `total_steps`: `fit` does "
                "not know the number of steps per epoch (e.g. a generator or a "
                "dataset of unknown length). Pass `SOAA(total_steps=...)` (the "
                "number of optimizer steps of the run) or "
                "`fit(..., steps_per_epoch=...)`."
            )
        self._optimizer._loss_observer_attached = True
        tracker = _use_batch_loss_tracker(self.model)
        # Reused by later `fit`s (and callbacks): its compiled call too.
        self._hand_over = tracker.hand_over
        if self._hand_over is None or self._hand_over.optimizer is not self._optimizer:
            self._hand_over = tracker.hand_over = _LossHandOver(
                self._optimizer, tracker,
                getattr(self.model, "distribute_strategy", None),  # TF only
            )
        self._hand_over.restart()
        self._report = None  # from the last hand-over after a batch
        self._decoded = (None, None)  # an in-step report, read on the host
        model = internals.callback_model(self)
        self._in_step = self._in_step_radius = None
        controller = self._optimizer.controller
        # A same-batch test every `every`-th batch (else every batch).
        self._every, self._batches = getattr(controller, "every", 1), 0
        if controller.needs_loss_pair and not (
                keras.backend.backend() == "torch" or _hands_over_in_step(model)):
            raise ValueError(
                f"SOAA's controller {controller!r} tests each step on its own "
                "batch, which `TrustRegionCallback` does inside the train step: "
                "on torch, and on TensorFlow and JAX with `steps_per_execution=1`, "
                "`run_eagerly=False`, no `tf.distribute` strategy and no Flax NNX. "
                "Compile the model so, train in a custom loop with "
                "`optimizer.observe_step(loss_before, loss_after)`, or use a "
                "controller fed by the loss alone (`controller=\"paper\"`; "
                "`keras_soaa.presets.paper_cosine`).")
        if controller.needs_loss_pair or _hands_over_in_step(model):
            self._in_step = internals.HookedTrainFunction(
                model, self._hand_over.train_function(model), REPORT_LOG)
        # Hand-over after the batch: the batch begun last if it still owes one,
        # the batch ended last, and `fit`'s thread (see `async_safe`).
        self._owing_batch = self._ended = None
        self._fit_thread = threading.get_ident()

    def _warn_if_past_total_steps(self):
        # `fit` would train on with a rate decayed to 0 (the weights freeze).
        optimizer, epochs, steps = (self._optimizer, self.params.get("epochs"),
                                    self.params.get("steps"))
        schedule = internals.learning_rate_schedule(optimizer)
        if not (epochs and steps and optimizer.total_steps and schedule):
            return
        end = (epochs * steps) // (optimizer.gradient_accumulation_steps or 1)
        total = optimizer.total_steps
        if end > total and float(ops.convert_to_numpy(schedule(total))) == 0.0:
            warnings.warn(
                f"`fit` will run {end} optimizer steps, but SOAA's learning "
                f"rate schedule reaches 0 at total_steps={total}: the weights "
                f"stop moving for the last {end - total} steps. Pass "
                f"total_steps={end} (e.g. `keras_soaa.presets.recommended("
                f"learning_rate, total_steps={end})`).", UserWarning, stacklevel=2)

    @property
    def async_safe(self) -> bool:
        """Whether Keras may run this callback's batch ends off `fit`'s thread.

        On JAX, so that `fit` need not wait for each step: a batch end off
        `fit`'s thread leaves the hand-over, which writes the training state,
        to `fit`'s thread. Not in a subclass with its own `on_train_batch_end`,
        which may read `last_report` per batch.
        """
        return (
            keras.backend.backend() == "jax"
            and type(self).on_train_batch_end is TrustRegionCallback.on_train_batch_end
        )

    def on_train_batch_begin(self, batch, logs=None):
        """Arms the in-step hand-over, or runs the one the last batch owes."""
        if self._in_step is not None:
            self._in_step.run_hooked_next = self._batches % self._every == 0
            self._batches += 1
            return
        if self._owing_batch is not None:  # its step ran: this batch began
            self._hand_over_after_batch()
        self._owing_batch = batch

    def on_train_batch_end(self, batch, logs=None):
        """Observes the loss of the batch(es) trained since the last step.

        An in-step hand-over also put the radius in the logs: nothing to do
        (a batch between same-batch tests gets the last test's radius, which
        no step has moved since). Elsewhere the hand-over runs now, or, off
        `fit`'s thread, later on it (the logs then carry the radius as of the
        batch before).
        """
        if self._in_step is not None:
            if logs is not None and "radius" in logs:
                self._in_step_radius = logs["radius"]
            elif logs is not None and self._in_step_radius is not None:
                logs["radius"] = self._in_step_radius
            return
        self._ended = batch
        if threading.get_ident() == self._fit_thread:
            self._hand_over_after_batch()
        if logs is not None and self._report is not None:
            logs["radius"] = self._report.radius

    def _hand_over_after_batch(self):
        self._owing_batch = None
        # Not `self.model`, which on JAX syncs every variable already.
        internals.sync_trainer_state(internals.callback_model(self))
        self._report = self._hand_over()

    @property
    def last_report(self) -> HandOverReport | None:
        """What the last hand-over did (`None` before the first batch)."""
        if self._in_step is None or self._in_step.output is None:
            return self._report
        vector = self._in_step.output  # on the device: read it once
        if self._decoded[0] is not vector:
            self._decoded = (vector, HandOverReport.from_vector(
                ops.convert_to_numpy(vector)))
        return self._decoded[1]

    def on_train_end(self, logs=None):
        """Gives the model its own train function back."""
        if self._in_step is not None:
            self._report = self.last_report
            self._in_step.remove(internals.callback_model(self))
            self._in_step = None

    def on_epoch_end(self, epoch, logs=None):
        """Adds the radius to the epoch's logs."""
        # The last batch's, left to `fit`'s thread; not if it never ended (an
        # epoch of unknown length ends in a batch that finds no data). An
        # execution of several steps begins at its first and ends at its last.
        if (self._owing_batch is not None and self._ended is not None
                and self._ended >= self._owing_batch):
            self._hand_over_after_batch()
        self._owing_batch = self._ended = None
        report = self.last_report
        if keras.backend.backend() == "jax" and report is not None and report.observed:
            # Keras 3.15's JAX `fit` ends an epoch of unknown length by attaching
            # the state held before the last batch's callbacks, undoing that
            # observation: write it again (normally a no-op).
            self._optimizer._assign_controller_values(report.values)
        if logs is not None:
            logs["radius"] = report.radius if report is not None else float(
                ops.convert_to_numpy(self._optimizer.radius))  # no batch yet
