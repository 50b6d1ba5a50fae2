"""Trains one (problem, optimizer) pair over a learning-rate grid and seeds."""

import random
import time

import keras
import numpy as np
import optimizers
from keras import ops

import keras_soaa

# The ETA's weight of a run that compiles a model (seconds, 2 CPU cores).
COMPILE_S = 2.0


def seed_everything(seed):
    """What `keras.utils.set_random_seed` does, without importing TensorFlow
    on JAX and torch (Keras' initializers draw from Python's `random`)."""
    if keras.backend.backend() == "tensorflow":
        keras.utils.set_random_seed(seed)
        return
    random.seed(seed)
    np.random.seed(seed)
    if keras.backend.backend() == "torch":
        import torch

        torch.manual_seed(seed)


def loss_metric(model):
    """The `keras.metrics.Mean` behind `fit`'s `logs["loss"]`."""
    for metric in model.metrics:
        if metric.name == "loss":
            return metric
    raise LookupError("the model has no metric named 'loss' (not compiled?)")


def slot_variable(optimizer, variable, slot):
    """The optimizer variable `slot` ("momentum", "velocity") of `variable`,
    by the name Keras' `add_variable_from_reference` gives it."""
    name = f"{variable.path.replace('/', '_')}_{slot}"
    found = [v for v in optimizer.variables if v.name == name]
    if len(found) != 1:
        raise LookupError(f"{len(found)} optimizer variables named {name!r}")
    return found[0]


def fisher_share(optimizer, variables, radius):
    """The share of weights whose next SOAA step is in the Fisher regime: SOAA
    divides d·m̂ by max(d·c·v̂, √v̂), c = 1 + Σm̂² / Σ(v̂ + ε); where √v̂ wins the
    step is Adam's times d, where d·c·v̂ wins d cancels."""
    t = float(ops.convert_to_numpy(optimizer.iterations))
    fisher = total = 0
    for variable in variables:
        m, v = (ops.convert_to_numpy(slot_variable(optimizer, variable, s))
                .astype("float64") for s in ("momentum", "velocity"))
        m_hat = m / (1 - optimizer.beta_1**t)
        v_hat = v / (1 - optimizer.beta_2**t)
        c = 1 + np.sum(m_hat**2) / np.sum(v_hat + optimizer.epsilon)
        fisher += int(np.sum(radius * c * v_hat > np.sqrt(v_hat)))
        total += v_hat.size
    return fisher / total


class Recorder(keras.callbacks.Callback):
    """Records per batch its loss (from the change of `fit`'s loss metric:
    `logs["loss"]` is the epoch's mean), the time and SOAA's radius (from
    `TrustRegionCallback`); with `probe`, every 10th batch the Fisher share."""

    def __init__(self, probe=False):
        super().__init__()
        self.probe = probe

    def on_train_begin(self, logs=None):
        self.losses, self.times, self.radii, self.fisher = [], [], [], []
        self.probe_seconds = 0.0
        self.start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self.seen_total = self.seen_count = 0.0

    def on_train_batch_end(self, batch, logs=None):
        model = self.model  # on JAX: syncs the trainer's state
        tracker = loss_metric(model)
        total = float(ops.convert_to_numpy(tracker.total))
        count = float(ops.convert_to_numpy(tracker.count))
        self.losses.append((total - self.seen_total) / (count - self.seen_count))
        self.seen_total, self.seen_count = total, count
        self.times.append(time.perf_counter() - self.start - self.probe_seconds)
        if logs and "radius" in logs:
            self.radii.append(float(logs["radius"]))
        if self.probe and (len(self.losses) - 1) % 10 == 0:
            start = time.perf_counter()
            self.fisher.append(fisher_share(model.optimizer, model.trainable_variables,
                                            self.radii[-1]))
            self.probe_seconds += time.perf_counter() - start


