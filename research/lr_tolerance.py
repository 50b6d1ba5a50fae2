# ruff: noqa: D205, D209
"""Learning-rate tolerance: each optimizer at 10x below and 10x above its tuned rate.

    python research/lr_tolerance.py RUN_DIR [RUN_DIR ...] --optimizers a,b \
        [--seeds 3] [--out FILE] [--runs-out FOLDER]

For every problem of the `benchmarks/compare.py` run folders given and every
optimizer named, the tuned rate is the one of that run (the lowest mean final
training loss over seeds, as the report's). The optimizer then trains at
`tuned / 10` and `tuned * 10` with the same seeds and steps; a side is
*tolerant* when its mean final training loss is at most twice the tuned one
(a diverged seed is not). The table gives, per optimizer, the problems where
both sides are tolerant, and each side's count; `--runs-out` keeps the new runs
(`results.json` in `compare.py`'s format) so the table can be rebuilt with
`--from-runs`.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

FACTOR = 10.0  # how far either side of the tuned rate
TOLERANCE = 2.0  # a side is tolerant within this factor of the tuned loss


def tuned(entry, optimizer):
    """`(rate, mean final loss)` of `optimizer`'s tuned run in a problem's entry."""
    import report

    item = report.summarize({"problem": entry["problem"],
                             "runs": {optimizer: entry["runs"][optimizer]}})[optimizer]
    return item["lr"], item["final"]["mean"]


def side_loss(records):
    """The mean final training loss over seeds; `inf` if a seed diverged."""
    finals = [r["final_loss"] for r in records]
    return math.inf if any(f is None for f in finals) else sum(finals) / len(finals)


def run_sides(results, optimizers, seeds):
    """Trains every (problem, optimizer) at both sides; `{problem: {optimizer:
    {repr(rate): records}}}`."""
    import keras
    import problems
    import runner

    out = {}
    for name, entry in results.items():
        problem = problems.get(name, entry["problem"]["steps"], False)
        out[name] = {}
        for optimizer in optimizers:
            rate, _ = tuned(entry, optimizer)
            out[name][optimizer] = runner.sweep(
                problem, optimizer, [rate / FACTOR, rate * FACTOR], seeds)
        keras.backend.clear_session()
    return out


def rows(results, sides, optimizers):
    """One table row per optimizer: both sides tolerant, below, above, and the
    problems where it is not."""
    from optimizers import label

    lines = ["| optimizer | both sides within 2x | 10x below | 10x above | "
             "not tolerant on |", "|---|---|---|---|---|"]
    for optimizer in optimizers:
        both = below = above = total = 0
        misses = []
        for name, entry in results.items():
            if optimizer not in sides.get(name, {}):
                continue
            rate, best = tuned(entry, optimizer)
            runs = sides[name][optimizer]
            low = side_loss(runs[repr(rate / FACTOR)]) <= TOLERANCE * best
            high = side_loss(runs[repr(rate * FACTOR)]) <= TOLERANCE * best
            total += 1
            below += low
            above += high
            both += low and high
            if not (low and high):
                misses.append(name + (" (below)" if not low else "")
                              + (" (above)" if not high else ""))
        lines.append(f"| {label(optimizer)} | {both} of {total} | {below} | {above} | "
                     f"{', '.join(misses) or '-'} |")
    return lines


def main(argv=None):
    """Runs (or, with `--from-runs`, reads) both sides; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="compare.py run folders")
    parser.add_argument("--optimizers", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--problems", help="comma-separated; default every one")
    parser.add_argument("--from-runs", help="a --runs-out folder to read instead "
                        "of training")
    parser.add_argument("--runs-out", help="a folder to keep the new runs in")
    parser.add_argument("--out", help="a Markdown file for the table")
    args = parser.parse_args(argv)
    import compare

    compare.select_backend(None)
    import candidates

    candidates.install()
    optimizers = [o.strip() for o in args.optimizers.split(",")]
    from trust_region_candidates import emit, load

    results = load(args.runs)
    if args.problems:
        results = {p: results[p] for p in args.problems.split(",")}
    if args.from_runs:
        sides = {}
        for folder in args.from_runs.split(","):
            with open(os.path.join(folder, "results.json")) as file:
                for name, by_optimizer in json.load(file)["sides"].items():
                    sides.setdefault(name, {}).update(by_optimizer)
    else:
        sides = run_sides(results, optimizers, list(range(args.seeds)))
        if args.runs_out:
            os.makedirs(args.runs_out, exist_ok=True)
            with open(os.path.join(args.runs_out, "results.json"), "w") as file:
                json.dump({"command": "python research/lr_tolerance.py "
                           + " ".join(sys.argv[1:] if argv is None else argv),
                           "sides": sides}, file)
    sets = sorted({e["problem"].get("set", "?") for e in results.values()})
    emit("\n".join([
        f"# Learning-rate tolerance ({', '.join(sets)}): the tuned rate / {FACTOR:g} "
        f"and x {FACTOR:g}, within {TOLERANCE:g}x of the tuned final training loss",
        "", f"Problems: {', '.join(results)}.", "",
        *rows(results, sides, optimizers)]), args.out)


if __name__ == "__main__":
    main()
