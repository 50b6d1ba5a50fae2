"""Speed and memory of SOAA against Keras' own Adam, side by side, per backend.

    python benchmarks/speed.py [--backends tensorflow,jax,torch] [--quick]
    python benchmarks/speed.py --models small   # the callback's per-batch cost

Sides: Keras Adam, SOAA + `TrustRegionCallback`, "SOAA-HG"
(`controller="hypergradient"`, no callback). Writes (default
`benchmarks/results/speed.md`) ms/step of each side in `fit` per backend x mode x
model, ratios to Adam, state bytes and each fit's peak RSS (MLP 784-1024-1024-10,
batch 256), and `optimizer.apply` alone on `--apply-params` parameters (compiled
where the backend compiles). One process per backend and per peak-memory figure;
sides timed alternately by epoch, median of the repeats, big allocations kept on
glibc's heap (`HEAP_MALLOC`; `--system-malloc`: the defaults).

Small models (`mlp_small` by default; `--models small` adds `logreg`): batch 64,
`--small-steps` steps per epoch, preset `recommended(1e-3, total_steps)`, where
per-batch work around the step dominates. They run in compiled `fit` (eager on
torch), eager `fit` on JAX (`--steps` steps), and a custom loop (gradients, `apply`,
`observe_loss` in one `tf.function` / `jax.jit` step; eager on torch). On torch,
every `fit` and the `apply` table also run with SOAA's step compiled
(`SOAA(fused=True)`, mode "eager, fused=True"); on torch,
`mlp_small` also counts `torch.compile`'s graph breaks and recompiles (a fresh
process per side). `--models small` alone writes no memory or `apply` table.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# The models of `--models small`: batch 64, timed over `--small-steps`.
SMALL_MODELS = ("mlp_small", "logreg")
# Adam, SOAA + TrustRegionCallback, SOAA with the hypergradient controller.
SIDES = ("adam", "soaa", "soaa_hg")
CONTROLLERS = {"soaa": "paper", "soaa_hg": "hypergradient"}
# torch's eager `fit` with SOAA's step compiled (`SOAA(fused=True)`).
FUSED_MODE = "eager, fused=True"
MODES = {"tensorflow": ["compiled", "eager"], "jax": ["compiled"],
         "torch": ["eager", FUSED_MODE]}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    add = parser.add_argument
    add("--backends", default="tensorflow,jax,torch")
    add("--models", default="mlp,mlp_small,transformer")
    add("--steps", type=int, default=20, help="training steps per timed epoch")
    add("--small-steps", type=int, default=300,
        help="training steps per timed epoch, small models")
    add("--repeats", type=int, default=5)
    add("--apply-params", type=float, default=50e6,
        help="parameters in the optimizer.apply benchmark")
    add("--apply-variables", type=int, default=1, help="variables sharing them")
    add("--output", help="default: benchmarks/results/speed.md (speed_small.md "
        "for small models only)")
    add("--quick", action="store_true",
        help="tiny sizes: checks the script, not the speed")
    add("--system-malloc", action="store_true",
        help="time with glibc's default malloc settings (see HEAP_MALLOC)")
    for hidden in ("--worker", "--memory-of", "--compile-of"):
        add(hidden, help=argparse.SUPPRESS)
    add("--memory-fused", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.models = ",".join(",".join(SMALL_MODELS) if m == "small" else m
                           for m in args.models.split(","))
    if args.output is None:
        name = "speed_small.md" if only_small(args) else "speed.md"
        args.output = str(HERE / "results" / name)
    return args


def only_small(args):
    """Whether every model is small (no memory or `apply` tables then)."""
    return all(name in SMALL_MODELS for name in args.models.split(","))


# --- inside a worker process (one backend) ---------------------------------


def make_model(name, quick):
    import keras

    keras.utils.set_random_seed(0)
    if name in ("mlp", "mlp_small"):  # two hidden ReLU layers
        inputs, width = ((64, 128) if name == "mlp_small"
                         else (784, 64 if quick else 1024))
        model = keras.Sequential([
            keras.Input((inputs,)), keras.layers.Dense(width, activation="relu"),
            keras.layers.Dense(width, activation="relu"), keras.layers.Dense(10)])
        return model, "sparse_categorical_crossentropy", (inputs,), 10
    if name == "logreg":
        model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
        return model, "sparse_categorical_crossentropy", (64,), 10
    if name == "transformer":
        length, dim, vocab = (16, 32, 64) if quick else (64, 128, 96)
        inputs = keras.Input((length,), dtype="int32")
        x = keras.layers.Embedding(vocab, dim)(inputs)
        for _ in range(2):
            attention = keras.layers.MultiHeadAttention(4, dim // 4)(
                x, x, use_causal_mask=True)
            x = keras.layers.LayerNormalization()(x + attention)
            hidden = keras.layers.Dense(4 * dim, activation="gelu")(x)
            x = keras.layers.LayerNormalization()(
                x + keras.layers.Dense(dim)(hidden))
        model = keras.Model(inputs, keras.layers.Dense(vocab)(x))
        return model, "sparse_categorical_crossentropy", (length,), vocab
    raise ValueError(name)


def make_data(input_shape, classes, batch, steps, is_sequence):
    import numpy as np

    rng = np.random.default_rng(0)
    n = batch * steps
    if is_sequence:
        x = rng.integers(0, classes, size=(n, *input_shape)).astype("int32")
        y = np.roll(x, -1, axis=1)
    else:
        x = rng.normal(size=(n, *input_shape)).astype("float32")
        y = rng.integers(0, classes, size=(n,)).astype("int32")
    return x, y


def make_optimizer(name, total_steps=None, fused=None):
    """A side's optimizer and callbacks: Adam, or SOAA with the side's controller
    and `fused` (preset `recommended` given `total_steps`; the paper's needs
    the callback)."""
    import keras

    import keras_soaa

    if name == "adam":
        return keras.optimizers.Adam(1e-3), []
    controller = CONTROLLERS[name]
    optimizer = (keras_soaa.SOAA(1e-3, controller=controller, fused=fused)
                 if total_steps is None else keras_soaa.presets.recommended(
                     1e-3, total_steps, controller=controller, fused=fused))
    return optimizer, ([keras_soaa.TrustRegionCallback()]
                       if controller == "paper" else [])


def epoch_timer():
    """Records each epoch's wall-clock time in `.seconds` (no batch hook)."""
    import keras

    class Timer(keras.callbacks.Callback):
        seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self.start)

    return Timer()


