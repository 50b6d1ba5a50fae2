"""Trains one (problem, optimizer) pair over the learning-rate grid and seeds."""

import re
import time

import designs
import keras
import numpy as np
from keras import ops

import keras_soaa

# `*_cosine` runs the same optimizer with its learning rate decayed to 0 over
# the run by `keras.optimizers.schedules.CosineDecay` (peak: the grid's rate).
# `soaa_hd*`: SOAA with `controller="hypergradient"` (the radius follows the
# gradients); `soaa`, `soaa_cosine`: the paper's loss-ratio controller.
# `soaa_gr*`: SOAA with `controller="gradient_ratio"`.
SOAA_VARIANTS = ("soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine",
                 "soaa_gr", "soaa_gr_cosine")
HYPERGRADIENT_VARIANTS = ("soaa_hd", "soaa_hd_cosine")
GRADIENT_RATIO_VARIANTS = ("soaa_gr", "soaa_gr_cosine")
# The hypergradient controller's arguments the benchmark passes explicitly
# (`compare.py --hd-radius-lr / --hd-bounds`); empty: SOAA's defaults.
HYPERGRADIENT_ARGUMENTS = {}


def is_soaa(name):
    return name in SOAA_VARIANTS or is_design(name)


def is_design(name):
    """A prototype controller of `designs.py` (issue 17's candidates)."""
    return name in designs.names()


def is_hypergradient(name):
    """A gradient-driven controller (constant radius bounds)."""
    return (name in HYPERGRADIENT_VARIANTS or name in GRADIENT_RATIO_VARIANTS
            or is_design(name))


def hypergradient_arguments(overrides=None):
    """The hypergradient controller's arguments: SOAA's defaults, overridden.

    Returns `{"radius_learning_rate", "min_radius", "max_radius"}` as used
    (read from a `SOAA(controller="hypergradient")`'s config, so the report
    states the bounds the runs really had).
    """
    overrides = HYPERGRADIENT_ARGUMENTS if overrides is None else overrides
    config = keras_soaa.SOAA(controller="hypergradient", **overrides).get_config()
    return {key: float(config[key])
            for key in ("radius_learning_rate", "min_radius", "max_radius")}


def is_scheduled(name):
    """Its learning rate is a schedule, fixed when the optimizer is built."""
    return name.endswith("_cosine")


def cosine_to_zero(learning_rate, steps):
    """Cosine decay from `learning_rate` at step 0 to 0 at step `steps`."""
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate, decay_steps=steps, alpha=0.0
    )


def muon_output_layer(model):
    """The `exclude_layers` entry that gives the output layer's kernel to AdamW.

    Muon's docstring: non-2-D variables and embeddings always take its AdamW
    step; "typically, you only need to pass the name of your densely-connected
    output layer to `exclude_layers`". The output layer's kernel is the last
    2-D trainable variable; the pattern matches its path exactly.
    """
    matrices = [v for v in model.trainable_variables if len(v.shape) == 2]
    return ["^" + re.escape(matrices[-1].path) + "$"] if matrices else []


def make_optimizer(name, learning_rate, steps=None, model=None):
    """Keras' own optimizers with their default arguments, or SOAA.

    `steps` (the run's length) is needed by the cosine schedules, `model` by
    Muon (its output layer takes the AdamW fallback).
    """
    if is_scheduled(name):
        if steps is None:
            raise ValueError(f"{name} needs the run's number of steps")
        learning_rate = cosine_to_zero(learning_rate, steps)
    if is_design(name):
        return designs.make(name, learning_rate)
    if name in GRADIENT_RATIO_VARIANTS:
        return keras_soaa.SOAA(learning_rate=learning_rate,
                               controller="gradient_ratio")
    if name in HYPERGRADIENT_VARIANTS:
        return keras_soaa.SOAA(learning_rate=learning_rate,
                               controller="hypergradient",
                               **HYPERGRADIENT_ARGUMENTS)
    if name in SOAA_VARIANTS:
        return keras_soaa.SOAA(learning_rate=learning_rate)
    if name in ("adam", "adam_cosine"):
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate)
    if name == "schedulefree":
        return keras.optimizers.ScheduleFreeAdamW(learning_rate=learning_rate)
    if name == "muon":
        if model is None:
            raise ValueError("muon needs the model (to exclude its output layer)")
        return keras.optimizers.Muon(learning_rate=learning_rate,
                                     exclude_layers=muon_output_layer(model))
    if name == "lion":
        return keras.optimizers.Lion(learning_rate=learning_rate)
    raise ValueError(f"unknown optimizer {name!r}")


