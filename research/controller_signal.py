# ruff: noqa: D102, D103, D205, D209
"""Does SOAA's trust-region radius carry signal? The three controllers compared.

    python research/controller_signal.py [--results DIR/results.json]
        [--problems digits,quadratic,breast_cancer] [--seeds 3] [--every 10]
        [--lr digits:soaa=0.056 --lr digits:soaa_hd=0.03 ...]
        [--hd-radius-lr 0.05] [--hd-bounds 0.1,10]
        [--out research/results/controller_signal.md]

For each problem and controller (`soaa`: the paper's loss-ratio controller;
`soaa_hd`: `controller="hypergradient"`; `soaa_gr`:
`controller="gradient_ratio"`), at the controller's tuned learning
rate (read from a `benchmarks/compare.py` `results.json` given with
`--results`, or given with `--lr`; else the grid's middle), over the seeds:

(a) **interior fraction**: the share of steps after which the radius d is
    strictly inside its bounds (paper: (1 − γ)^e and 1 + γ^e; hypergradient:
    min_radius and max_radius).
(b) **placebo**: the same seed trained again with the radius trajectory of
    the first run replayed, assigned to `optimizer.radius` before every
    batch, with the controller's own adaptation off (hypergradient:
    its `learning_rate=0`; paper: no `TrustRegionCallback`, so no loss is
    observed, `total_steps` set). Four replays: in time order (a control: it
    must reproduce the first run), shuffled in time over the whole run (the
    placebo), shuffled only within consecutive windows of `--window` steps
    (default 10% of the run: it keeps d's slow trend, e.g. the paper
    bounds' narrowing, and destroys its step-to-step timing), and the
    constant time-average of d (an ablation). If the radius carries signal,
    the shuffled replays end worse than the original; if only the local
    shuffle is harmless, what d carries is a slow trend (a schedule), not
    step-level feedback.
(c) **oracle**: every `--every` steps of the first run, on a fixed probe
    batch, the best multiplier c* in {0.5, 0.7, 1, 1.4, 2} of the next
    step's learning rate: the weights, optimizer and metric variables are
    saved, one step is taken on the next training batch with each
    multiplier, the probe batch's loss is measured after it, and everything
    is restored (the run continues exactly as without the probes). Reported:
    Spearman's rank correlation of d with c* (pooled over the seeds), the
    mean log2 c* and how often c* > 1. A radius that tracked the best step
    size would correlate positively; c* near 1 means the step needs no
    correction. The one-step greedy c* is biased towards small steps
    (short-horizon bias), so read its level with care; the correlation is
    the question.

JAX on CPU by default (deterministic), as `compare.py`.
"""

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
if __name__ == "__main__":
    # The backend must be chosen before Keras is imported (below).
    import compare

    _backend = argparse.ArgumentParser(add_help=False)
    _backend.add_argument("--backend", default=None)
    compare.select_backend(_backend.parse_known_args()[0].backend)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

import keras_soaa  # noqa: E402

CONTROLLERS = ("soaa", "soaa_hd", "soaa_gr")
MULTIPLIERS = (0.5, 0.7, 1.0, 1.4, 2.0)
DEFAULT_PROBLEMS = ("digits", "quadratic", "breast_cancer")
PROBE_ROWS = 256


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None,
        help="a compare.py results.json to read the tuned rates from")
    parser.add_argument("--problems", default=",".join(DEFAULT_PROBLEMS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per run (default: each problem's own)")
    parser.add_argument("--every", type=int, default=10,
                        help="oracle probe every this many steps")
    parser.add_argument("--window", type=int, default=None,
                        help="the local shuffle's window (default: 10%% of "
                        "the steps)")
    parser.add_argument("--lr", action="append", default=[],
                        help="problem:controller=rate, overrides --results")
    parser.add_argument("--hd-radius-lr", type=float, default=None)
    parser.add_argument("--hd-bounds", default=None,
                        help="min_radius,max_radius")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "controller_signal.md"))
    parser.add_argument("--json", default=None,
                        help="also write the raw numbers here")
    return parser.parse_args(argv)


def spearman(a, b):
    """Spearman's rank correlation (average ranks for ties); nan if constant."""
    def ranks(values):
        values = np.asarray(values, "float64")
        order = np.argsort(values, kind="mergesort")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype="float64")
        for value in np.unique(values):  # ties: their mean rank
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    ra, rb = ranks(a), ranks(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])


