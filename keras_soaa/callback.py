"""`TrustRegionCallback`: feeds each trained batch's loss to SOAA during `fit`."""

import contextlib
from typing import NamedTuple

import keras
import numpy as np
from keras import ops

from keras_soaa import _keras_internals as internals
from keras_soaa.compile import CompiledCache, compile_state_update, read_value
from keras_soaa.optimizer import SOAA
from keras_soaa.trust_region import TrustRegionState


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
        `[observed (0 or 1), loss, *state]` (read it with
        `HandOverReport.from_vector`).
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


class HandOverReport(NamedTuple):
    """What one batch's hand-over reports to the host (one transfer)."""

    observed: bool  # whether the controller observed a loss this batch
    loss: float  # the loss handed over (the pending weighted mean)
    state: TrustRegionState  # the controller state after the hand-over

    @classmethod
    def from_vector(cls, vector) -> "HandOverReport":
        """Reads the vector that `hand_over_loss` returns."""
        vector = np.asarray(vector)
        return cls(
            bool(vector[0]), float(vector[1]),
            TrustRegionState(*(float(x) for x in vector[2:])),
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
        self._compiled = CompiledCache()

    def restart(self):
        """Drops the pending loss; the next loss waits for the next step."""
        for variable in self._pending:
            variable.assign(0.0)
        # A copy: on JAX the trainer donates (deletes) the iterations' array.
        self._observed_iterations.assign(ops.add(self.optimizer.iterations, 0))

    def __call__(self) -> HandOverReport:
        """Hands the unread loss over; returns the batch's report."""
        controller = self.optimizer.controller()
        run = self._compiled.get(
            controller,
            lambda: compile_state_update(
                self._inputs,
                lambda *inputs: hand_over_loss(*inputs, observe=controller),
                self._assign,
            ),
        )
        return HandOverReport.from_vector(ops.convert_to_numpy(run()))

    def hand_over_values(self, optimizer_values, metrics_values, positions):
        """`__call__` on a JAX `fit`'s state lists, in place (JAX only).

        Reads the controller state, the step and the unread loss from
        `optimizer_values` and `metrics_values` (see
        `internals.AfterJaxTrainStep`) at `positions` (from `locate`) and
        puts the new values back there, where the next step reads them: no
        sync of the model's variables and no regather (most of a small
        model's step). Returns the batch's report vector, on the device
        (read it with `HandOverReport.from_vector`).
        """
        state_at, iterations_at, unread_at = positions
        controller = self.optimizer.controller()
        run = self._compiled.get(("values", controller),
                                 lambda: _compile_values_hand_over(controller))
        state, observed_iterations, pending, unread, report = run(
            TrustRegionState(*(optimizer_values[i] for i in state_at)),
            optimizer_values[iterations_at],
            self._observed_iterations.value,
            tuple(variable.value for variable in self._pending),
            tuple(metrics_values[i] for i in unread_at),
        )
        # Fresh arrays from `run`: the next step may donate them.
        for i, value in zip(state_at, state):
            optimizer_values[i] = value
        for i, value in zip(unread_at, unread):
            metrics_values[i] = value
        self._observed_iterations.assign(observed_iterations)
        for variable, value in zip(self._pending, pending):
            variable.assign(value)
        return report

    def locate(self, model):
        """Where `hand_over_values` finds its inputs, or `None` if unsure.

        Returns `(positions, sizes)`: `positions` holds the indices of the
        controller state's variables (field by field) and of SOAA's
        `iterations` in `model.optimizer.variables`, and of the tracker's
        unread sums in `model.metrics_variables`; `sizes` the lengths of both
        lists, to check the state lists against.
        """
        optimizer_variables = model.optimizer.variables
        metrics_variables = model.metrics_variables

        def index(variables, target):
            found = [i for i, v in enumerate(variables) if v is target]
            return found[0] if len(found) == 1 else None

        # Which variables hold which field of the controller state: write
        # field k's number k + 1 with `assign_trust_region_state` in a
        # `StatelessScope` (it records the assignments, the variables keep
        # their values), then check that `trust_region_state` reads them back.
        fields = len(TrustRegionState._fields)
        with keras.StatelessScope() as scope:
            self.optimizer.assign_trust_region_state(
                TrustRegionState(*range(1, fields + 1))
            )
        state_at = [None] * fields
        for i, variable in enumerate(optimizer_variables):
            value = scope.get_current_value(variable)
            if value is None:
                continue
            field = int(value) - 1  # not `ops`: no host read to count
            if not 0 <= field < fields or state_at[field] is not None:
                return None
            state_at[field] = i
        if None in state_at:
            return None
        with keras.StatelessScope(state_mapping=[
            (variable, ops.full((), field + 1, variable.dtype))
            for field, variable in enumerate(
                optimizer_variables[i] for i in state_at)
        ]):
            read = self.optimizer.trust_region_state()
        if [float(x) for x in read] != list(range(1, fields + 1)):
            return None
        iterations_at = index(optimizer_variables, self.optimizer.iterations)
        unread_at = (index(metrics_variables, self._tracker.unread_total),
                     index(metrics_variables, self._tracker.unread_count))
        if iterations_at is None or None in unread_at:
            return None
        return ((tuple(state_at), iterations_at, unread_at),
                (len(optimizer_variables), len(metrics_variables)))

    def _inputs(self):
        tracker = self._tracker
        return (
            self.optimizer.trust_region_state(),
            read_value(self.optimizer.iterations),
            read_value(self._observed_iterations),
            tuple(read_value(v) for v in self._pending),
            (read_value(tracker.unread_total), read_value(tracker.unread_count)),
        )

    def _assign(self, outputs):
        state, observed_iterations, pending, unread, report = outputs
        self.optimizer.assign_trust_region_state(state)
        self._observed_iterations.assign(observed_iterations)
        for variable, value in zip(self._pending, pending):
            variable.assign(value)
        self._tracker.unread_total.assign(unread[0])
        self._tracker.unread_count.assign(unread[1])
        return report


def _compile_values_hand_over(controller):
    """`hand_over_loss` under `jax.jit`, its outputs in its inputs' dtypes.

    They go into `fit`'s state as they are, without `Variable.assign`'s
    cast; another dtype would also make the train step trace again.
    """
    import jax

    def cast(new, old):
        return tuple(ops.cast(n, o.dtype) for n, o in zip(new, old))

    def run(state, iterations, observed_iterations, pending, unread):
        new_state, observed, new_pending, new_unread, report = hand_over_loss(
            state, iterations, observed_iterations, pending, unread,
            observe=controller,
        )
        return (
            TrustRegionState(*cast(new_state, state)),
            ops.cast(observed, observed_iterations.dtype),
            cast(new_pending, pending),
            cast(new_unread, unread),
            report,
        )

    return jax.jit(run)


def _use_batch_loss_tracker(model) -> BatchLossMean:
    """Gives `model` a `BatchLossMean` loss tracker (once); returns it."""
    tracker = internals.loss_tracker(model)
    if isinstance(tracker, BatchLossMean):
        return tracker
    strategy = getattr(model, "distribute_strategy", None)  # TF only
    if strategy is not None:
        with strategy.scope():
            tracker = BatchLossMean(name=tracker.name)
    else:
        tracker = BatchLossMean(name=tracker.name)
    internals.replace_loss_tracker(model, tracker)
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
    logged. On JAX (without a `keras.distribution`) the call runs right after
    each train step, on the state the next step trains from (see
    `internals.AfterJaxTrainStep`), rather than after a sync of every
    variable into the model, which costs a small model most of a step;
    callbacks listed before this one then already see the new state.

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
        built_on = internals.trained_variables_of(self._optimizer)
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
        if (
            self._optimizer.total_steps is None
            and self._optimizer.controller_name == "paper"
        ):
            # Refuse before the first step rather than at the first loss
            # (only the paper controller's bounds need `total_steps`).
            raise ValueError(
                "`TrustRegionCallback` cannot set SOAA's `total_steps`: `fit` "
                "does not know the number of steps per epoch (e.g. a "
                "generator or a dataset of unknown length). Pass "
                "`SOAA(total_steps=...)` (the number of optimizer steps of "
                "the run) or `fit(..., steps_per_epoch=...)`."
            )
        self._optimizer.attach_loss_observer()
        tracker = _use_batch_loss_tracker(self.model)
        # Reused by later `fit`s (and callbacks): its compiled call too.
        self._hand_over = tracker.hand_over
        if self._hand_over is None or self._hand_over.optimizer is not self._optimizer:
            self._hand_over = tracker.hand_over = _LossHandOver(
                self._optimizer, tracker,
                getattr(self.model, "distribute_strategy", None),  # TF only
            )
        self._hand_over.restart()
        self.last_report = None
        # JAX: the hand-over runs on the train function's new state (see
        # `internals.AfterJaxTrainStep`), not after a sync of every variable.
        self._in_step = None
        self._in_step_report = None
        model = internals.callback_model(self)
        if (
            keras.backend.backend() == "jax"
            # Its outputs would need the state's shardings.
            and keras.distribution.distribution() is None
        ):
            self._located = self._hand_over.locate(model)
            self._state_variables = internals.jax_state_variables(model)
            if self._located is not None:
                self._in_step = internals.AfterJaxTrainStep(
                    model, self._hand_over_in_step
                )

    def on_train_batch_begin(self, batch, logs=None):
        """JAX: lets the train function hand the loss over after this step."""
        if self._in_step is not None:
            self._in_step.armed = True

    def on_train_batch_end(self, batch, logs=None):
        """Observes the loss of the batch(es) trained since the last step."""
        if self._in_step is not None and self._in_step.ran:
            self._in_step.ran = False
            self.last_report = HandOverReport.from_vector(
                ops.convert_to_numpy(self._in_step_report)
            )
        else:
            # Not `self.model`, which on JAX syncs every variable already.
            internals.sync_trainer_state(internals.callback_model(self))
            self.last_report = self._hand_over()
        if logs is not None:
            logs["radius"] = self.last_report.state.radius

    def on_train_end(self, logs=None):
        """JAX: gives the model its own train function back."""
        if self._in_step is not None:
            self._in_step.remove(internals.callback_model(self))
            self._in_step = None

    def _hand_over_in_step(self, state) -> bool:
        """The hand-over on a JAX train step's new state lists, in place.

        Then attaches the state to the variables, as the sync that this
        callback did before the hand-over moved here: callbacks can read
        the model's variables (at a fraction of the sync's cost).
        """
        positions, sizes = self._located
        if (
            (len(state[2]), len(state[3])) != sizes
            or any(len(values) != len(group) for values, group
                   in zip(state, self._state_variables))
        ):
            return False
        self._in_step_report = self._hand_over.hand_over_values(
            state[2], state[3], positions
        )
        internals.attach_jax_state(self._state_variables, state)
        return True

    def on_epoch_end(self, epoch, logs=None):
        """Adds the radius to the epoch's logs."""
        report = self.last_report
        if keras.backend.backend() == "jax" and report is not None and report.observed:
            # Keras 3.15's JAX `fit` ends an epoch of unknown length by
            # attaching the state it held before the last batch's callbacks,
            # which undoes that batch's observation: write it again (no step
            # came since; normally this writes the values already there).
            self._optimizer.assign_trust_region_state(report.state)
        if logs is not None:
            logs["radius"] = (
                report.state.radius if report is not None  # else no batch yet
                else float(ops.convert_to_numpy(self._optimizer.radius))
            )