def keeps_averaged_point(optimizer):
    """Whether the weights `optimizer` trains are not the point to evaluate:
    ScheduleFreeAdamW, or any optimizer with an `averaged_point(variable)`."""
    return (isinstance(optimizer, keras.optimizers.ScheduleFreeAdamW)
            or callable(getattr(optimizer, "averaged_point", None)))


def at_schedule_free_x(model, function):
    """`function(model)` at the optimizer's averaged point x (the trained weights
    put back after): its `averaged_point(variable)` where it has one, else
    ScheduleFreeAdamW's x = (y − (1 − β1)·z) / β1 (y: the trained weights, z:
    their `momentum` slots)."""
    optimizer, variables = model.optimizer, model.trainable_variables
    saved = [ops.convert_to_numpy(v) for v in variables]
    averaged_point = getattr(optimizer, "averaged_point", None)
    beta_1 = float(optimizer.beta_1)
    try:
        for variable, y in zip(variables, saved):
            if callable(averaged_point):
                x = ops.convert_to_numpy(averaged_point(variable))
            else:
                z = slot_variable(optimizer, variable, "momentum")
                x = (y.astype("float64") - (1 - beta_1) * ops.convert_to_numpy(
                    z).astype("float64")) / beta_1
            variable.assign(x.astype(variable.dtype))
        return function(model)
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)


def steps_per_epoch(problem):
    """The largest divisor of the step count up to the problem's epoch size."""
    limit = min(problem.steps_per_epoch, problem.steps)
    return max(d for d in range(1, limit + 1) if problem.steps % d == 0)


def fit(model, problem, x, y, steps):
    """`fit` for `steps` steps; SOAA with `TrustRegionCallback`."""
    is_soaa = isinstance(model.optimizer, keras_soaa.SOAA)
    # The Fisher share reads SOAA's `m`, which an averaging SOAA does not keep.
    recorder = Recorder(probe=is_soaa and not keeps_averaged_point(model.optimizer))
    callbacks = [keras_soaa.TrustRegionCallback()] if is_soaa else []
    chunk = steps_per_epoch(problem)
    model.fit(x, y, batch_size=problem.batch_size, epochs=steps // chunk,
              steps_per_epoch=chunk, shuffle=False, verbose=0,
              callbacks=callbacks + [recorder])
    return recorder


def compiled_model(problem, name, learning_rate, seed):
    """A new compiled model, warmed up (compiled) by a short `fit`."""
    seed_everything(seed)
    model = problem.model(seed)
    model.compile(optimizer=optimizers.make(name, learning_rate, problem.steps, model),
                  loss=problem.loss())
    chunk = steps_per_epoch(problem)
    fit(model, problem, *problem.batches(seed, chunk), chunk)
    return model


def copy(sources, targets):
    if len(sources) != len(targets):
        raise RuntimeError("state layouts differ")
    for target, source in zip(targets, sources):
        target.assign(source)


def fresh_start(model, problem, name, learning_rate, seed):
    """Puts seed-initialised variables (also dropout's seed state, batch-norm
    statistics) and a fresh optimizer state into a compiled `model`."""
    seed_everything(seed)
    copy(problem.model(seed).variables, model.variables)
    # Built on the fresh weights (ScheduleFreeAdamW's z starts at them).
    optimizer = optimizers.make(name, learning_rate, problem.steps, model)
    optimizer.build(model.trainable_variables)
    copy(optimizer.variables, model.optimizer.variables)
    if isinstance(model.optimizer, keras_soaa.SOAA):
        # Let `TrustRegionCallback` set it from this `fit`, as in a fresh run.
        model.optimizer.total_steps = None


