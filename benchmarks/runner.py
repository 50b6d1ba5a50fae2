"""Trains one (problem, optimizer) pair over the learning-rate grid and seeds."""

import time

import keras
import numpy as np
from keras import ops

import keras_soaa


def make_optimizer(name, learning_rate):
    """Keras' own optimizers with their default arguments, or SOAA."""
    if name == "soaa":
        return keras_soaa.SOAA(learning_rate=learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate)
    if name == "lion":
        return keras.optimizers.Lion(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


class Recorder(keras.callbacks.Callback):
    """Records, per batch: its training loss, the time, and SOAA's radius.

    `logs["loss"]` is the epoch's running mean; the batch's own loss is read
    from the change of `fit`'s loss tracker, as `TrustRegionCallback` does.
    The radius comes from `logs["radius"]`, which `TrustRegionCallback`
    (listed before this callback) adds.

    With `probe_every=k`, every k-th batch it also measures which share of
    SOAA's weights are in the Fisher regime (see `fisher_share`); the time
    that takes is left out of the recorded times.
    """

    def __init__(self, probe_every=0):
        super().__init__()
        self.probe_every = probe_every

    def on_train_begin(self, logs=None):
        self.losses, self.times, self.radii, self.fisher = [], [], [], []
        self.probe_seconds = 0.0
        self._start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._seen_total = self._seen_count = 0.0

    def on_train_batch_end(self, batch, logs=None):
        sync = getattr(self.model, "jax_state_sync", None)
        if sync is not None:
            sync()
        tracker = self.model._loss_tracker
        total = float(ops.convert_to_numpy(tracker.total))
        count = float(ops.convert_to_numpy(tracker.count))
        self.losses.append((total - self._seen_total) / (count - self._seen_count))
        self._seen_total, self._seen_count = total, count
        self.times.append(time.perf_counter() - self._start - self.probe_seconds)
        if logs and "radius" in logs:
            self.radii.append(float(logs["radius"]))
        if self.probe_every and (len(self.losses) - 1) % self.probe_every == 0:
            start = time.perf_counter()
            self.fisher.append(fisher_share(self.model.optimizer))
            self.probe_seconds += time.perf_counter() - start


def fisher_share(optimizer):
    """The share of weights whose next SOAA step is in the Fisher regime.

    SOAA divides d·m̂ by r = max(d·F, √v̂) with F = c·v̂. Where √v̂ wins, the
    step is Adam's times the radius d; where d·c·v̂ wins (√v̂ > 1/(d·c), large
    gradients), it is m̂/(c·v̂) and d cancels. Computed from the optimizer's
    current m, v, radius and iterations, per the spec's formulas.
    """
    moments = getattr(optimizer, "_momentums", None)
    velocities = getattr(optimizer, "_velocities", None)
    if moments is None or velocities is None:
        return None
    t = float(ops.convert_to_numpy(optimizer.iterations))
    d = float(ops.convert_to_numpy(optimizer.radius))
    fisher = total = 0
    for m, v in zip(moments, velocities):
        m_hat = ops.convert_to_numpy(m).astype("float64") / (1 - optimizer.beta_1**t)
        v_hat = ops.convert_to_numpy(v).astype("float64") / (1 - optimizer.beta_2**t)
        c = 1 + np.sum(m_hat**2) / np.sum(v_hat + optimizer.epsilon)
        fisher += int(np.sum(d * c * v_hat > np.sqrt(v_hat)))
        total += v_hat.size
    return fisher / total


def steps_per_epoch(problem):
    """The largest divisor of the step count up to the problem's epoch size."""
    limit = min(problem.steps_per_epoch, problem.steps)
    return max(d for d in range(1, limit + 1) if problem.steps % d == 0)


def _fit(model, problem, optimizer_name, x, y, steps, chunk):
    callbacks = [Recorder(probe_every=10 if optimizer_name == "soaa" else 0)]
    if optimizer_name == "soaa":
        callbacks.insert(0, keras_soaa.TrustRegionCallback())
    model.fit(
        x, y, batch_size=problem.batch_size, epochs=steps // chunk,
        steps_per_epoch=chunk, shuffle=False, verbose=0, callbacks=callbacks,
    )
    return callbacks[-1]


def _fresh_start(model, problem, optimizer_name, learning_rate, seed):
    """Puts seed-initialised weights and a fresh optimizer state in `model`."""
    keras.utils.set_random_seed(seed)
    fresh = problem.build_model(seed)
    model.set_weights(fresh.get_weights())
    optimizer = make_optimizer(optimizer_name, learning_rate)
    optimizer.build(model.trainable_variables)
    target = model.optimizer
    if len(target.variables) != len(optimizer.variables):
        raise RuntimeError("optimizer state layouts differ")
    for variable, value in zip(target.variables, optimizer.variables):
        variable.assign(value)
    if optimizer_name == "soaa":
        # Let `TrustRegionCallback` set it from this `fit`, as in a fresh run.
        target.total_steps = None


def _compiled_model(problem, optimizer_name, learning_rate, seed, chunk,
                    run_eagerly=False):
    """A new compiled model, warmed up (compiled) by a short `fit`."""
    keras.utils.set_random_seed(seed)
    model = problem.build_model(seed)
    model.compile(optimizer=make_optimizer(optimizer_name, learning_rate),
                  loss=problem.loss(), run_eagerly=run_eagerly)
    x, y = problem.stream(seed, chunk)
    _fit(model, problem, optimizer_name, x, y, chunk, chunk)
    return model


def run(model, problem, optimizer_name, learning_rate, seed):
    """One training run from a fresh start; returns its record."""
    chunk = steps_per_epoch(problem)
    _fresh_start(model, problem, optimizer_name, learning_rate, seed)
    x, y = problem.stream(seed, problem.steps)
    start = time.perf_counter()
    recorder = _fit(model, problem, optimizer_name, x, y, problem.steps, chunk)
    seconds = time.perf_counter() - start - recorder.probe_seconds
    if optimizer_name == "soaa" and model.optimizer.total_steps != problem.steps:
        raise RuntimeError(
            f"SOAA ran with total_steps={model.optimizer.total_steps}, "
            f"expected {problem.steps}"
        )
    losses = np.asarray(recorder.losses, "float64")
    window = final_window(problem.steps)
    final = float(np.mean(losses[-window:]))
    held_out = problem.held_out(model) if np.isfinite(final) else None
    return {
        "seed": seed,
        "loss": recorder.losses,
        "time": recorder.times,
        "radius": recorder.radii or None,
        "fisher_share": recorder.fisher or None,
        "final_loss": final if np.isfinite(final) else None,
        "held_out": held_out,
        "ms_per_step": 1000 * seconds / problem.steps,
    }


def final_window(steps):
    """The final loss is the mean over the last 10% of steps."""
    return max(1, steps // 10)


class Counter:
    """Numbers the progress lines."""

    def __init__(self, total):
        self.total, self.done = total, 0

    def next(self):
        self.done += 1
        return f"[{self.done:>{len(str(self.total))}}/{self.total}]"


def sweep(problem, optimizer_name, learning_rates, seeds, reuse=True,
          counter=None):
    """Runs every (learning rate, seed); returns {lr: [record per seed]}."""
    counter = counter or Counter(len(learning_rates) * len(seeds))
    chunk = steps_per_epoch(problem)
    model = None
    runs = {}
    for learning_rate in learning_rates:
        runs[repr(learning_rate)] = []
        for seed in seeds:
            if model is None or not reuse:
                model = _compiled_model(problem, optimizer_name, learning_rate,
                                        seed, chunk)
            record = run(model, problem, optimizer_name, learning_rate, seed)
            runs[repr(learning_rate)].append(record)
            print(progress_line(counter.next(), problem, optimizer_name,
                                learning_rate, record), flush=True)
    return runs


def progress_line(number, problem, optimizer_name, learning_rate, record):
    final = record["final_loss"]
    parts = [
        f"{number} {problem.name:<13} {optimizer_name:<5} lr={learning_rate:<6g}"
        f" seed={record['seed']}",
        "final loss " + ("diverged" if final is None else f"{final:.4g}"),
    ]
    if record["held_out"] is not None:
        parts.append(f"{problem.held_out_name} {record['held_out']:.4g}")
    if record["radius"]:
        parts.append(f"radius {record['radius'][-1]:.3f}")
    parts.append(f"{record['ms_per_step']:.2f} ms/step")
    return ", ".join(parts)


def describe(problem, learning_rates):
    return {
        "description": problem.description,
        "steps": problem.steps,
        "batch_size": problem.batch_size,
        "lrs": list(learning_rates),
        "held_out_name": problem.held_out_name,
        "held_out_lower_is_better": problem.held_out_lower_is_better,
        "final_window": final_window(problem.steps),
        "exact_gradients": problem.exact_gradients,
    }


def versions():
    import importlib

    backend = keras.backend.backend()
    return {
        "keras": keras.__version__,
        backend: importlib.import_module(backend).__version__,
        "keras-soaa": keras_soaa.__version__,
    }


def free_memory():
    keras.backend.clear_session()
