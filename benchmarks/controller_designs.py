"""Measures the candidate radius controllers of `designs.py` against the library's.

    python benchmarks/controller_designs.py
        [--designs soaa_ratio,soaa_ratio_t,...] [--seeds 3]
        [--reference runs/benchmark] [--dir runs/designs] [--aggregate-only]
        [--out benchmarks/results/controller_designs.md]

Runs `compare.py` once per prototype of `designs.py` (every problem, its full
learning-rate grid, 3 seeds; about 2.5 minutes each on a quiet machine) and
tabulates each against the reference run of README command 1
(`--reference`, which holds Adam, Adam + cosine, ScheduleFreeAdamW and the
library's controllers): the final loss at the tuned rate, its geometric mean
over the learning problems relative to tuned Adam's, the targets T1-T3 of
`report.target_figures`, the radius' interior share and its mean at the end.
JAX on CPU is deterministic, so the reference rows are those of the run that
made `--reference`.
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = ("soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine", "soaa_gr",
           "soaa_gr_cosine")
DEFAULT_DESIGNS = ("soaa_ratio", "soaa_ratio_log", "soaa_hd_snr",
                   "soaa_ratio_t", "soaa_ratio_t_cosine", "soaa_ratio_log_t")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--designs", default=",".join(DEFAULT_DESIGNS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--reference", default=None,
                        help="a full compare.py run (default: the newest)")
    parser.add_argument("--dir", default=os.path.join("runs", "designs"))
    parser.add_argument("--aggregate-only", action="store_true")
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "controller_designs.md"))
    args = parser.parse_args(argv)
    args.designs = [name.strip() for name in args.designs.split(",")]
    if args.reference is None:
        import compare

        args.reference = compare.latest_run(modes=("full",))
        if args.reference is None:
            parser.error("no full run under runs/benchmark: run "
                         "`python benchmarks/compare.py --full` or pass --reference")
    return args


def main(argv=None):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    args = parse_args(argv)
    import compare

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


def _figures(summary, optimizer, report):
    figures = report.target_figures(summary, optimizer)
    item = summary[optimizer]
    figures["final"] = item["final"]["mean"]
    figures["lr"] = item["lr"]
    figures["ratio_to_adam"] = figures["final"] / summary["adam"]["final"]["mean"]
    ends = [record["radius"][-1] for record in item["runs"] if record["radius"]]
    figures["radius_end"] = sum(ends) / len(ends) if ends else math.nan
    return figures


def _steps(ratio):
    if ratio is None:
        return "—"
    return "not reached" if math.isinf(ratio) else f"{ratio:.2f}"


def aggregate(args):
    import numpy as np
    import report

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
            merged = {"problem": reference[problem]["problem"],
                      "runs": {**reference[problem]["runs"],
                               name: results[problem]["runs"][name]}}
            summary = report.summarize(merged)
            per_problem[problem] = _figures(summary, name, report)
        learning = [p for p in problems if p != "rosenbrock"]
        geo = math.exp(np.mean([math.log(per_problem[p]["ratio_to_adam"])
                                for p in learning]))
        verdicts = report.target_verdicts(per_problem)
        worst = max(f["steps_ratio"] for f in per_problem.values()
                    if f["steps_ratio"] is not None)
        rows.append(
            f"| {report.NAMES[name]} | {geo:.3f} | "
            f"{verdicts['T1']['share_at_most_0.8']:.0%} (worst "
            f"{_steps(worst)}) | {verdicts['T2']['share_ties_or_wins']:.0%} | "
            f"{verdicts['T3']['share_wider']:.0%} | "
            + " | ".join(f"{per_problem[p]['final']:.4g}" for p in problems)
            + " |")
        for problem in problems:
            f = per_problem[problem]
            detail.append(
                f"| {report.NAMES[name]} | {problem} | {f['lr']:g} | "
                f"{f['final']:.4g} | {_steps(f['steps_ratio'])} | "
                f"{f['against_scheduled']} | {f['width']:.2f} "
                f"({f['adam_width']:.2f}) | {f['interior']:.0%} | "
                f"{f['radius_end']:.2f} |")
    adam = " | ".join(
        f"{report.summarize(reference[p])['adam']['final']['mean']:.4g}"
        for p in problems)
    lines = [
        "# Candidate radius controllers",
        "",
        "`python benchmarks/controller_designs.py` (JAX, "
        f"{args.seeds} seeds, every problem's full learning-rate grid; the "
        "designs are `benchmarks/designs.py`, the library's controllers and "
        f"the peers come from `{args.reference}`). *gm / Adam*: geometric "
        "mean over the five learning problems (not Rosenbrock, where d "
        "cancels) of the final training loss at the tuned rate over tuned "
        "Adam's. T1: share of problems where the steps to reach Adam's final "
        "loss are ≤ 0.8x Adam's (worst ratio in brackets). T2: share where "
        "the final loss ties or beats the best of Adam + cosine and "
        "ScheduleFreeAdamW. T3: share where the range of rates within 2x of "
        "the best final loss is wider than Adam's.",
        "",
        "| controller | gm / Adam | T1 | T2 | T3 | " + " | ".join(problems)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(problems),
        *rows,
        "| Adam (reference) | 1 | | | | " + adam + " |",
        "",
        "Per problem: tuned rate, final loss, T1 steps ratio, T2 verdict, T3 "
        "width in decades (Adam's), share of steps with the radius strictly "
        "inside its bounds, mean radius at the end.",
        "",
        "| controller | problem | lr | final loss | T1 | T2 | T3 | interior "
        "| radius at the end |",
        "|---|---|---|---|---|---|---|---|---|",
        *detail,
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