def run(model, problem, name, learning_rate, seed):
    """One training run from a fresh start; returns its record."""
    fresh_start(model, problem, name, learning_rate, seed)
    x, y = problem.batches(seed)
    start = time.perf_counter()
    recorder = fit(model, problem, x, y, problem.steps)
    seconds = time.perf_counter() - start - recorder.probe_seconds
    optimizer = model.optimizer
    if (isinstance(optimizer, keras_soaa.SOAA)
            and optimizer.total_steps != problem.steps):
        raise RuntimeError(f"SOAA ran with total_steps={optimizer.total_steps}, "
                           f"expected {problem.steps}")
    final = float(np.mean(recorder.losses[-max(1, problem.steps // 10):]))
    finite = bool(np.isfinite(final))
    held_out = problem.held_out(model) if finite else None
    held_out_x = None
    if keeps_averaged_point(optimizer) and finite:
        held_out_x = at_schedule_free_x(model, problem.held_out)
    return {
        "seed": seed, "loss": recorder.losses, "time": recorder.times,
        "radius": recorder.radii or None, "fisher_share": recorder.fisher or None,
        "final_loss": final if finite else None,
        "held_out": held_out, "held_out_x": held_out_x,
        "ms_per_step": 1000 * seconds / problem.steps,
    }


def compiles(name, learning_rates, seeds, reuse=True):
    """For each run of `sweep`, in order: whether it compiles a model."""
    schedule = optimizers.OPTIMIZERS[name].schedule
    return [not reuse or j == 0 and (k == 0 or schedule)
            for k in range(len(learning_rates)) for j in range(len(seeds))]


def weights(problem, name, learning_rates, seeds, reuse=True):
    """The ETA's weight of each run of `sweep`: its expected seconds."""
    return [problem.expected_s() + (COMPILE_S if compiled else 0.1)
            for compiled in compiles(name, learning_rates, seeds, reuse)]


class Progress:
    """A run counter with an ETA: the time so far scaled by the expected seconds
    (`weights`) of the runs left over those done."""

    def __init__(self, total_weight, runs):
        self.total, self.runs = total_weight, runs
        self.done = self.weight = 0
        self.start = time.perf_counter()

    def next(self, weight):
        self.done += 1
        self.weight += weight
        elapsed = time.perf_counter() - self.start
        left = elapsed * max(0.0, self.total - self.weight) / self.weight
        return (f"[{self.done:>{len(str(self.runs))}}/{self.runs}, "
                f"{elapsed / 60:.1f} min, ~{left / 60:.1f} min left]")


def sweep(problem, name, learning_rates, seeds, reuse=True, progress=None):
    """Runs every (learning rate, seed); returns {repr(lr): [record per seed]}.
    With `reuse`, one compiled model serves every run (every seed of a rate for a
    `schedule` row); each run starts from a fresh state copied in."""
    costs = weights(problem, name, learning_rates, seeds, reuse)
    progress = progress or Progress(sum(costs), len(costs))
    model, runs, index = None, {}, 0
    for learning_rate in learning_rates:
        runs[repr(learning_rate)] = records = []
        for seed in seeds:
            if compiles(name, learning_rates, seeds, reuse)[index]:
                model = compiled_model(problem, name, learning_rate, seed)
            record = run(model, problem, name, learning_rate, seed)
            records.append(record)
            print(progress.next(costs[index]), run_line(
                problem, name, learning_rate, record), flush=True)
            index += 1
    return runs


def run_line(problem, name, learning_rate, record):
    final = record["final_loss"]
    parts = [f"{problem.name:<13} {name:<14} lr={learning_rate:<6g} "
             f"seed={record['seed']}",
             "final loss " + ("diverged" if final is None else f"{final:.4g}")]
    if record["held_out"] is not None:
        parts.append(f"{problem.metric.name} {record['held_out']:.4g}")
    if record["held_out_x"] is not None:
        parts.append(f"at x {record['held_out_x']:.4g}")
    if record["radius"]:
        parts.append(f"radius {record['radius'][-1]:.3f}")
    return ", ".join(parts + [f"{record['ms_per_step']:.2f} ms/step"])


def versions():
    """keras-soaa's, Keras' and the backend's versions, as installed."""
    import importlib

    backend = keras.backend.backend()
    return {"keras-soaa": keras_soaa.__version__, "keras": keras.__version__,
            backend: importlib.import_module(backend).__version__}
