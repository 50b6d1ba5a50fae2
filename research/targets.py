# ruff: noqa: D102, D103, D205, D209
"""The radius-controller study's targets T1-T4, from a benchmark summary.

A study's yardstick, not the benchmark's: `tune_controller.py` and
`controller_designs.py` tabulate them; `report.summarize` (the benchmark's)
gives the figures they are computed from.

- T1: steps to reach tuned Adam's final training loss, over Adam's own
  (target: ≤ 0.8 on ≥ 80% of problems, never > 1.1).
- T2: final training loss against the best of Adam + cosine and
  ScheduleFreeAdamW (target: ties or wins on ≥ 60%).
- T3: decades of learning rate within 2x of the optimizer's best final
  loss, against Adam's (target: wider on ≥ 80%).
- T4 (its interior part): share of steps with the radius strictly inside
  its bounds (target ≥ 50%); the placebo and oracle parts are
  `controller_signal.py`'s.
"""

import math

import numpy as np

SCHEDULED_PEERS = ("adam_cosine", "schedulefree")


def rate_width(item, factor=2.0):
    """Decades of rate whose mean final loss is within `factor`x the best."""
    best = item["final"]["mean"]
    if not math.isfinite(best):
        return None
    good = [s["lr"] for s in item["sweep"].values()
            if math.isfinite(s["mean"]) and s["mean"] <= factor * best]
    return math.log10(max(good) / min(good))


def figures(summary, optimizer, compare_finals):
    """T1-T4's figures of `optimizer` on one problem (`None`: no reference).

    `compare_finals`: the benchmark's `report.compare_finals` (its tie rule).
    """
    item = summary[optimizer]
    bounds = item.get("bounds")
    out = {"steps_ratio": None, "against_scheduled": None,
           "scheduled_peer": None, "width": rate_width(item),
           "adam_width": None,
           "interior": None if bounds is None else 1.0 - sum(bounds)}
    adam = summary.get("adam")
    if adam is not None:
        out["adam_width"] = rate_width(adam)
        if adam.get("steps_to_adam"):
            mine = item.get("steps_to_adam")
            out["steps_ratio"] = (math.inf if mine is None
                                  else mine / adam["steps_to_adam"])
    peers = [o for o in SCHEDULED_PEERS if o in summary]
    if peers:
        peer = min(peers, key=lambda o: summary[o]["final"]["mean"])
        out["scheduled_peer"] = peer
        out["against_scheduled"] = compare_finals(item["final"],
                                                  summary[peer]["final"])
    return out


def verdicts(per_problem):
    """Pass/fail and the figures of T1-T3 and T4's interior part, from
    {problem: `figures(...)`} of one optimizer."""
    found = list(per_problem.values())
    out = {}
    ratios = [f["steps_ratio"] for f in found if f["steps_ratio"] is not None]
    if ratios:
        share = float(np.mean([r <= 0.8 for r in ratios]))
        out["T1"] = {"share_at_most_0.8": share, "worst": max(ratios),
                     "pass": share >= 0.8 and max(ratios) <= 1.1}
    words = [f["against_scheduled"] for f in found
             if f["against_scheduled"] is not None]
    if words:
        share = float(np.mean([w in ("wins", "ties") for w in words]))
        out["T2"] = {"share_ties_or_wins": share, "pass": share >= 0.6}
    widths = [(f["width"], f["adam_width"]) for f in found
              if f["width"] is not None and f["adam_width"] is not None]
    if widths:
        share = float(np.mean([w > a + 1e-9 for w, a in widths]))
        out["T3"] = {"share_wider": share, "pass": share >= 0.8}
    interior = [f["interior"] for f in found if f["interior"] is not None]
    if interior:
        out["T4_interior"] = {"mean": float(np.mean(interior)),
                              "min": float(np.min(interior)),
                              "pass": float(np.min(interior)) >= 0.5}
    return out