def shuffled_within(values, window, rng):
    """`values` permuted within consecutive blocks of `window` (the last may
    be shorter): the trend over blocks stays, the order inside goes."""
    values = list(values)
    out = []
    for start in range(0, len(values), window):
        out.extend(rng.permutation(values[start:start + window]).tolist())
    return out


def interior_share(radii, controller, hd, paper_bounds):
    """The share of steps with the radius strictly inside its bounds (on a
    bound: within a relative 1e-5)."""
    radii = np.asarray(radii, "float64")
    steps = len(radii)
    if controller == "soaa":
        lower, upper = paper_bounds(steps)
    else:
        low, high = ((hd["min_radius"], hd["max_radius"])
                     if controller == "soaa_hd" else (0.1, 10.0))
        lower, upper = np.full(steps, low), np.full(steps, high)
    on_bound = ((np.abs(radii - lower) <= 1e-5 * lower)
                | (np.abs(radii - upper) <= 1e-5 * upper))
    return float(1.0 - on_bound.mean())


def used_radii(logged, initial=1.0):
    """The radius each step used: the initial one, then each step's logged one.

    A radius logged after batch t (after that step's adaptation or loss
    observation) is the one step t + 1 uses.
    """
    return [float(initial)] + [float(r) for r in logged[:-1]]


