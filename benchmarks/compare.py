"""Benchmark SOAA against the strongest optimizers Keras ships.

    python benchmarks/compare.py [--problems digits,rosenbrock] [--quick]
        [--optimizers soaa,adam,schedulefree,muon | all] [--backend jax]
        [--seeds 3] [--steps N] [--lrs 1e-3,3e-3,1e-2] [--out runs/benchmark]
        [--hd-radius-lr 0.05] [--hd-bounds 0.1,10] [--merge runs/benchmark]

Optimizers (default: soaa, soaa_cosine, soaa_hd, soaa_hd_cosine, soaa_gr,
soaa_gr_cosine, adam, adam_cosine, schedulefree):

- `soaa`: `keras_soaa.SOAA`, constant learning rate (the paper's setting).
- `soaa_cosine`: SOAA with `keras.optimizers.schedules.CosineDecay` from the
  grid's rate to 0 over the run.
- `soaa_hd`, `soaa_hd_cosine`: the same two with
  `SOAA(controller="hypergradient")`: the radius follows the gradients
  (hypergradient descent on log d) instead of the observed losses; SOAA's
  defaults for its `radius_learning_rate`, `min_radius` and `max_radius`
  unless `--hd-radius-lr` / `--hd-bounds` set them.
- `soaa_gr`, `soaa_gr_cosine`: the same two with
  `SOAA(controller="gradient_ratio")` at its defaults: the radius follows
  the smoothed ratio of actual to predicted reduction, both read from the
  gradients.
- `adam`, `adam_cosine`: Keras' Adam, constant or with the same cosine decay.
- `adamw`: Keras' AdamW (weight decay 0.004).
- `schedulefree`: `keras.optimizers.ScheduleFreeAdamW`. Keras keeps its
  interpolated point y in the weights; the held-out metric is reported at y
  and at the averaged point x = (y − (1 − β1)·z) / β1 its authors evaluate
  (computed on the weights for the evaluation only, then y is put back).
- `muon`: `keras.optimizers.Muon`, its AdamW fallback for non-2-D variables,
  embeddings and (via `exclude_layers`) the output layer.
- `lion`: `keras.optimizers.Lion`.

All run with Keras' default arguments apart from the learning rate.

Fair by construction: for every problem, every optimizer is trained with the
same log-spaced learning-rate grid, the same seeds (a seed fixes the initial
weights and the batch order) and the same number of steps, through
`model.fit`; SOAA always with `keras_soaa.TrustRegionCallback()`, which sets
its `total_steps`. The rate kept for each optimizer is the one with the lowest
mean final training loss over seeds (the mean loss of the last 10% of steps).
Each (problem, optimizer) pair is compiled once (the cosine variants once
per learning rate: a schedule is fixed when the optimizer is made): every run
then starts from freshly initialised weights and a fresh optimizer state
copied into the compiled model (`--no-reuse` compiles a new model per run).

Writes to `--out`: `report.md` (tables, and SOAA against the strongest
optimizer of each problem), one PNG per problem (loss vs step and vs
wall-clock, the learning-rate sweep, SOAA's radius with its bounds)
and `results.json` (every run's curves; `python benchmarks/report.py DIR`
redraws the report from it).
"""

import argparse
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = ("soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine", "soaa_gr",
              "soaa_gr_cosine", "adam", "adam_cosine", "adamw",
              "schedulefree", "muon", "lion")
DEFAULT_OPTIMIZERS = ("soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine",
                      "soaa_gr", "soaa_gr_cosine", "adam", "adam_cosine",
                      "schedulefree")
# Issue 17's prototype controllers (`designs.py`), run only when named.
DESIGN_OPTIMIZERS = tuple(
    name + suffix
    for name in ("soaa_ratio", "soaa_ratio_log", "soaa_hd_snr",
                 "soaa_ratio_t", "soaa_ratio_log_t")
    for suffix in ("", "_cosine")
)
QUICK_STEPS = 10


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--problems", default="all",
                        help="comma-separated problem names, or 'all'")
    parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                        help=f"comma-separated, from {', '.join(OPTIMIZERS)}; "
                        "or 'all'")
    parser.add_argument("--backend", default=None,
                        help="tensorflow, jax or torch (default: "
                        "$KERAS_BACKEND, else jax)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (default 3; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps for every problem (default: "
                        "each problem's own; 10 with --quick)")
    parser.add_argument("--lrs", default=None,
                        help="comma-separated learning rates used for every "
                        "problem (default: each problem's own grid; its two "
                        "middle points with --quick)")
    parser.add_argument("--out", default=os.path.join("runs", "benchmark"),
                        help="output folder (default runs/benchmark)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 seed, 2 rates, 10 steps")
    parser.add_argument("--no-reuse", dest="reuse", action="store_false",
                        help="compile a new model for every run")
    parser.add_argument("--hd-radius-lr", type=float, default=None,
                        help="the hypergradient controller's "
                        "radius_learning_rate (default: SOAA's)")
    parser.add_argument("--hd-bounds", default=None,
                        help="the hypergradient controller's min_radius,"
                        "max_radius, e.g. 0.1,10 (default: SOAA's)")
    parser.add_argument("--merge", default=None,
                        help="a previous run's folder: its runs of the "
                        "optimizers not run now join this report (same "
                        "problems, seeds and grids; JAX on CPU is "
                        "deterministic, so they are what a rerun would give)")
    args = parser.parse_args(argv)
    if args.optimizers.strip() == "all":
        args.optimizers = list(OPTIMIZERS)
    else:
        args.optimizers = [name.strip() for name in args.optimizers.split(",")]
    unknown = sorted(set(args.optimizers) - set(OPTIMIZERS)
                     - set(DESIGN_OPTIMIZERS))
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {OPTIMIZERS}")
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.steps is None and args.quick:
        args.steps = QUICK_STEPS
    if args.lrs is not None:
        args.lrs = [float(lr) for lr in args.lrs.split(",")]
    args.hypergradient = {}
    if args.hd_radius_lr is not None:
        args.hypergradient["radius_learning_rate"] = args.hd_radius_lr
    if args.hd_bounds is not None:
        bounds = [float(b) for b in args.hd_bounds.split(",")]
        if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
            parser.error("--hd-bounds takes min_radius,max_radius with "
                         "0 < min_radius <= max_radius")
        args.hypergradient.update(min_radius=bounds[0], max_radius=bounds[1])
    return args


