"""Benchmark SOAA against the strongest optimizers Keras ships.

    python benchmarks/compare.py            # the verdict, ~3 min on 2 cores
    python benchmarks/compare.py --quick    # a smoke run, about a minute
    python benchmarks/compare.py --full     # every problem and optimizer
        [--set calibration | held_out | all]
        [--problems digits,rosenbrock | all] [--optimizers soaa,adam,... | all]
        [--backend jax] [--seeds 3] [--steps N] [--lrs 1e-3,3e-3,1e-2]
        [--out DIR [--overwrite]] [--merge DIR]
        [--hd-radius-lr 0.05] [--hd-bounds 0.1,10]

Three modes (their problems, optimizers, seeds, steps and grids are in
`MODES`, listed at the end of `--help`; any option given explicitly
overrides the mode's value):

- default: the verdict: the recommended SOAA configurations against the
  strongest peers, on the set's fast problems (those whose Adam run is
  expected to take at most `FAST_RUN_S` = 1 s by `problems.COSTS`: on the
  calibration set the four small ones, on the held-out set all but
  `shapes_cnn`), with 3 seeds and each problem's own steps and
  learning-rate grid (calibration: about 3 minutes on 2 idle CPU cores, at
  most 10 on busy ones; held-out: about 8).
- `--full`: every problem of the set (also the Transformer and the CNNs)
  and every default optimizer: the results page's tables (calibration: about 20
  minutes on 2 cores; held-out: about 40, most of it `shapes_cnn`).
- `--quick`: a smoke run of every problem of the set with the recommended SOAA, SOAA,
  Adam and ScheduleFreeAdamW: 1 seed, the two middle rates of each grid, 10
  steps (about a minute per set; its numbers mean nothing).

Problem sets (`problems.SETS`, `--set`): `calibration` (the default; the
six problems controllers may be tuned on, the results page's tables),
`held_out` (seven other problems, never looked at while tuning, to judge
an optimizer on) or `all` (both; the report shows each set in its own
section). A mode picks its problems within the set; `--problems` names
problems of either set instead (`all`: every problem of `--set`). The
results are labelled by the set their problems make up (a held-out
problem never lands in a calibration folder or table).

Optimizers:

- `soaa`: `keras_soaa.SOAA`, constant learning rate (the paper's setting).
- `soaa_cosine`: SOAA with `keras.optimizers.schedules.CosineDecay` from the
  grid's rate to 0 over the run.
- `soaa_hd`, `soaa_hd_cosine`: the same two with
  `SOAA(controller="hypergradient")`: the radius follows the gradients
  (hypergradient descent on log d) instead of the observed losses; SOAA's
  defaults for its `radius_learning_rate`, `min_radius` and `max_radius`
  unless `--hd-radius-lr` / `--hd-bounds` set them. `soaa_hd` is the
  recommended configuration (`RECOMMENDED`).
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

Writes to a new folder `runs/benchmark/<mode>-<YYYYmmdd-HHMMSS>/`, or
`runs/benchmark/<mode>-<set>-<YYYYmmdd-HHMMSS>/` when the problems are not
(all) of the calibration set, e.g. `full-held_out-...` (printed at the
start and the end), or to `--out DIR`, which must not hold results yet
unless `--overwrite` is given: `report.md` (tables, and SOAA against the
strongest optimizer of each problem), one PNG per problem (loss vs step and
vs wall-clock, the learning-rate sweep, SOAA's radius with its bounds) and
`results.json` (every run's curves; `python benchmarks/report.py DIR`
redraws the report from it).
"""

import argparse
import dataclasses
import json
import os
import platform
import re
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OPTIMIZERS = ("soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine", "soaa_gr",
              "soaa_gr_cosine", "adam", "adam_cosine", "adamw",
              "schedulefree", "muon", "lion")