def state_bytes(optimizer):
    """Bytes of the optimizer's variables (its whole state)."""
    import keras
    import numpy as np

    return sum(int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(
        v.dtype)).itemsize for v in optimizer.variables)


def time_fit(model_name, mode, args):
    """Median ms/step of each side in `fit`, timed alternately."""
    import keras

    small = model_name in SMALL_MODELS
    batch = 64 if small else 32 if args.quick else 256
    steps = (args.small_steps if small and not (
        mode == "eager" and keras.backend.backend() == "jax") else args.steps)
    runs = {}
    for opt_name in SIDES:
        model, loss, input_shape, classes = make_model(model_name, args.quick)
        optimizer, callbacks = make_optimizer(
            opt_name, steps * (args.repeats + 1) if small else None,
            fused=True if mode == FUSED_MODE else None)
        model.compile(optimizer=optimizer, loss=loss,
                      run_eagerly=mode.startswith("eager"),
                      jit_compile=(mode == "compiled"))
        x, y = make_data(input_shape, classes, batch, steps,
                         model_name == "transformer")
        timer = epoch_timer()
        runs[opt_name] = (model, x, y, callbacks + [timer], timer)
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                  callbacks=callbacks)  # warm-up: tracing and compilation
    for _ in range(args.repeats):
        for opt_name in SIDES:
            model, x, y, callbacks, _ = runs[opt_name]
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0,
                      shuffle=False, callbacks=callbacks)
    result = {}
    for opt_name, (model, *_, timer) in runs.items():
        result[opt_name] = 1000 * statistics.median(timer.seconds) / steps
        result[f"{opt_name}_state_bytes"] = state_bytes(model.optimizer)
    return result