def merge_previous(results, config, folder):
    """Adds `folder`'s runs of the optimizers not run now to `results`."""
    with open(os.path.join(folder, "results.json")) as file:
        previous = json.load(file)
    if previous["config"]["seeds"] != config["seeds"]:
        raise SystemExit(f"--merge: {folder} has seeds "
                         f"{previous['config']['seeds']}, this run "
                         f"{config['seeds']}")
    added = []
    for name, entry in results.items():
        old = previous["results"].get(name)
        if old is None:
            raise SystemExit(f"--merge: {folder} has no problem {name!r}")
        if old["problem"] != entry["problem"]:
            raise SystemExit(f"--merge: {name} differs in {folder}")
        merged = {o: r for o, r in old["runs"].items() if o not in entry["runs"]}
        added = list(merged)
        entry["runs"] = {**merged, **entry["runs"]}
    config["optimizers"] = added + config["optimizers"]
    config["merged_from"] = {"folder": folder,
                             "optimizers": added,
                             "minutes": previous["config"]["minutes"]}
    if "hypergradient" in previous["config"]:
        config.setdefault("hypergradient", previous["config"]["hypergradient"])


def quick_grid(lrs):
    """The two middle points of a grid."""
    middle = len(lrs) // 2
    return list(lrs[max(0, middle - 1):middle + 1])


def select_backend(requested):
    """Sets `KERAS_BACKEND` before Keras is imported; returns the backend."""
    if "keras" in sys.modules:
        backend = sys.modules["keras"].backend.backend()
        if requested and requested != backend:
            raise SystemExit(
                f"Keras is already imported with backend {backend!r}; cannot "
                f"switch to {requested!r} in this process."
            )
        return backend
    backend = requested or os.environ.get("KERAS_BACKEND") or "jax"
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return backend


def main(argv=None):
    args = parse_args(argv)
    backend = select_backend(args.backend)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import problems
    import report
    import runner

    runner.HYPERGRADIENT_ARGUMENTS.clear()
    runner.HYPERGRADIENT_ARGUMENTS.update(args.hypergradient)

    names = (
        list(problems.PROBLEM_NAMES)
        if args.problems == "all"
        else [name.strip() for name in args.problems.split(",")]
    )
    unknown = sorted(set(names) - set(problems.PROBLEM_NAMES))
    if unknown:
        raise SystemExit(
            f"unknown problem(s) {unknown}; choose from {problems.PROBLEM_NAMES}"
        )
    selected = [problems.make_problem(name, args.steps, args.quick)
                for name in names]
    seeds = list(range(args.seeds))
    grids = {
        problem.name: args.lrs or (
            quick_grid(problem.lrs) if args.quick else list(problem.lrs)
        )
        for problem in selected
    }
    total_runs = sum(len(grids[p.name]) for p in selected) * len(seeds) * len(
        args.optimizers
    )
    config = {
        "command": "python benchmarks/compare.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "backend": backend,
        "versions": runner.versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "seeds": seeds,
        "optimizers": args.optimizers,
        "reuse": args.reuse,
        "quick": args.quick,
    }
    if any(runner.is_hypergradient(o) for o in args.optimizers):
        config["hypergradient"] = runner.hypergradient_arguments()
    print(f"{total_runs} runs on {backend}: {', '.join(names)} x "
          f"{', '.join(args.optimizers)} x {len(seeds)} seed(s)", flush=True)

    start = time.perf_counter()
    results = {}
    counter = runner.Counter(total_runs)
    for problem in selected:
        results[problem.name] = {
            "problem": runner.describe(problem, grids[problem.name]),
            "runs": {
                optimizer: runner.sweep(
                    problem, optimizer, grids[problem.name], seeds,
                    reuse=args.reuse, counter=counter,
                )
                for optimizer in args.optimizers
            },
        }
        runner.free_memory()
    config["minutes"] = (time.perf_counter() - start) / 60
    if args.merge:
        merge_previous(results, config, args.merge)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as file:
        json.dump({"config": config, "results": results}, file)
    written = report.write(results, config, args.out)
    print(f"done in {config['minutes']:.1f} min; wrote "
          f"{', '.join(os.path.join(args.out, name) for name in written)}")
    return results, config


if __name__ == "__main__":
    main()
