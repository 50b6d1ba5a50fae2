"""Benchmark SOAA against the strongest optimizers Keras ships.

    python benchmarks/compare.py            # the verdict: ~4 min on 2 cores
    python benchmarks/compare.py --quick    # a smoke run, 1 to 2 min
    python benchmarks/compare.py --full     # every problem, the results tables
        [--set calibration | held_out | all] [--problems a,b | all]
        [--optimizers a,b | all] [--seeds N] [--steps N] [--lrs 1e-3,1e-2]
        [--backend jax] [--out DIR [--overwrite]] [--merge DIR] [--no-reuse]

It ends with its verdict: the recommended SOAA (`soaa_sb_cosine`, which is
`keras_soaa.presets.recommended`: the same-batch controller, cosine decay of
the rate to 0) against each problem's best peer (of tuned Adam, Adam + cosine and
ScheduleFreeAdamW): its worst ratio of final training loss to the best peer's,
the problems it wins, ties and loses, and where the report is.

Three modes, listed at the end (times: 2 CPU cores, JAX); an explicit option
overrides the mode's. Sets: calibration (the six problems SOAA's configurations
were chosen on), held_out (ten others, never tuned on) or all (reported
apart); `--problems` names problems of either set.

Fair by construction: every optimizer gets a problem's rate grid, seeds
(initial weights, batch order) and steps, in `model.fit` (SOAA with
`TrustRegionCallback`), and keeps the rate of lowest mean final training loss
(the mean of the last 10% of steps). Runs copy fresh weights and optimizer
state into a model compiled once per (problem, optimizer), or per rate if
scheduled (`--no-reuse`: per run).

Optimizers: the rows of `optimizers.OPTIMIZERS`; problems: `problems.PROBLEMS`.
Writes to a new `runs/benchmark/<mode>[-<set>]-<time>/` (the set named unless
calibration) or `--out DIR` (refused if it holds results, unless
`--overwrite`): `report.md` (verdict, tables, worst case per optimizer), a PNG
per problem and `results.json` (every run's curves; `python
benchmarks/report.py DIR` redraws the report). `--merge DIR` adds a previous
run's optimizers (same problems, seeds and grids).
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
QUICK_STEPS = 10
# The default mode's problems: an Adam run expected to take at most this many
# seconds (`Problem.expected_s`).
FAST_RUN_S = 1.0
# Each run writes to a new `<mode>[-<set>]-<time>` folder in here.
RUNS = os.path.join("runs", "benchmark")
RESULT_FILES = ("results.json", "report.md")


@dataclasses.dataclass(frozen=True)
class Mode:
    """`problems`: "all" or "fast"; `steps=None`: each problem's own; `grid`:
    "full" (each problem's own) or "middle" (its two middle rates)."""

    summary: str
    problems: str
    optimizers: tuple
    seeds: int
    steps: int | None
    grid: str


MODES = {
    "default": Mode("the verdict, about 4 min on the calibration set "
                    "(measured: 4 min 30 s, the cores shared), about 10 held-out",
                    "fast",
                    ("soaa_sb_cosine", "soaa_cosine", "soaa", "adam",
                     "adam_cosine", "schedulefree"), 3, None, "full"),
    "full": Mode("the results tables, about 20 min on the calibration set "
                 "(about 2 h held-out)", "all",
                 ("soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine", "soaa_gr",
                  "soaa_gr_cosine", "soaa_sb", "soaa_sb_cosine", "adam",
                  "adam_cosine", "schedulefree"),
                 3, None, "full"),
    "quick": Mode("a smoke run, 1 to 2 min on the calibration set, about 4 "
                  "held-out (its numbers mean nothing)", "all",
                  ("soaa_sb_cosine", "soaa", "adam", "schedulefree"), 1, QUICK_STEPS,
                  "middle"),
}


def modes_text():
    """The modes, as `--help` lists them."""
    lines = ["modes:"]
    for flag, mode in zip(("(default)", "--full", "--quick"), MODES.values()):
        text = (f"{mode.summary}. Problems: "
                + ("every one of the set" if mode.problems == "all" else
                   f"the set's fast ones (an Adam run ≤ {FAST_RUN_S:g} s: "
                   "4 calibration, 7 held-out)")
                + f"; optimizers: {', '.join(mode.optimizers)}; seeds: "
                f"{mode.seeds}; steps: {mode.steps or 'each problem' + chr(39) + 's'}; "
                + ("each problem's grid" if mode.grid == "full"
                   else "the two middle rates of each grid") + ".")
        lines.append(textwrap.fill(text, 79, initial_indent=f"  {flag}: ",
                                   subsequent_indent="      ", break_on_hyphens=False))
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, epilog=modes_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true", help="the smoke run")
    which.add_argument("--full", action="store_true", help="every problem of the "
                       "set, every optimizer of the results tables")
    add = parser.add_argument
    add("--set", default="calibration", dest="problem_set",
        choices=("calibration", "held_out", "all"),
        help="the problem set (default: calibration)")
    add("--problems", help="comma-separated names of either set, or 'all' (every "
        "one of --set)")
    add("--optimizers", help="comma-separated rows of optimizers.OPTIMIZERS, or 'all'")
    add("--backend", help="tensorflow, jax or torch (default: $KERAS_BACKEND, else "
        "jax)")
    add("--seeds", type=int, help="number of seeds")
    add("--steps", type=int, help="steps of every problem")
    add("--lrs", help="comma-separated learning rates for every problem (default: "
        "each problem's grid)")
    add("--out", help=f"output folder (default: a new one under {RUNS}); refused if "
        "it holds results")
    add("--overwrite", action="store_true", help="let --out replace the results there")
    add("--merge", help="a previous run's folder: its runs of the optimizers not run "
        "now join this report")
    add("--no-reuse", dest="reuse", action="store_false",
        help="compile a new model for every run")
    args = parser.parse_args(argv)
    args.mode = "quick" if args.quick else "full" if args.full else "default"
    mode = MODES[args.mode]
    args.optimizers = (list(mode.optimizers) if args.optimizers is None
                       else [o.strip() for o in args.optimizers.split(",")])
    args.seeds = mode.seeds if args.seeds is None else args.seeds
    args.steps = args.steps or mode.steps
    args.middle_grid = mode.grid == "middle"
    if args.lrs is not None:
        args.lrs = [float(lr) for lr in args.lrs.split(",")]
    return args


def select_backend(requested):
    """Sets `KERAS_BACKEND` before Keras is imported; returns the backend."""
    if "keras" in sys.modules:
        backend = sys.modules["keras"].backend.backend()
        if requested not in (None, backend):
            raise SystemExit(f"Keras is already imported with {backend}")
        return backend
    os.environ["KERAS_BACKEND"] = backend = (
        requested or os.environ.get("KERAS_BACKEND") or "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return backend


def chosen_problems(args):
    """`--problems` (either set; `all`: all of `--set`), else the mode's in `--set`."""
    import problems

    pool = problems.in_set(args.problem_set)
    if args.problems is None:
        return [name for name in pool if MODES[args.mode].problems == "all"
                or problems.PROBLEMS[name].expected_s() <= FAST_RUN_S]
    if args.problems.strip() == "all":
        return pool
    names = [name.strip() for name in args.problems.split(",")]
    unknown = sorted(set(names) - set(problems.PROBLEMS))
    if unknown:
        raise SystemExit(f"unknown problem(s) {unknown}; choose from "
                         f"{', '.join(problems.PROBLEMS)}")
    return names


def chosen_optimizers(args):
    from optimizers import OPTIMIZERS

    if args.optimizers == ["all"]:
        return list(OPTIMIZERS)
    unknown = sorted(set(args.optimizers) - set(OPTIMIZERS))
    if unknown:
        raise SystemExit(f"unknown optimizer(s) {unknown}; choose from "
                         f"{', '.join(OPTIMIZERS)}")
    return args.optimizers


def refuse_overwrite(args):
    """Exits if `--out` holds results and `--overwrite` was not given."""
    found = [name for name in RESULT_FILES if args.out is not None
             and os.path.exists(os.path.join(args.out, name))]
    if found and not args.overwrite:
        raise SystemExit(
            f"--out {args.out} already holds results ({', '.join(found)}): "
            "refusing to overwrite them. Pass --overwrite to replace them, or "
            f"leave --out out to write to a new folder under {RUNS}.")


def output_folder(args, root=RUNS, now=None, problem_set=None):
    """`--out` (checked by `refuse_overwrite`), else a new empty folder
    `root/<mode>[-<set>]-<YYYYmmdd-HHMMSS>[-k]` (the set named unless calibration)."""
    if args.out is not None:
        refuse_overwrite(args)
        os.makedirs(args.out, exist_ok=True)
        return args.out
    problem_set = problem_set or args.problem_set
    prefix = args.mode + ("" if problem_set == "calibration" else f"-{problem_set}")
    base = os.path.join(root, prefix + time.strftime("-%Y%m%d-%H%M%S",
                                                     time.localtime(now)))
    folder, k = base, 1
    while True:
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            k += 1
            folder = f"{base}-{k}"


def load_previous(folder, seeds):
    """`--merge`'s `results.json`, checked before anything runs."""
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
    previous = load_previous(folder, config["seeds"])["results"]
    added = []
    for name, entry in results.items():
        if previous.get(name, {}).get("problem") != entry["problem"]:
            raise SystemExit(f"--merge: {folder} has no problem {name!r} as this run "
                             "has it")
        old = previous[name]["runs"]
        added = [o for o in old if o not in entry["runs"]]
        entry["runs"] = {**{o: old[o] for o in added}, **entry["runs"]}
    config["optimizers"] = added + config["optimizers"]
    config["merged_from"] = {"folder": folder, "optimizers": added}


def main(argv=None):
    args = parse_args(argv)
    refuse_overwrite(args)  # before anything is imported or run
    backend = select_backend(args.backend)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import keras
    import problems
    import report
    import runner

    names, optimizer_names = chosen_problems(args), chosen_optimizers(args)
    seeds = list(range(args.seeds))
    if args.merge:
        load_previous(args.merge, seeds)
    covered = problems.covered_set(names)
    selected = [problems.get(name, args.steps, args.quick) for name in names]
    grids = {p.name: args.lrs or (p.lrs[max(0, len(p.lrs) // 2 - 1):len(p.lrs) // 2 + 1]
                                  if args.middle_grid else p.lrs) for p in selected}
    weights = [w for p in selected for o in optimizer_names
               for w in runner.weights(p, o, grids[p.name], seeds, args.reuse)]
    progress = runner.Progress(sum(weights), len(weights))
    config = {
        "command": "python benchmarks/compare.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "mode": args.mode, "set": covered, "backend": backend,
        "versions": runner.versions(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "seeds": seeds,
        "optimizers": optimizer_names, "reuse": args.reuse, "quick": args.quick,
    }
    out = output_folder(args, problem_set=covered)
    print(f"{args.mode} mode, {covered} set: {len(weights)} runs on {backend} "
          f"(keras-soaa {config['versions']['keras-soaa']}): "
          f"{', '.join(names)} x {', '.join(optimizer_names)} x {len(seeds)} "
          f"seed(s); roughly {sum(weights) / 60:.1f} min on 2 idle CPU cores\n"
          f"writing to {out}", flush=True)
    start = time.perf_counter()
    results = {}
    for problem in selected:
        results[problem.name] = {
            "problem": problem.describe(grids[problem.name]),
            "runs": {name: runner.sweep(problem, name, grids[problem.name],
                                        seeds, args.reuse, progress)
                     for name in optimizer_names}}
        keras.backend.clear_session()
    config["minutes"] = (time.perf_counter() - start) / 60
    if args.merge:
        merge_previous(results, config, args.merge)
    with open(os.path.join(out, "results.json"), "w") as file:
        json.dump({"config": config, "results": results}, file)
    report.write(results, config, out)
    print(f"\ndone in {config['minutes']:.1f} min"
          + (" (a --quick smoke run: its numbers mean nothing)" if args.quick else ""))
    for set_name in ("calibration", "held_out"):
        part = {p: report.summarize(e) for p, e in results.items()
                if e["problem"]["set"] == set_name}
        if part:
            print(f"\nVerdict, {set_name} set: "
                  + "\n  ".join(report.verdict_lines(part)))
    print(f"\nreport: {os.path.join(out, 'report.md')}")
    return results, config


if __name__ == "__main__":
    main()
