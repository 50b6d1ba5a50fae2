"""Tunes the hypergradient controller's defaults on a few benchmark problems.

    python benchmarks/tune_controller.py
        [--problems digits,quadratic,rosenbrock,breast_cancer]
        [--seeds 2] [--rates 0.02,0.05,0.1,0.2] [--bounds 0.1,10/0.3,3]
        [--dir runs/tune] [--aggregate-only]
        [--out benchmarks/results/controller_tuning.md]

Runs `compare.py` once for the references (Adam, Adam + cosine,
ScheduleFreeAdamW) and once per (radius_learning_rate, bounds) for
`soaa_hd` (SOAA with `controller="hypergradient"`, constant rate), each over
the problems' full learning-rate grids, then tabulates per setting: the
final training loss at its tuned rate, its ratio to Adam's, the radius'
interior fraction, and the controller targets T1-T3 (`report.target_figures`).
`--aggregate-only` re-reads the runs already in `--dir`.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCES = ("adam", "adam_cosine", "schedulefree")
LEARNING_PROBLEMS_NOTE = (
    "Rosenbrock is left out of the geometric mean: every weight is in the "
    "Fisher regime there, where d cancels out of the step, so the "
    "controller's setting changes nothing (same loss in every row)."
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems",
                        default="digits,quadratic,rosenbrock,breast_cancer")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rates", default="0.02,0.05,0.1,0.2")
    parser.add_argument("--bounds", default="0.1,10/0.3,3",
                        help="min,max pairs separated by '/'")
    parser.add_argument("--dir", default=os.path.join("runs", "tune"))
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "controller_tuning.md"))
    return parser.parse_args(argv)


def settings(args):
    return [(float(rate), bounds) for bounds in args.bounds.split("/")
            for rate in args.rates.split(",")]


def folder(args, rate, bounds):
    return os.path.join(args.dir, f"hd_{rate:g}_{bounds}")


def main(argv=None):
    args = parse_args(argv)
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import compare

    common = ["--problems", args.problems, "--seeds", str(args.seeds),
              "--overwrite"]
    if not args.aggregate_only:
        compare.main(common + ["--optimizers", ",".join(REFERENCES),
                               "--out", os.path.join(args.dir, "base")])
        for rate, bounds in settings(args):
            compare.main(common + ["--optimizers", "soaa_hd",
                                   "--hd-radius-lr", str(rate),
                                   "--hd-bounds", bounds,
                                   "--out", folder(args, rate, bounds)])
    text = aggregate(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        file.write(text)
    print(text)


def aggregate(args):
    import numpy as np
    import report

    with open(os.path.join(args.dir, "base", "results.json")) as file:
        base = json.load(file)
    names = list(base["results"])
    rows, references = [], {}
    for rate, bounds in settings(args):
        path = os.path.join(folder(args, rate, bounds), "results.json")
        with open(path) as file:
            tuned = json.load(file)
        per_problem, cells = {}, []
        for name in names:
            merged = {"problem": base["results"][name]["problem"],
                      "runs": {**base["results"][name]["runs"],
                               **tuned["results"][name]["runs"]}}
            summary = report.summarize(merged)
            references.setdefault(name, {
                o: summary[o]["final"]["mean"] for o in REFERENCES})
            figures = report.target_figures(summary, "soaa_hd")
            per_problem[name] = figures
            item = summary["soaa_hd"]
            figures["ratio_to_adam"] = (item["final"]["mean"]
                                        / summary["adam"]["final"]["mean"])
            cells.append(f"{item['final']['mean']:.4g} ({item['lr']:g}; "
                         f"{figures['interior']:.0%})")
        learning = [n for n in names if n != "rosenbrock"]
        geo = math.exp(np.mean([math.log(per_problem[n]["ratio_to_adam"])
                                for n in learning]))
        verdicts = report.target_verdicts(per_problem)
        tally = (f"{verdicts['T1']['share_at_most_0.8']:.0%} / "
                 f"{verdicts['T2']['share_ties_or_wins']:.0%} / "
                 f"{verdicts['T3']['share_wider']:.0%}")
        rows.append((geo, f"| {rate:g} | [{bounds.replace(',', ', ')}] | "
                     + " | ".join(cells) + f" | {geo:.3f} | {tally} |"))
    best = min(rows)[0]
    lines = [
        "# Tuning the hypergradient controller",
        "",
        f"`python benchmarks/tune_controller.py` ({args.seeds} seeds; each "
        "setting over each problem's full learning-rate grid, constant "
        "rate, `soaa_hd`). A cell: final train loss at the tuned rate, mean "
        "over seeds (tuned rate; share of steps with the radius strictly "
        "inside its bounds). *gm / Adam*: geometric mean over the learning "
        "problems of the final loss over tuned Adam's (< 1: lower than "
        "Adam). *T1 / T2 / T3*: share of problems where the steps to Adam's "
        "final loss are ≤ 0.8x Adam's / it ties or beats the best of Adam + "
        "cosine and ScheduleFreeAdamW / its within-2x range of rates is "
        "wider than Adam's. " + LEARNING_PROBLEMS_NOTE,
        "",
        "| radius_learning_rate | bounds | " + " | ".join(names)
        + " | gm / Adam | T1 / T2 / T3 |",
        "|---|---|" + "---|" * len(names) + "---|---|",
        *[("| **" + line[2:].replace(" |", "** |", 1)) if geo == best
          else line for geo, line in rows],
        "| references: Adam | | " + " | ".join(
            f"{references[n]['adam']:.4g}" for n in names) + " | 1 | |",
        "| Adam + cosine | | " + " | ".join(
            f"{references[n]['adam_cosine']:.4g}" for n in names) + " | | |",
        "| ScheduleFreeAdamW | | " + " | ".join(
            f"{references[n]['schedulefree']:.4g}" for n in names) + " | | |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
