"""The trust-region candidates against the best peer, on steps and on the clock.

    python research/trust_region_candidates.py RUN_DIR [RUN_DIR ...] [--out FILE]

Reads the `benchmarks/compare.py` run folders (`results.json`; an optimizer's
runs on a problem from the last folder that has them) and, per set
(calibration, held-out), writes one table row per SOAA configuration:

- **worst ratio**: the largest ratio, over the problems, of its final training
  loss to the best peer's (the best of tuned Adam, Adam + cosine and
  ScheduleFreeAdamW); the report's tie rule gives wins / ties / losses;
- **within 5% of Adam**: problems where its final loss is at most 1.05x tuned
  constant-rate Adam's;
- **clock**: on how many problems it reaches the best peer's final loss (its
  seed-averaged curve, the same trailing window), and there the largest ratio
  of the seconds it takes to the seconds of the best peer's whole run; every
  extra pass (the same-batch test's forward pass) is in its measured time.
"""

import argparse
import json
import math
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))

import report  # noqa: E402
from optimizers import PEERS, label  # noqa: E402


def seconds_to(item, target, window):
    """Seconds until the tuned runs' mean curve reaches `target` (or `inf`)."""
    if "curve" not in item:
        return math.inf
    smooth = report.trailing_mean(item["curve"], window)
    reached = np.nonzero(smooth <= target * (1 + 1e-9))[0]
    if not len(reached):
        return math.inf
    return float(report.wall_clock(item["runs"])[reached[0]])


def load(folders):
    """`{problem: entry}` of `compare.py` run folders.

    Each problem's `runs` are joined over the folders (an optimizer's from
    the last folder that has it).
    """
    results = {}
    for folder in folders:
        with open(os.path.join(folder, "results.json")) as file:
            for problem, entry in json.load(file)["results"].items():
                if problem in results:
                    results[problem]["runs"].update(entry["runs"])
                else:
                    results[problem] = entry
    return results


def rows(results):
    """Per SOAA configuration: its figures over the problems of `results`."""
    summaries = {p: report.summarize(e) for p, e in results.items()}
    names = dict.fromkeys(o for e in results.values() for o in e["runs"]
                          if o not in PEERS and o not in ("adamw", "muon", "lion"))
    found = {}
    for name in names:
        figures = report.worst_case(summaries, name)
        words, clocks = {"wins": 0, "ties": 0, "loses": 0}, {}
        for problem, summary in summaries.items():
            peer = report.best_peer(summary)
            if name not in summary or peer is None:
                continue
            mine, best = summary[name], summary[peer]
            words[report.compare_finals(mine["final"], best["final"])] += 1
            window = results[problem]["problem"]["final_window"]
            peer_seconds = float(report.wall_clock(best["runs"])[-1])
            clocks[problem] = seconds_to(mine, best["final"]["mean"],
                                         window) / peer_seconds
        found[name] = (figures, words, clocks)
    return found


def table(results):
    """The markdown table of `rows(results)`."""
    lines = ["| configuration | worst ratio (problem) | wins / ties / losses | "
             "within 5% of Adam | clock: reaches the best peer's loss; worst "
             "time ratio there (problem) |",
             "|---|---|---|---|---|"]
    for name, (figures, words, clocks) in rows(results).items():
        reached = {p: c for p, c in clocks.items() if math.isfinite(c)}
        slowest = max(reached, key=reached.get) if reached else None
        lines.append(
            f"| {label(name)} | {figures['worst']:.2f} ({figures['worst_problem']}) | "
            f"{words['wins']} / {words['ties']} / {words['loses']} | "
            f"{figures['near_adam']} of {figures['with_adam']} | "
            f"{len(reached)} of {len(clocks)}"
            + (f"; {reached[slowest]:.2f} ({slowest})" if slowest else "") + " |")
    return lines


def main(argv=None):
    """Prints (and with `--out` writes) the tables of the run folders given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    import candidates

    candidates.install()  # the research rows' labels
    results = load(args.runs)
    lines = ["# Trust-region candidates against the best peer", ""]
    for name in sorted({e["problem"].get("set", "?") for e in results.values()}):
        part = {p: e for p, e in results.items() if e["problem"].get("set") == name}
        lines += [f"## {name} ({', '.join(part)})", "", *table(part), ""]
    emit("\n".join(lines), args.out)


def emit(text, path=None):
    """Prints `text`, and writes it to `path` if one is given."""
    print(text)
    if path:
        with open(path, "w") as file:
            file.write(text + "\n")


if __name__ == "__main__":
    main()
