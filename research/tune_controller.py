# ruff: noqa: D102, D103, D205, D209
"""Tunes the hypergradient controller's constants on a few benchmark problems.

    python research/tune_controller.py
        [--problems digits,quadratic,rosenbrock,breast_cancer]
        [--seeds 2] [--rates 0.02,0.05,0.1,0.2] [--bounds 0.1,10/0.3,3]
        [--dir runs/tune] [--aggregate-only]
        [--out research/results/controller_tuning.md]

Runs `benchmarks/compare.py` once for the references (Adam, Adam + cosine,
ScheduleFreeAdamW) and once per (radius_learning_rate, bounds) for SOAA with
`controller="hypergradient"` at a constant rate (each setting added to the
benchmark's optimizer table as a row of its own), each over the problems'
full learning-rate grids, then tabulates per setting: the final training
loss at its tuned rate, its ratio to Adam's, the radius' interior share, and
the targets T1-T3 (`targets.py`). `--aggregate-only` re-reads the runs
already in `--dir`.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
REFERENCES = ("adam", "adam_cosine", "schedulefree")


def parse_args(argv=None):
    """The command line (see the module docstring)."""
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
    """(radius_learning_rate, (min_radius, max_radius), row name) per setting."""
    return [(float(rate), tuple(float(b) for b in bounds.split(",")),
             f"soaa_hd_{rate}_{bounds.replace(',', '_')}")
            for bounds in args.bounds.split("/") for rate in args.rates.split(",")]


def add_rows(args):
    """Adds one row per setting to the benchmark's optimizer table."""
    import numpy as np
    import optimizers

    import keras_soaa
    from keras_soaa.controllers import HypergradientController

    for rate, (low, high), name in settings(args):
        controller = HypergradientController(learning_rate=rate,
                                             min_radius=low, max_radius=high)
        optimizers.OPTIMIZERS[name] = optimizers.Optimizer(
            name, f"SOAA-HD ({rate:g}, [{low:g}, {high:g}])", "tab:red",
            lambda lr, steps, model, controller=controller: keras_soaa.SOAA(
                learning_rate=lr, controller=controller),
            radius_bounds=lambda steps, low=low, high=high: (
                np.full(steps, low), np.full(steps, high)))


def main(argv=None):
    """Runs the settings (unless `--aggregate-only`) and writes the table."""
    args = parse_args(argv)
    import compare

    compare.select_backend(None)
    add_rows(args)
    common = ["--problems", args.problems, "--seeds", str(args.seeds),
              "--overwrite"]
    if not args.aggregate_only:
        compare.main(common + ["--optimizers", ",".join(REFERENCES),
                               "--out", os.path.join(args.dir, "base")])
        for _, _, name in settings(args):
            compare.main(common + ["--optimizers", name,
                                   "--out", os.path.join(args.dir, name)])
    text = aggregate(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        file.write(text)
    print(text)


def aggregate(args):
    """The markdown table, from the runs in `--dir`."""
    import numpy as np
    import report
    import targets

    with open(os.path.join(args.dir, "base", "results.json")) as file:
        base = json.load(file)["results"]
    names = list(base)
    rows, references = [], {}
    for rate, (low, high), setting in settings(args):
        with open(os.path.join(args.dir, setting, "results.json")) as file:
            tuned = json.load(file)["results"]
        per_problem, cells = {}, []
        for name in names:
            summary = report.summarize({
                "problem": base[name]["problem"],
                "runs": {**base[name]["runs"], **tuned[name]["runs"]}})
            references[name] = {o: summary[o]["final"]["mean"]
                                for o in REFERENCES}
            item = summary[setting]
            figures = targets.figures(summary, setting, report.compare_finals)
            figures["ratio_to_adam"] = (item["final"]["mean"]
                                        / summary["adam"]["final"]["mean"])
            per_problem[name] = figures
            cells.append(f"{item['final']['mean']:.4g} ({item['lr']:g}; "
                         f"{figures['interior']:.0%})")
        geo = math.exp(np.mean([math.log(per_problem[n]["ratio_to_adam"])
                                for n in names if n != "rosenbrock"]))
        verdicts = targets.verdicts(per_problem)
        tally = (f"{verdicts['T1']['share_at_most_0.8']:.0%} / "
                 f"{verdicts['T2']['share_ties_or_wins']:.0%} / "
                 f"{verdicts['T3']['share_wider']:.0%}")
        rows.append((geo, f"| {rate:g} | [{low:g}, {high:g}] | "
                     + " | ".join(cells) + f" | {geo:.3f} | {tally} |"))
    best = min(rows)[0]
    return "\n".join([
        "# Tuning the hypergradient controller", "",
        f"`python research/tune_controller.py` ({args.seeds} seeds; each "
        "setting over each problem's full learning-rate grid, constant "
        "rate). A cell: final train loss at the tuned rate, mean over seeds "
        "(tuned rate; share of steps with the radius strictly inside its "
        "bounds). *gm / Adam*: geometric mean over the learning problems of "
        "the final loss over tuned Adam's. *T1 / T2 / T3*: `targets.py`. "
        "Rosenbrock is left out of the geometric mean: every weight is in "
        "the Fisher regime there, where d cancels out of the step.", "",
        "| radius_learning_rate | bounds | " + " | ".join(names)
        + " | gm / Adam | T1 / T2 / T3 |",
        "|---|---|" + "---|" * len(names) + "---|---|",
        *[("| **" + line[2:].replace(" |", "** |", 1)) if geo == best
          else line for geo, line in rows],
        *[f"| {'references: ' if o == 'adam' else ''}{o} | | " + " | ".join(
            f"{references[n][o]:.4g}" for n in names) + " | | |"
          for o in REFERENCES], ""])


if __name__ == "__main__":
    main()