def main(argv=None):
    args = parse_args(argv)
    import optimizers
    import problems
    import report
    import runner

    saved = None
    if args.results is not None:
        with open(args.results) as file:
            saved = json.load(file)
    hd = {"radius_learning_rate": 0.05, "min_radius": 0.1, "max_radius": 10.0}
    if args.hd_radius_lr is not None:
        hd["radius_learning_rate"] = args.hd_radius_lr
    if args.hd_bounds is not None:
        low, high = (float(b) for b in args.hd_bounds.split(","))
        hd.update(min_radius=low, max_radius=high)

    overrides = {}
    for text in args.lr:
        key, value = text.split("=")
        overrides[tuple(key.split(":"))] = float(value)

    def tuned_rate(problem, controller):
        if (problem.name, controller) in overrides:
            return overrides[(problem.name, controller)], "--lr"
        if saved and problem.name in saved["results"] and controller in (
                saved["results"][problem.name]["runs"]):
            summary = report.summarize(saved["results"][problem.name])
            return summary[controller]["lr"], os.path.basename(args.results)
        lrs = problem.lrs
        return lrs[len(lrs) // 2], "grid middle (no tuned rate given)"

    def make(controller, learning_rate, adaptive, total_steps):
        from keras_soaa.controllers import (
            GradientRatioController,
            HypergradientController,
        )

        if controller == "soaa_hd":
            rule = HypergradientController(
                learning_rate=hd["radius_learning_rate"] if adaptive else 0.0,
                min_radius=hd["min_radius"], max_radius=hd["max_radius"])
            return keras_soaa.SOAA(learning_rate=learning_rate, controller=rule)
        if controller == "soaa_gr":  # its defaults
            rule = GradientRatioController(**({} if adaptive
                                              else {"learning_rate": 0.0}))
            return keras_soaa.SOAA(learning_rate=learning_rate, controller=rule)
        # Paper: without `TrustRegionCallback` no loss is observed and the
        # radius stays wherever it is put; `total_steps` set, as a custom
        # loop would (no warning).
        return keras_soaa.SOAA(learning_rate=learning_rate,
                               total_steps=None if adaptive else total_steps)

    results = {"config": {"hypergradient": hd, "seeds": args.seeds,
                          "every": args.every, "window": args.window,
                          "multipliers": MULTIPLIERS,
                          "backend": keras.backend.backend()},
               "problems": {}}
    start = time.perf_counter()
    for name in args.problems.split(","):
        problem = problems.get(name.strip(), args.steps)
        chunk = runner.steps_per_epoch(problem)
        probe_x, probe_y = problem.batches(10_000, max(
            1, PROBE_ROWS // problem.batch_size))
        results["problems"][problem.name] = entry = {}
        for controller in CONTROLLERS:
            lr, source = tuned_rate(problem, controller)
            models = {}

            def compiled(adaptive, controller=controller, lr=lr,
                         models=models, problem=problem):
                if adaptive not in models:
                    runner.seed_everything(0)
                    model = problem.model(0)
                    model.compile(optimizer=make(controller, lr, adaptive,
                                                 problem.steps),
                                  loss=problem.loss())
                    models[adaptive] = model
                return models[adaptive]

            rows = {"lr": lr, "lr_source": source, "seeds": []}
            for seed in range(args.seeds):
                x, y = problem.batches(seed, problem.steps)
                model = compiled(True)
                oracle = OracleProbe(args.every, x, y, problem.batch_size,
                                     probe_x, probe_y, problem.loss())
                original = train(model, problem, seed, x, y, chunk,
                                 make(controller, lr, True, problem.steps),
                                 with_callback=True, extra=[oracle])
                radii = used_radii(original["radius"])
                interior = interior_share(original["radius"], controller, hd,
                                          optimizers.paper_bounds)
                rng = np.random.default_rng(1000 + seed)
                window = args.window or max(2, problem.steps // 10)
                replays = {
                    "in order": radii,
                    "shuffled": list(rng.permutation(radii)),
                    "shuffled locally": shuffled_within(radii, window, rng),
                    "constant mean": [float(np.mean(radii))] * len(radii),
                }
                finals = {"original": original["final"]}
                for label, trajectory in replays.items():
                    replay = RadiusReplay(trajectory)
                    run = train(compiled(False), problem, seed, x, y, chunk,
                                make(controller, lr, False, problem.steps),
                                with_callback=controller != "soaa",
                                extra=[replay])
                    finals[label] = run["final"]
                rows["seeds"].append({
                    "seed": seed, "interior": interior, "finals": finals,
                    "mean_radius": float(np.mean(original["radius"])),
                    "probes": oracle.probes,
                })
                print(f"{problem.name} {controller} seed {seed}: lr {lr:g}, "
                      f"interior {interior:.1%}, finals "
                      + ", ".join(f"{k} {v:.4g}" for k, v in finals.items()),
                      flush=True)
            entry[controller] = rows
        keras.backend.clear_session()
    results["config"]["minutes"] = (time.perf_counter() - start) / 60
    text = markdown(results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        file.write(text)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file)
    print(text)
    print(f"done in {results['config']['minutes']:.1f} min; wrote {args.out}")
    return results


def train(model, problem, seed, x, y, chunk, fresh_optimizer, with_callback,
          extra=()):
    """One run from seed-initialised weights and `fresh_optimizer`'s state.

    Returns the per-batch losses, the radius after each batch and the final
    loss (the benchmark's: mean of the last 10% of steps).
    """
    import runner

    runner.seed_everything(seed)
    fresh = problem.model(seed)
    model.set_weights(fresh.get_weights())
    fresh_optimizer.build(model.trainable_variables)
    target = model.optimizer
    if not target.built:
        target.build(model.trainable_variables)
    if len(target.variables) != len(fresh_optimizer.variables):
        raise RuntimeError("optimizer state layouts differ")
    for variable, value in zip(target.variables, fresh_optimizer.variables):
        variable.assign(value)
    if with_callback and target.get_config()["controller"] == "paper":
        target.total_steps = None  # `TrustRegionCallback` sets it
    callbacks = [*extra, RadiusLog(), runner.Recorder()]
    if with_callback:
        callbacks.insert(0, keras_soaa.TrustRegionCallback())
    model.fit(x, y, batch_size=problem.batch_size,
              epochs=problem.steps // chunk, steps_per_epoch=chunk,
              shuffle=False, verbose=0, callbacks=callbacks)
    losses = np.asarray(callbacks[-1].losses, "float64")
    final = float(np.mean(losses[-max(1, problem.steps // 10):]))
    return {"loss": callbacks[-1].losses, "radius": callbacks[-2].radii,
            "final": final}


class _StepCallback(keras.callbacks.Callback):
    """Counts the steps of a run across `fit`'s epochs."""

    def on_train_begin(self, logs=None):
        self.step = 0

    def on_train_batch_end(self, batch, logs=None):
        self.step += 1


class RadiusLog(_StepCallback):
    """The radius after every batch, read from the optimizer.

    On JAX, reading `self.model` (Keras' `Callback.model`) first writes the
    trainer's state back into the variables, so the read sees this step.
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.radii = []

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        optimizer = self.model.optimizer  # on JAX: syncs the trainer's state
        self.radii.append(float(ops.convert_to_numpy(optimizer.radius)))


class RadiusReplay(_StepCallback):
    """Assigns `radii[t]` to `optimizer.radius` before step t (0-based).

    On JAX, reading `self.model` writes the trainer's state back into the
    variables and makes `fit` gather it again before the step, so the
    assignment is what the step uses.
    """

    def __init__(self, radii):
        super().__init__()
        self.radii = [float(r) for r in radii]

    def on_train_batch_begin(self, batch, logs=None):
        self.model.optimizer.radius.assign(self.radii[self.step])


class OracleProbe(_StepCallback):
    """Every `every` steps: the best learning-rate multiplier for the next step.

    Before step t (t = every, 2·every, ...): saves every variable (weights,
    optimizer, metrics), takes the step on the next training batch with the
    rate times each multiplier (`train_on_batch`), measures the probe batch's
    loss after it, and restores everything. Records (t, d, c*, losses).
    """

    def __init__(self, every, x, y, batch_size, probe_x, probe_y, loss,
                 multipliers=MULTIPLIERS):
        super().__init__()
        self.every, self.x, self.y = every, x, y
        self.batch_size = batch_size
        self.probe_x, self.probe_y, self.loss = probe_x, probe_y, loss
        self.multipliers = tuple(multipliers)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.probes = []

    def _variables(self):
        model = self.model
        return (list(model.trainable_variables)
                + list(model.non_trainable_variables)
                + list(model.optimizer.variables)
                + list(model.metrics_variables))

    def probe_loss(self):
        predictions = self.model(self.probe_x, training=False)
        return float(ops.convert_to_numpy(self.loss(self.probe_y, predictions)))

    def on_train_batch_begin(self, batch, logs=None):
        t = self.step
        if t == 0 or t % self.every:
            return
        model = self.model  # on JAX: syncs the trainer's state
        variables = self._variables()
        saved = [ops.convert_to_numpy(v) for v in variables]
        optimizer = model.optimizer
        radius = float(ops.convert_to_numpy(optimizer.radius))
        learning_rate = float(ops.convert_to_numpy(optimizer.learning_rate))
        rows = slice(t * self.batch_size, (t + 1) * self.batch_size)
        losses = []
        try:
            for multiplier in self.multipliers:
                for variable, value in zip(variables, saved):
                    variable.assign(value)
                optimizer.learning_rate = learning_rate * multiplier
                # On JAX, `train_on_batch` writes its state back itself.
                model.train_on_batch(self.x[rows], self.y[rows])
                losses.append(self.probe_loss())
        finally:
            for variable, value in zip(variables, saved):
                variable.assign(value)
        best = self.multipliers[int(min(range(len(losses)),
                                        key=losses.__getitem__))]
        self.probes.append({"step": t, "radius": radius, "best": best,
                            "losses": losses})


def markdown(results):
    config = results["config"]
    hd = config["hypergradient"]
    lines = [
        "# Does the radius carry signal?",
        "",
        "`python research/controller_signal.py` "
        f"({config['backend']}, {config['seeds']} seeds, "
        f"{config.get('minutes', 0):.1f} minutes). Controllers: **paper** "
        "(SOAA's default, the loss-ratio ρ), **hypergradient** "
        "(`controller=\"hypergradient\"`, "
        + ", ".join(f"{k}={v:g}" for k, v in hd.items())
        + ") and **gradient ratio** (`controller=\"gradient_ratio\"`, "
        "SOAA's defaults), each at its tuned learning rate. Finals: the mean training "
        "loss of the last 10% of steps, mean over seeds.",
        "",
        "- **interior**: share of steps with d strictly inside its bounds.",
        "- **replays** (controller off, d assigned before every step): *in "
        "order* reproduces the run (a control), *shuffled* is the placebo "
        "(the whole trajectory permuted), *locally* permutes it only within "
        "consecutive windows of "
        + (f"{config['window']} steps" if config.get("window")
           else "10% of the run")
        + " (d's slow trend stays, its step-to-step timing goes), "
        "*constant* is d's time-average. *÷ original*: the ratio of the "
        "final losses (> 1: the replay is worse, i.e. what it destroyed "
        "mattered); per seed in brackets.",
        f"- **oracle**: every {config['every']} steps, the best multiplier "
        f"c* ∈ {{{', '.join(f'{m:g}' for m in config['multipliers'])}}} of "
        "the next step's rate on a fixed probe batch of 256 rows; ρ_s: "
        "Spearman's correlation of d with c* (pooled over seeds; n/a if d "
        "is constant); mean log2 c*; share of probes with c* > 1.",
        "",
        "| problem | controller | lr | mean d | interior | original | "
        "in order | shuffled (placebo) | shuffled ÷ original | "
        "locally | locally ÷ original | constant mean d | "
        "oracle ρ_s(d, c*) | mean log2 c* | c* > 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"soaa": "paper", "soaa_hd": "hypergradient",
             "soaa_gr": "gradient ratio"}
    for problem, entry in results["problems"].items():
        for controller, rows in entry.items():
            seeds = rows["seeds"]

            def mean(key, seeds=seeds):
                return float(np.mean([s["finals"][key] for s in seeds]))

            def ratio(key, seeds=seeds, mean=mean):
                per_seed = [s["finals"][key] / s["finals"]["original"]
                            for s in seeds]
                return (f"{mean(key) / mean('original'):.3f} "
                        f"({', '.join(f'{r:.2f}' for r in per_seed)})")

            probes = [p for s in seeds for p in s["probes"]]
            rho = spearman([p["radius"] for p in probes],
                           [p["best"] for p in probes])
            log_best = np.log2([p["best"] for p in probes])
            lines.append(
                f"| {problem} | {names[controller]} | {rows['lr']:g} | "
                f"{np.mean([s['mean_radius'] for s in seeds]):.2f} | "
                f"{np.mean([s['interior'] for s in seeds]):.1%} | "
                f"{mean('original'):.4g} | {mean('in order'):.4g} | "
                f"{mean('shuffled'):.4g} | {ratio('shuffled')} | "
                f"{mean('shuffled locally'):.4g} | "
                f"{ratio('shuffled locally')} | "
                f"{mean('constant mean'):.4g} | "
                + ("n/a" if math.isnan(rho) else f"{rho:+.2f}")
                + f" (n={len(probes)}) | {log_best.mean():+.2f} | "
                f"{np.mean(log_best > 0):.0%} |")
    lines += [
        "",
        "Learning rates from: " + "; ".join(
            f"{p} {names[c]} {r['lr_source']}"
            for p, e in results["problems"].items() for c, r in e.items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