def schedule_free_x(optimizer, variables):
    """ScheduleFreeAdamW's averaged point x, as NumPy arrays, per variable.

    Keras keeps the interpolated point y = (1 − β1)·z + β1·x in the model's
    weights and z in the optimizer's `momentum` variables, so
    x = (y − (1 − β1)·z) / β1, the point the method's authors evaluate.
    Computed in float64 from the current values; nothing is changed. (On
    TensorFlow and torch, Keras 3.15's update recovers x_old with the
    already-updated z, so there x is Keras' averaged sequence, which departs
    from the paper's; on JAX the two agree.)
    """
    beta_1 = float(optimizer.beta_1)
    points = []
    for variable in variables:
        z = optimizer._momentums[optimizer._get_variable_index(variable)]
        y = ops.convert_to_numpy(variable).astype("float64")
        z = ops.convert_to_numpy(z).astype("float64")
        points.append(((y - (1 - beta_1) * z) / beta_1).astype(variable.dtype))
    return points


def evaluate_at(model, values, function):
    """`function(model)` with the trainable weights set to `values`.

    The weights in place before (ScheduleFreeAdamW's y) are put back
    afterwards, exactly, so training could go on undisturbed.
    """
    variables = model.trainable_variables
    saved = [ops.convert_to_numpy(v) for v in variables]
    try:
        for variable, value in zip(variables, values):
            variable.assign(value)
        return function(model)
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)


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
    callbacks = [Recorder(probe_every=10 if is_soaa(optimizer_name) else 0)]
    if is_soaa(optimizer_name):
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
    optimizer = make_optimizer(optimizer_name, learning_rate, problem.steps,
                               model)
    optimizer.build(model.trainable_variables)
    target = model.optimizer
    if len(target.variables) != len(optimizer.variables):
        raise RuntimeError("optimizer state layouts differ")
    for variable, value in zip(target.variables, optimizer.variables):
        variable.assign(value)
    if is_soaa(optimizer_name):
        # Let `TrustRegionCallback` set it from this `fit`, as in a fresh run.
        target.total_steps = None


def _compiled_model(problem, optimizer_name, learning_rate, seed, chunk,
                    run_eagerly=False):
    """A new compiled model, warmed up (compiled) by a short `fit`."""
    keras.utils.set_random_seed(seed)
    model = problem.build_model(seed)
    model.compile(
        optimizer=make_optimizer(optimizer_name, learning_rate, problem.steps,
                                 model),
        loss=problem.loss(), run_eagerly=run_eagerly,
    )
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
    if is_soaa(optimizer_name) and model.optimizer.total_steps != problem.steps:
        raise RuntimeError(
            f"SOAA ran with total_steps={model.optimizer.total_steps}, "
            f"expected {problem.steps}"
        )
    losses = np.asarray(recorder.losses, "float64")
    window = final_window(problem.steps)
    final = float(np.mean(losses[-window:]))
    held_out = problem.held_out(model) if np.isfinite(final) else None
    held_out_x = None
    if optimizer_name == "schedulefree" and held_out is not None:
        points = schedule_free_x(model.optimizer, model.trainable_variables)
        held_out_x = evaluate_at(model, points, problem.held_out)
    radius_bounds = None
    if is_hypergradient(optimizer_name):
        optimizer = model.optimizer
        radius_bounds = [optimizer.min_radius, optimizer.max_radius]
    return {
        "seed": seed,
        "loss": recorder.losses,
        "time": recorder.times,
        "radius": recorder.radii or None,
        # The hypergradient controller's constant bounds on the radius (the
        # paper controller's follow from `total_steps`: `report.radius_bounds`).
        "radius_bounds": radius_bounds,
        "fisher_share": recorder.fisher or None,
        "final_loss": final if np.isfinite(final) else None,
        "held_out": held_out,
        "held_out_x": held_out_x,
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
    """Runs every (learning rate, seed); returns {lr: [record per seed]}.

    With `reuse`, one compiled model serves every run; for an optimizer with a
    learning-rate schedule (fixed at construction, not an optimizer variable
    that a fresh start can copy) one compiled model serves every seed of a
    rate.
    """
    counter = counter or Counter(len(learning_rates) * len(seeds))
    chunk = steps_per_epoch(problem)
    model = None
    runs = {}
    for learning_rate in learning_rates:
        runs[repr(learning_rate)] = []
        if is_scheduled(optimizer_name):
            model = None
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
        f"{number} {problem.name:<13} {optimizer_name:<14} lr={learning_rate:<6g}"
        f" seed={record['seed']}",
        "final loss " + ("diverged" if final is None else f"{final:.4g}"),
    ]
    if record["held_out"] is not None:
        parts.append(f"{problem.held_out_name} {record['held_out']:.4g}")
    if record.get("held_out_x") is not None:
        parts.append(f"at x {record['held_out_x']:.4g}")
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