# The SOAA configuration the package recommends (`keras_soaa.presets.
# recommended`: the paper's controller with a cosine decay), chosen for its
# worst case on the calibration set: the report's verdict and plots lead
# with it. One place, so it can change.
RECOMMENDED = "soaa_cosine"
# The prototype controllers and configurations of `designs.VARIANTS`, run
# only when named.
DESIGN_OPTIMIZERS = tuple(
    name + suffix
    for name in ("soaa_ratio", "soaa_ratio_log", "soaa_hd_snr",
                 "soaa_ratio_t", "soaa_ratio_log_t", "soaa_hd_floor",
                 "soaa_hd_min1")
    for suffix in ("", "_cosine")
)
QUICK_STEPS = 10
# The problem sets `--set` chooses from (`problems.SETS`'s keys).
SET_NAMES = ("calibration", "held_out", "all")
# The default mode's "fast" problems of a set: an Adam run expected to take
# at most this many seconds (`problems.expected_run_s`, from `COSTS`).
FAST_RUN_S = 1.0
# The benchmark root; each run writes to a new `<mode>-<time>` folder in it.
RUNS = os.path.join("runs", "benchmark")


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a mode runs. `problems`: "all" (every problem of the set) or
    "fast" (those of the set whose Adam run is expected to take at most
    `FAST_RUN_S`); `steps=None`: each problem's own; `grid`: "full" (each
    problem's own grid) or "middle" (its two middle points)."""

    name: str
    summary: str
    problems: str
    optimizers: tuple
    seeds: int
    steps: int | None
    grid: str


MODES = {
    "default": Mode(
        "default",
        "the verdict: the recommended SOAA configurations against the "
        "strongest peers on the set's fast problems (calibration: about 3 "
        "min on 2 idle cores, at most 10 on busy ones)",
        problems="fast",
        optimizers=(RECOMMENDED, "soaa", "soaa_hd", "adam",
                    "adam_cosine", "schedulefree"),
        seeds=3, steps=None, grid="full"),
    "full": Mode(
        "full",
        "every problem of the set and every default optimizer: the README's "
        "tables (calibration: about 20 min on 2 cores)",
        problems="all",
        optimizers=("soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine",
                    "soaa_gr", "soaa_gr_cosine", "adam", "adam_cosine",
                    "schedulefree"),
        seeds=3, steps=None, grid="full"),
    "quick": Mode(
        "quick",
        "a smoke run of every problem of the set (about a minute per set; "
        "numbers mean nothing)",
        problems="all",
        optimizers=(RECOMMENDED, "soaa", "adam", "schedulefree"),
        seeds=1, steps=QUICK_STEPS, grid="middle"),
}
DEFAULT_OPTIMIZERS = MODES["default"].optimizers
FULL_OPTIMIZERS = MODES["full"].optimizers


def modes_text():
    """The modes, as `--help` lists them."""
    lines = textwrap.wrap("modes (an explicit --problems, --optimizers, "
                          "--seeds, --steps or --lrs overrides the mode's):",
                          79)
    for flag, mode in (("(default)", MODES["default"]),
                       ("--full", MODES["full"]), ("--quick", MODES["quick"])):
        grid = ("each problem's own grid" if mode.grid == "full"
                else "the two middle rates of each grid")
        entries = [
            (f"  {flag}: ", mode.summary),
            ("      problems:   ", "all of the set's" if mode.problems == "all"
             else f"the set's fast ones (an Adam run expected ≤ "
             f"{FAST_RUN_S:g} s)"),
            ("      optimizers: ", ", ".join(mode.optimizers)),
            ("      ", f"seeds: {mode.seeds}; steps: "
             + (str(mode.steps) if mode.steps else "each problem's own")
             + f"; {grid}"),
        ]
        lines += [textwrap.fill(text, 79, initial_indent=indent,
                                subsequent_indent=" " * 8)
                  for indent, text in entries]
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=modes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true",
                       help="the smoke run (see modes below)")
    which.add_argument("--full", action="store_true",
                       help="every problem and every default optimizer "
                       "(see modes below)")
    parser.add_argument("--set", default="calibration", choices=SET_NAMES,
                        dest="problem_set",
                        help="the problem set: calibration (tuned on), "
                        "held_out (never tuned on) or all (default: "
                        "calibration)")
    parser.add_argument("--problems", default=None,
                        help="comma-separated problem names of either set, "
                        "or 'all' (every problem of --set) (default: the "
                        "mode's, within --set)")
    parser.add_argument("--optimizers", default=None,
                        help=f"comma-separated, from {', '.join(OPTIMIZERS)}; "
                        "or 'all' (default: the mode's)")
    parser.add_argument("--backend", default=None,
                        help="tensorflow, jax or torch (default: "
                        "$KERAS_BACKEND, else jax)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="number of seeds (default: the mode's)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps for every problem (default: "
                        "the mode's)")
    parser.add_argument("--lrs", default=None,
                        help="comma-separated learning rates used for every "
                        "problem (default: each problem's own grid; its two "
                        "middle points with --quick)")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: a new folder "
                        f"{os.path.join(RUNS, '<mode>-<YYYYmmdd-HHMMSS>')}); "
                        "refused if it already holds results, unless "
                        "--overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --out replace the results already there")
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
    args.mode = "quick" if args.quick else "full" if args.full else "default"
    mode = MODES[args.mode]
    if args.optimizers is None:
        args.optimizers = list(mode.optimizers)
    elif args.optimizers.strip() == "all":
        args.optimizers = list(OPTIMIZERS)
    else:
        args.optimizers = [name.strip() for name in args.optimizers.split(",")]
    unknown = sorted(set(args.optimizers) - set(OPTIMIZERS)
                     - set(DESIGN_OPTIMIZERS))
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {OPTIMIZERS}")
    if args.seeds is None:
        args.seeds = mode.seeds
    if args.steps is None:
        args.steps = mode.steps
    args.middle_grid = mode.grid == "middle"
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