def custom_loop_step(model, loss_fn, optimizer, observe):
    """`step(x, y) -> loss` (on the device) of a custom loop: gradients, `apply`
    and, if `observe`, `observe_loss` (how a loop without `fit` feeds SOAA)."""
    import keras

    backend = keras.backend.backend()
    variables = model.trainable_variables
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            optimizer.apply(tape.gradient(loss, variables), variables)
            if observe:
                optimizer.observe_loss(loss)
            return loss

        return step
    if backend == "jax":
        import jax

        def loss_and_state(trainable, non_trainable, x, y):
            y_pred, non_trainable = model.stateless_call(
                trainable, non_trainable, x, training=True)
            return loss_fn(y, y_pred), non_trainable

        @jax.jit
        def jax_step(state, x, y):
            trainable, non_trainable, optimizer_values = state
            (loss, non_trainable), grads = jax.value_and_grad(
                loss_and_state, has_aux=True)(trainable, non_trainable, x, y)
            trainable, optimizer_values = optimizer.stateless_apply(
                optimizer_values, grads, trainable)
            if observe:
                optimizer_values = optimizer.stateless_observe_loss(
                    optimizer_values, loss)
            return (trainable, non_trainable, optimizer_values), loss

        state = [[v.value for v in model.trainable_variables],
                 [v.value for v in model.non_trainable_variables],
                 [v.value for v in optimizer.variables]]

        def step(x, y):
            state[:], loss = jax_step(tuple(state), x, y)
            return loss

        return step
    import torch

    def step(x, y):
        model.zero_grad()
        loss = loss_fn(y, model(x, training=True))
        loss.backward()
        with torch.no_grad():
            optimizer.apply([v.value.grad for v in variables], variables)
            if observe:
                optimizer.observe_loss(loss.detach())
        return loss

    return step


def time_custom_loop(model_name, args):
    """Median ms/step of each side in a custom loop (`custom_loop_step`, with
    `observe_loss` for the paper's controller), timed alternately."""
    import keras
    import numpy as np

    batch, steps = 64, args.small_steps
    runs = {}
    for opt_name in SIDES:
        model, _, input_shape, classes = make_model(model_name, args.quick)
        optimizer, _ = make_optimizer(opt_name, steps * (args.repeats + 1))
        optimizer.build(model.trainable_variables)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        step = custom_loop_step(model, loss_fn, optimizer, opt_name == "soaa")
        x, y = make_data(input_shape, classes, batch, steps, False)
        batches = [(keras.ops.convert_to_tensor(x[i:i + batch]),
                    keras.ops.convert_to_tensor(y[i:i + batch]))
                   for i in range(0, len(x), batch)]
        step(*batches[0])  # warm-up: tracing and compilation
        runs[opt_name] = (step, batches, optimizer, [])
    for _ in range(args.repeats):
        for opt_name in SIDES:
            step, batches, _, seconds = runs[opt_name]
            start = time.perf_counter()
            for x, y in batches:
                loss = step(x, y)
            np.asarray(keras.ops.convert_to_numpy(loss))  # waits for the last
            seconds.append(time.perf_counter() - start)
    result = {}
    for opt_name, (_, _, optimizer, seconds) in runs.items():
        result[opt_name] = 1000 * statistics.median(seconds) / steps
        result[f"{opt_name}_state_bytes"] = state_bytes(optimizer)
    return result


def time_apply(args, fused=None):
    """Median ms of `apply` on `--apply-params` in `--apply-variables` variables
    (SOAA with `fused`)."""
    import keras
    import numpy as np

    import keras_soaa

    backend = keras.backend.backend()
    count = args.apply_variables
    size = int(args.apply_params / count) if not args.quick else 10_000
    rng = np.random.default_rng(0)
    grads_np = [rng.normal(size=(size,)).astype("float32") for _ in range(count)]
    result, order, steps = {}, SIDES, {}
    for name in order:
        variables = [keras.Variable(np.zeros(size, "float32")) for _ in range(count)]
        optimizer = (keras.optimizers.Adam() if name == "adam" else
                     keras_soaa.SOAA(total_steps=1000, controller=CONTROLLERS[name],
                                     fused=fused))
        optimizer.build(variables)
        grads = [keras.ops.convert_to_tensor(g) for g in grads_np]
        if backend == "tensorflow":
            steps[name] = tf_apply_step(optimizer, variables, grads)
        elif backend == "jax":
            import jax

            state = {"opt": [v.value for v in optimizer.variables],
                     "vars": [v.value for v in variables]}
            def apply(opt_values, grads, values, optimizer=optimizer):
                # The state back in the order it went in, as in `fit`: see
                # memory_passes.jax_apply_hlo (else XLA copies m, v, theta).
                values, opt_values = optimizer.stateless_apply(
                    opt_values, grads, values)
                return opt_values, values

            fn = jax.jit(apply, donate_argnums=(0, 2))

            def step(fn=fn, grads=grads, state=state):
                state["opt"], state["vars"] = fn(state["opt"], grads, state["vars"])
                return state["vars"][0].block_until_ready()
            steps[name] = step
        else:
            import torch

            def step(o=optimizer, grads=grads, v=variables):
                with torch.no_grad():
                    o.apply(grads, v)

            steps[name] = step
        steps[name]()  # warm-up (and compilation)
    timings = {name: [] for name in order}
    for _ in range(args.repeats * 2):
        for name in order:
            start = time.perf_counter()
            steps[name]()
            timings[name].append(time.perf_counter() - start)
    for name in order:
        result[name] = 1000 * statistics.median(timings[name])
    result["params"], result["variables"] = size * count, count
    return result


