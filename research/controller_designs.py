# ruff: noqa: D102, D103, D205, D209
"""Measures the candidate radius controllers of `designs.py` against the library's.

    python research/controller_designs.py --reference DIR
        [--designs soaa_ratio,soaa_ratio_t,...] [--seeds 3]
        [--dir runs/designs] [--aggregate-only]
        [--out research/results/controller_designs.md]

Runs `benchmarks/compare.py --full` once per prototype of `designs.py`
(every calibration problem, its full learning-rate grid; about 2.5 minutes
each on a quiet machine) and tabulates each against the reference run
`--reference` (a `compare.py --full` run's folder, which holds Adam, Adam +
cosine, ScheduleFreeAdamW and the library's controllers): the final loss at
the tuned rate, its geometric mean over the learning problems relative to
tuned Adam's, the targets T1-T3 of `targets.py`, the radius' interior share
and its mean at the end. JAX on CPU is deterministic, so the reference rows
are those of the run that made `--reference`.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
LIBRARY = ("soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine", "soaa_gr",
           "soaa_gr_cosine")
DEFAULT_DESIGNS = ("soaa_ratio", "soaa_ratio_log", "soaa_hd_snr",
                   "soaa_ratio_t", "soaa_ratio_t_cosine", "soaa_ratio_log_t")


def parse_args(argv=None):
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", default=",".join(DEFAULT_DESIGNS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reference", required=True,
                        help="a `compare.py --full` run's folder")
    parser.add_argument("--dir", default=os.path.join("runs", "designs"))
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "controller_designs.md"))
    args = parser.parse_args(argv)
    args.designs = [name.strip() for name in args.designs.split(",")]
    return args


def main(argv=None):
    """Runs the designs (unless `--aggregate-only`) and writes the table."""
    args = parse_args(argv)
    import compare

    compare.select_backend(None)
    import designs

    designs.install()
    if not args.aggregate_only:
        for name in args.designs:
            compare.main(["--full", "--overwrite", "--seeds", str(args.seeds),
                          "--optimizers", name,
                          "--out", os.path.join(args.dir, "full_" + name)])
    text = aggregate(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as file:
        file.write(text)
    print(text)


def _steps(ratio):
    if ratio is None:
        return "—"
    return "not reached" if math.isinf(ratio) else f"{ratio:.2f}"


def aggregate(args):
    """The markdown tables, from the runs in `--dir` and `--reference`."""
    import numpy as np
    import report
    import targets
    from optimizers import label

    with open(os.path.join(args.reference, "results.json")) as file:
        reference = json.load(file)["results"]
    runs = {name: reference for name in LIBRARY
            if name in next(iter(reference.values()))["runs"]}
    for name in args.designs:
        with open(os.path.join(args.dir, "full_" + name, "results.json")) as file:
            runs[name] = json.load(file)["results"]
    problems = list(reference)
    rows, detail = [], []
    for name, results in runs.items():
        per_problem = {}
        for problem in problems:
            summary = report.summarize({
                "problem": reference[problem]["problem"],
                "runs": {**reference[problem]["runs"],
                         name: results[problem]["runs"][name]}})
            item = summary[name]
            f = targets.figures(summary, name, report.compare_finals)
            ends = [r["radius"][-1] for r in item["runs"] if r["radius"]]
            f.update(final=item["final"]["mean"], lr=item["lr"],
                     ratio_to_adam=item["final"]["mean"]
                     / summary["adam"]["final"]["mean"],
                     radius_end=sum(ends) / len(ends) if ends else math.nan)
            per_problem[problem] = f
            detail.append(
                f"| {label(name)} | {problem} | {f['lr']:g} | {f['final']:.4g} "
                f"| {_steps(f['steps_ratio'])} | {f['against_scheduled']} | "
                f"{f['width']:.2f} ({f['adam_width']:.2f}) | "
                f"{f['interior']:.0%} | {f['radius_end']:.2f} |")
        learning = [p for p in problems if p != "rosenbrock"]
        geo = math.exp(np.mean([math.log(per_problem[p]["ratio_to_adam"])
                                for p in learning]))
        verdicts = targets.verdicts(per_problem)
        worst = max(f["steps_ratio"] for f in per_problem.values()
                    if f["steps_ratio"] is not None)
        rows.append(
            f"| {label(name)} | {geo:.3f} | "
            f"{verdicts['T1']['share_at_most_0.8']:.0%} (worst "
            f"{_steps(worst)}) | {verdicts['T2']['share_ties_or_wins']:.0%} | "
            f"{verdicts['T3']['share_wider']:.0%} | "
            + " | ".join(f"{per_problem[p]['final']:.4g}" for p in problems)
            + " |")
    adam = " | ".join(
        f"{report.summarize(reference[p])['adam']['final']['mean']:.4g}"
        for p in problems)
    return "\n".join([
        "# Candidate radius controllers", "",
        f"`python research/controller_designs.py` (JAX, {args.seeds} seeds, "
        "every problem's full learning-rate grid; the designs are "
        "`research/designs.py`, the library's controllers and the peers come "
        f"from `{args.reference}`). *gm / Adam*: geometric mean over the "
        "learning problems (not Rosenbrock, where d cancels) of the final "
        "training loss at the tuned rate over tuned Adam's. T1-T3: "
        "`research/targets.py`.", "",
        "| controller | gm / Adam | T1 | T2 | T3 | " + " | ".join(problems)
        + " |", "|---|---|---|---|---|" + "---|" * len(problems), *rows,
        "| Adam (reference) | 1 | | | | " + adam + " |", "",
        "Per problem: tuned rate, final loss, T1 steps ratio, T2 verdict, T3 "
        "width in decades (Adam's), share of steps with the radius strictly "
        "inside its bounds, mean radius at the end.", "",
        "| controller | problem | lr | final loss | T1 | T2 | T3 | interior "
        "| radius at the end |", "|---|---|---|---|---|---|---|---|---|",
        *detail, ""])


if __name__ == "__main__":
    main()