def problem_names(args, problems):
    """The problems to run, in order: `--problems` (any set; `all`: every
    problem of `--set`), else the mode's selection within `--set`.

    `problems`: the `problems` module (imported once the backend is set).
    """
    pool = problems.SETS[args.problem_set]
    if args.problems is None:
        if MODES[args.mode].problems == "all":
            return list(pool)
        return [name for name in pool
                if problems.expected_run_s(name) <= FAST_RUN_S]
    if args.problems.strip() == "all":
        return list(pool)
    names = [name.strip() for name in args.problems.split(",")]
    unknown = sorted(set(names) - set(problems.ALL_PROBLEMS))
    if unknown:
        raise SystemExit(f"unknown problem(s) {unknown}; choose from "
                         f"{', '.join(problems.ALL_PROBLEMS)}")
    return names


def folder_prefix(mode, problem_set="calibration"):
    """`<mode>` for the calibration set, else `<mode>-<set>`."""
    return mode if problem_set == "calibration" else f"{mode}-{problem_set}"


RESULT_FILES = ("results.json", "report.md")


def holds_results(folder):
    """Whether `folder` holds a benchmark's results."""
    return any(os.path.exists(os.path.join(folder, name))
               for name in RESULT_FILES)


def refuse_overwrite(args, root=RUNS):
    """Exits if `--out` holds results and `--overwrite` was not given."""
    if args.out is None or args.overwrite or not holds_results(args.out):
        return
    found = [name for name in RESULT_FILES
             if os.path.exists(os.path.join(args.out, name))]
    raise SystemExit(
        f"--out {args.out} already holds results ({', '.join(found)}): "
        "refusing to overwrite them. Pass --overwrite to replace them, or "
        "leave --out out to write to a new folder "
        f"{os.path.join(root, args.mode + '[-<set>]-<YYYYmmdd-HHMMSS>')}.")


def output_folder(args, root=RUNS, now=None, problem_set=None):
    """The run's folder, created (empty) now; refuses to overwrite results.

    Without `--out`: a new `root/<mode>-<YYYYmmdd-HHMMSS>` for the
    calibration set, `root/<mode>-<set>-<YYYYmmdd-HHMMSS>` for another
    (`problem_set`: the set the run's problems make up, default `--set`;
    `-2`, `-3`, ... appended if that exists already). With `--out DIR`:
    DIR, unless it holds results (`results.json` or `report.md`) and
    `--overwrite` is not given.
    """
    if args.out is not None:
        refuse_overwrite(args, root)
        os.makedirs(args.out, exist_ok=True)
        return args.out
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    prefix = folder_prefix(args.mode, problem_set or args.problem_set)
    base = os.path.join(root, f"{prefix}-{stamp}")
    folder, k = base, 1
    while True:
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            k += 1
            folder = f"{base}-{k}"


def latest_run(root=RUNS, modes=("full", "default"), problem_set="calibration"):
    """The newest `root/<mode>[-<set>]-<time>` folder of `problem_set` with
    a `results.json`, of the first of `modes` that has one; `None` if
    none. (A calibration run's folder has no set in its name.)"""
    if not os.path.isdir(root):
        return None
    for mode in modes:
        pattern = re.compile(re.escape(folder_prefix(mode, problem_set))
                             + r"-\d{8}-\d{6}(-\d+)?")
        folders = sorted(
            name for name in os.listdir(root)
            if pattern.fullmatch(name)
            and os.path.exists(os.path.join(root, name, "results.json")))
        if folders:
            return os.path.join(root, folders[-1])
    return None