def tf_apply_step(optimizer, variables, grads):
    """One XLA-compiled `apply`, waiting for its result."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def apply(grads):
        optimizer.apply(grads, variables)
        return variables[0].value[0]

    return lambda: apply(grads).numpy()


def worker(args):
    import keras

    backend = keras.backend.backend()
    out = {"backend": backend, "fit": [], "apply": None}
    for model_name in args.models.split(","):
        modes = MODES[backend]
        if model_name in SMALL_MODELS:
            # The per-batch overhead that matters: compiled `fit`, a custom loop
            # feeding `observe_loss`; eager `fit` on JAX (the Quickstart's) for the MLP.
            modes = [m for m in modes if m != "eager" or backend == "torch"]
            if backend == "jax" and model_name == "mlp_small":
                modes = [*modes, "eager"]
            modes = [*modes, "custom loop"]
        for mode in modes:
            row = (time_custom_loop(model_name, args) if mode == "custom loop"
                   else time_fit(model_name, mode, args))
            row.update(model=model_name, mode=mode)
            out["fit"].append(row)
            print(f"  {backend} {mode} {model_name}: " + ", ".join(
                f"{side} {row[side]:.2f}" for side in SIDES) + " ms/step",
                file=sys.stderr, flush=True)
    if not only_small(args):
        out["apply"] = time_apply(args)
        if backend == "torch":
            out["apply_fused"] = time_apply(args, fused=True)
    print(json.dumps(out))


def memory_worker(args):
    """Peak RSS of a fresh process training the MLP with one optimizer."""
    import resource

    model, loss, input_shape, classes = make_model("mlp", args.quick)
    optimizer, callbacks = make_optimizer(args.memory_of,
                                          fused=True if args.memory_fused else None)
    model.compile(optimizer=optimizer, loss=loss)
    batch = 32 if args.quick else 256
    x, y = make_data(input_shape, classes, batch, args.steps, False)
    model.fit(x, y, batch_size=batch, epochs=2, verbose=0, callbacks=callbacks)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": peak}))


def compile_worker(args):
    """`torch.compile`'s graph breaks and recompiles: 2 epochs of 4 steps, one side."""
    import torch
    from torch._dynamo.utils import (
        clear_compilation_metrics,
        counters,
        get_compilation_metrics,
    )

    model, loss, input_shape, classes = make_model("mlp_small", args.quick)
    optimizer, callbacks = make_optimizer(args.compile_of, 8)
    x, y = make_data(input_shape, classes, 16, 4, False)
    torch.compiler.reset()
    counters.clear()
    clear_compilation_metrics()
    model.compile(optimizer=optimizer, loss=loss, jit_compile=True)
    model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
    print(json.dumps({
        "graph_breaks": sum(counters["graph_break"].values()),
        "reasons": sorted({r.split("\n")[0] for r in counters["graph_break"]}),
        "recompiles": sum(m.recompile_reason is not None
                          for m in get_compilation_metrics()),
        "graphs": counters["stats"]["unique_graphs"],
        "ops": counters["stats"]["calls_captured"]}))


# --- the driver --------------------------------------------------------------


# glibc maps big blocks fresh (page-faulted at each use), its threshold moving with
# past frees: Adam's 50M-parameter torch `apply` took 150 or 450 ms by turns, after
# what SOAA's step had freed. Timing workers keep big blocks on the heap so neither
# side's time depends on the other's allocations (peak memory: system defaults).
HEAP_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "4000000000",
               "MALLOC_TRIM_THRESHOLD_": "8000000000"}