def load_previous(folder, seeds):
    """`folder`'s `results.json`, checked before anything runs."""
    path = os.path.join(folder, "results.json")
    if not os.path.exists(path):
        raise SystemExit(f"--merge: {path} does not exist")
    with open(path) as file:
        previous = json.load(file)
    if previous["config"]["seeds"] != seeds:
        raise SystemExit(f"--merge: {folder} has seeds "
                         f"{previous['config']['seeds']}, this run {seeds}")
    return previous


def merge_previous(results, config, folder):
    """Adds `folder`'s runs of the optimizers not run now to `results`."""
    previous = load_previous(folder, config["seeds"])
    added = []
    for name, entry in results.items():
        old = previous["results"].get(name)
        if old is None:
            raise SystemExit(f"--merge: {folder} has no problem {name!r}")
        # (Results from before the sets were named hold no "set".)
        if ({**old["problem"], "set": None}
                != {**entry["problem"], "set": None}):
            raise SystemExit(f"--merge: {name} differs in {folder}")
        merged = {o: r for o, r in old["runs"].items() if o not in entry["runs"]}
        added = list(merged)
        entry["runs"] = {**merged, **entry["runs"]}
    config["optimizers"] = added + config["optimizers"]
    config["merged_from"] = {"folder": folder,
                             "optimizers": added,
                             "minutes": previous["config"]["minutes"],
                             "versions": previous["config"].get("versions")}
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
    refuse_overwrite(args)  # before anything is imported or run
    backend = select_backend(args.backend)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import problems
    import report
    import runner

    runner.HYPERGRADIENT_ARGUMENTS.clear()
    runner.HYPERGRADIENT_ARGUMENTS.update(args.hypergradient)

    names = problem_names(args, problems)
    covered = problems.covered_set(names)
    seeds = list(range(args.seeds))
    if args.merge:
        load_previous(args.merge, seeds)
    out = output_folder(args, problem_set=covered)
    selected = [problems.make_problem(name, args.steps, args.quick)
                for name in names]
    grids = {
        problem.name: args.lrs or (
            quick_grid(problem.lrs) if args.middle_grid else list(problem.lrs)
        )
        for problem in selected
    }
    progress = runner.Progress()
    for problem in selected:
        for optimizer in args.optimizers:
            plan = runner.compiles(optimizer, grids[problem.name], seeds,
                                   args.reuse)
            progress.plan(problem.name, runner.sweep_cost(
                problem, optimizer, grids[problem.name], seeds, args.reuse),
                len(plan))
    config = {
        "command": "python benchmarks/compare.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "mode": args.mode,
        # The set the problems make up ("calibration", "held_out" or "all").
        "set": covered,
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
    print(f"{args.mode} mode, {covered} set: {progress.planned_runs} runs on "
          f"{backend} "
          f"(keras-soaa {config['versions']['keras-soaa']}): "
          f"{', '.join(names)} x {', '.join(args.optimizers)} x "
          f"{len(seeds)} seed(s); expected about "
          f"{runner.clock_text(progress.remaining())} on 2 idle CPU cores",
          flush=True)
    print(f"writing to {out}", flush=True)

    start = time.perf_counter()
    results = {}
    for problem in selected:
        results[problem.name] = {
            "problem": {**runner.describe(problem, grids[problem.name]),
                        "set": problems.problem_set(problem.name)},
            "runs": {
                optimizer: runner.sweep(
                    problem, optimizer, grids[problem.name], seeds,
                    reuse=args.reuse, counter=progress,
                )
                for optimizer in args.optimizers
            },
        }
        runner.free_memory()
    config["minutes"] = (time.perf_counter() - start) / 60
    if args.merge:
        merge_previous(results, config, args.merge)

    with open(os.path.join(out, "results.json"), "w") as file:
        json.dump({"config": config, "results": results}, file)
    written = report.write(results, config, out)
    print(f"done in {config['minutes']:.1f} min; wrote "
          f"{', '.join(written)} to {out}")
    return results, config


if __name__ == "__main__":
    main()