def run_child(backend, extra, env_extra=None):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3",
               **(env_extra or {}))
    result = subprocess.run([sys.executable, __file__, *extra], env=env,
                            text=True, stdout=subprocess.PIPE, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def sides(values, digits=0):
    """`a / b / c`: one figure per side."""
    return " / ".join(f"{values[side]:,.{digits}f}" for side in SIDES)


def format_report(results):
    lines = ["| backend | mode | model | Adam ms/step | SOAA ms/step | ratio "
             "| SOAA-HG ms/step | ratio | state bytes Adam / SOAA / SOAA-HG "
             "| peak RSS MB Adam / SOAA / SOAA-HG |", "|---" * 10 + "|"]
    for result in results:
        for row in result["fit"]:
            memory = result.get("memory_fused" if row["mode"] == FUSED_MODE
                                else "memory")
            peak = (sides(memory) + f" ({memory['soaa'] / memory['adam'] - 1:+.1%}"
                    f", {memory['soaa_hg'] / memory['adam'] - 1:+.1%})"
                    if row["model"] == "mlp" and memory else "")
            lines.append(
                f"| {result['backend']} | {row['mode']} | {row['model']} "
                f"| {row['adam']:.2f} | {row['soaa']:.2f} "
                f"| {row['soaa'] / row['adam']:.3f} | {row['soaa_hg']:.2f} "
                f"| {row['soaa_hg'] / row['adam']:.3f} | " + sides(
                    {s: row[f"{s}_state_bytes"] for s in SIDES}) + f" | {peak} |")
    if compiled := [r for r in results if r.get("compile")]:
        lines += ["", "`torch.compile` (`jit_compile=True`), two epochs of 4 "
                  "steps of mlp_small, each side in a fresh process:", "",
                  "| backend | graph breaks Adam / SOAA / SOAA-HG | recompiles "
                  "| graphs | ops captured | break reasons |", "|---" * 6 + "|"]
        for result in compiled:
            c = result["compile"]
            lines.append(f"| {result['backend']} | " + " | ".join(
                sides({s: c[s][k] for s in SIDES}) for k in
                ("graph_breaks", "recompiles", "graphs", "ops")) + " | " + "; "
                .join(sorted({r for s in SIDES for r in c[s]["reasons"]})) + " |")
    if all(result["apply"] is None for result in results):
        return "\n".join(lines) + "\n"
    lines += ["", "`optimizer.apply` alone (compiled on TF and JAX, eager on "
              "torch):", "", "| backend | parameters | Adam ms | SOAA ms | "
              "ratio | SOAA-HG ms | ratio |", "|---" * 7 + "|"]
    for result in results:
        for key, label in (("apply", ""), ("apply_fused", f" ({FUSED_MODE})")):
            if (a := result.get(key)) is not None:
                lines.append(
                    f"| {result['backend']}{label} | {a['params']:,} in "
                    f"{a['variables']} | {a['adam']:.1f} | {a['soaa']:.1f} | "
                    f"{a['soaa'] / a['adam']:.3f} | {a['soaa_hg']:.1f} | "
                    f"{a['soaa_hg'] / a['adam']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.memory_of:
        return memory_worker(args)
    if args.compile_of:
        return compile_worker(args)
    passthrough = [f"--models={args.models}", f"--steps={args.steps}",
                   f"--small-steps={args.small_steps}", f"--repeats={args.repeats}",
                   f"--apply-params={args.apply_params}",
                   f"--apply-variables={args.apply_variables}",
                   *(["--quick"] if args.quick else [])]
    results = []
    for backend in args.backends.split(","):
        print(f"[{backend}] timing fit and apply ...", flush=True)
        result = run_child(backend, ["--worker", backend, *passthrough],
                           None if args.system_malloc else HEAP_MALLOC)
        if backend == "torch" and "mlp_small" in args.models.split(","):
            print("[torch] counting torch.compile's graph breaks ...", flush=True)
            result["compile"] = {name: run_child(backend, [
                "--compile-of", name, *passthrough]) for name in SIDES}
        results.append(result)
        if not only_small(args):
            for key, extra in (("memory", []), ("memory_fused", ["--memory-fused"])):
                if key == "memory" or backend == "torch":
                    result[key] = {name: run_child(backend, [
                        "--memory-of", name, *extra, *passthrough])["peak_rss_mb"]
                        for name in SIDES}
    report = format_report(results)
    print(report)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(
        "# SOAA vs Keras Adam: speed and memory\n\nCommand: `python "
        f"benchmarks/speed.py {' '.join(argv or sys.argv[1:])}`"
        + ("" if args.system_malloc else " (timed with " + " ".join(
            f"{k}={v}" for k, v in HEAP_MALLOC.items()) + ", see `HEAP_MALLOC`)")
        + f"\n\n{report}")
    print(f"written to {output}")


if __name__ == "__main__":
    main()
