"""Plots and the markdown report of a benchmark run.

    python benchmarks/report.py [DIR]   # redraw DIR's report from its results.json

(default DIR: the newest run under runs/benchmark, full mode first.)
"""

import io
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from compare import RECOMMENDED  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

NAMES = {
    "soaa": "SOAA",
    "soaa_cosine": "SOAA + cosine",
    "soaa_hd": "SOAA-HD",
    "soaa_hd_cosine": "SOAA-HD + cosine",
    "soaa_gr": "SOAA-GR",
    "soaa_gr_cosine": "SOAA-GR + cosine",
    "adam": "Adam",
    "adam_cosine": "Adam + cosine",
    "adamw": "AdamW",
    "schedulefree": "ScheduleFreeAdamW",
    "muon": "Muon",
    "lion": "Lion",
    # The prototype controllers and configurations of `designs.py`.
    "soaa_ratio": "SOAA-ratio",
    "soaa_ratio_cosine": "SOAA-ratio + cosine",
    "soaa_ratio_log": "SOAA-ratio-log",
    "soaa_ratio_log_cosine": "SOAA-ratio-log + cosine",
    "soaa_hd_snr": "SOAA-HD-SNR",
    "soaa_hd_snr_cosine": "SOAA-HD-SNR + cosine",
    "soaa_ratio_t": "SOAA-ratio (0.1/0.5)",
    "soaa_ratio_t_cosine": "SOAA-ratio (0.1/0.5) + cosine",
    "soaa_ratio_log_t": "SOAA-ratio-log (0.25)",
    "soaa_ratio_log_t_cosine": "SOAA-ratio-log (0.25) + cosine",
    "soaa_hd_floor": "SOAA-HD-floor",
    "soaa_hd_floor_cosine": "SOAA-HD-floor + cosine",
    "soaa_hd_min1": "SOAA-HD (d >= 1)",
    "soaa_hd_min1_cosine": "SOAA-HD (d >= 1) + cosine",
}
# Fixed colours per optimizer: matplotlib's tab10, so the five curves of a
# panel (`plotted`) always differ; *_cosine variants are also dashed. The
# SOAA variants not plotted by default (and the prototypes) reuse colours.
COLORS = {
    "adam": "tab:blue",
    "soaa": "tab:orange",
    "adamw": "tab:green",
    "soaa_hd": "tab:red",
    "schedulefree": "tab:purple",
    "muon": "tab:brown",
    "soaa_cosine": "tab:pink",
    "soaa_hd_cosine": "tab:gray",
    "lion": "tab:olive",
    "adam_cosine": "tab:cyan",
    "soaa_gr": "tab:pink",
    "soaa_gr_cosine": "tab:gray",
    "soaa_ratio": "darkred",
    "soaa_ratio_cosine": "salmon",
    "soaa_ratio_log": "darkgoldenrod",
    "soaa_ratio_log_cosine": "gold",
    "soaa_hd_snr": "indigo",
    "soaa_hd_snr_cosine": "violet",
    "soaa_ratio_t": "black",
    "soaa_ratio_t_cosine": "dimgray",
    "soaa_ratio_log_t": "teal",
    "soaa_ratio_log_t_cosine": "turquoise",
    "soaa_hd_floor": "darkgreen",
    "soaa_hd_floor_cosine": "limegreen",
    "soaa_hd_min1": "navy",
    "soaa_hd_min1_cosine": "royalblue",
}
DESIGN_VARIANTS = tuple(name for name in NAMES if name.startswith(
    ("soaa_ratio", "soaa_hd_snr", "soaa_hd_floor", "soaa_hd_min1")))
SOAA_VARIANTS = ("soaa", "soaa_cosine", "soaa_hd", "soaa_hd_cosine",
                 "soaa_gr", "soaa_gr_cosine", *DESIGN_VARIANTS)
# SOAA with `controller="hypergradient"`: constant radius bounds
# [min_radius, max_radius], stored in each run's record.
HYPERGRADIENT_VARIANTS = ("soaa_hd", "soaa_hd_cosine", "soaa_gr",
                          "soaa_gr_cosine", *DESIGN_VARIANTS)
# Every panel shows at most `MAX_CURVES` optimizers (`plotted`): the
# recommended SOAA, the paper's `soaa`, Adam and the `PLOTTED_OTHERS`
# strongest other optimizers (every optimizer stays in the tables).
MAX_CURVES = 5
PLOTTED_OTHERS = 2
RADIUS_BOUND = 0.1  # SOAA's default `radius_bound` (γ), used by every run


# -- numbers --------------------------------------------------------------------


def trailing_mean(values, window):
    """Mean of the last `window` values at each step (fewer at the start)."""
    values = np.asarray(values, "float64")
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def radius_bounds(steps, total_steps, gamma=RADIUS_BOUND):
    """The bounds on the radius after the observation of step t = 1..steps.

    After step t, e = min(t − 1, T) / T and the radius lies in
    [(1 − γ)^e, 1 + γ^e].
    """
    e = np.minimum(np.arange(steps), total_steps) / total_steps
    return (1 - gamma) ** e, 1 + gamma**e


def bound_fractions(radii, total_steps, bounds=None):
    """Fractions of steps with the radius on its lower and upper bound.

    `bounds=None`: the paper controller's bounds, which narrow over
    `total_steps` (`radius_bounds`); else the constant `(low, high)` of the
    hypergradient controller (`min_radius`, `max_radius`). "On" a bound:
    within a relative 1e-5 of it (float32 rounding).
    """
    radii = np.asarray(radii, "float64")
    if bounds is None:
        lower, upper = radius_bounds(len(radii), total_steps)
    else:
        lower = np.full(len(radii), float(bounds[0]))
        upper = np.full(len(radii), float(bounds[1]))
    on_lower = np.abs(radii - lower) <= 1e-5 * lower
    on_upper = np.abs(radii - upper) <= 1e-5 * upper
    return float(on_lower.mean()), float(on_upper.mean())


def interior_fraction(radii, total_steps, bounds=None):
    """The share of steps with the radius strictly inside its bounds."""
    on_lower, on_upper = bound_fractions(radii, total_steps, bounds)
    return 1.0 - on_lower - on_upper


def _mean_std(values):
    """Mean and sample standard deviation (0 for a single value)."""
    values = np.asarray(values, "float64")
    return float(values.mean()), float(values.std(ddof=1) if len(values) > 1 else 0.0)


def summarize(entry):
    """Per optimizer: the sweep, the tuned rate and the tuned runs' numbers."""
    info = entry["problem"]
    summary = {}
    for optimizer, by_lr in entry["runs"].items():
        sweep = {}
        for key, records in by_lr.items():
            finals = [r["final_loss"] for r in records]
            diverged = any(f is None for f in finals)
            mean, std = (math.inf, 0.0) if diverged else _mean_std(finals)
            sweep[key] = {"lr": float(key), "mean": mean, "std": std,
                          "diverged": diverged}
        tuned_key = min(sweep, key=lambda k: sweep[k]["mean"])
        tuned = by_lr[tuned_key]
        lrs = [s["lr"] for s in sweep.values()]
        item = {
            "sweep": sweep,
            "lr": float(tuned_key),
            "at_edge": len(lrs) > 1 and float(tuned_key) in (min(lrs), max(lrs)),
            "final": sweep[tuned_key],
            "runs": tuned,
            "ms_per_step": float(np.median(
                [r["ms_per_step"] for rs in by_lr.values() for r in rs])),
            "held_out": None,
            "bounds": None,
        }
        held_out = [r["held_out"] for r in tuned]
        if info["held_out_name"] and all(h is not None for h in held_out):
            item["held_out"] = _mean_std(held_out)
        # ScheduleFreeAdamW: also at its averaged point x.
        held_out_x = [r.get("held_out_x") for r in tuned]
        item["held_out_x"] = (
            _mean_std(held_out_x)
            if item["held_out"] is not None
            and all(h is not None for h in held_out_x)
            else None
        )
        if optimizer in SOAA_VARIANTS and not sweep[tuned_key]["diverged"]:
            fractions = np.array(
                [bound_fractions(r["radius"], info["steps"],
                                 r.get("radius_bounds")) for r in tuned]
            )
            item["bounds"] = tuple(fractions.mean(0))
            item["interior"] = float(1.0 - fractions.sum(1).mean())
            item["radius_bounds"] = tuned[0].get("radius_bounds")
            item["mean_radius"] = float(np.mean([r["radius"] for r in tuned]))
            shares = [share for r in tuned for share in r.get("fisher_share") or []
                      if share is not None]
            if shares:
                item["fisher_share"] = float(np.mean(shares))
        if not sweep[tuned_key]["diverged"]:
            item["curve"] = np.mean([r["loss"] for r in tuned], axis=0)
        summary[optimizer] = item
    for rank, optimizer in enumerate(ranking(summary), start=1):
        summary[optimizer]["rank"] = rank
    target = summary.get("adam", {}).get("final", {}).get("mean", math.inf)
    for item in summary.values():
        item["steps_to_adam"] = None
        if "curve" in item and math.isfinite(target):
            smooth = trailing_mean(item["curve"], info["final_window"])
            # Adam's own smoothed curve ends exactly at its final loss.
            reached = np.nonzero(smooth <= target * (1 + 1e-9))[0]
            if len(reached):
                item["steps_to_adam"] = int(reached[0]) + 1
    return summary


def ranking(summary):
    """The optimizers from the lowest mean final training loss up.

    Diverged ones come last; ties keep the run's order.
    """
    return sorted(summary, key=lambda o: summary[o]["final"]["mean"])


def strongest(summary, exclude=()):
    """The optimizer with the lowest mean final loss, of those not excluded."""
    candidates = [o for o in ranking(summary) if o not in exclude]
    return candidates[0] if candidates else None


def verdict(summary, soaa="soaa"):
    """A SOAA variant against the strongest other optimizer on final loss.

    "Other" excludes both SOAA variants, so the comparison is always with
    something a user could pick instead. A tie when the gap is within the sum
    of the two standard deviations over seeds, or within 2% of the other's
    loss. Returns `(word, other)` or `None`.
    """
    best = strongest(summary, exclude=SOAA_VARIANTS)
    if soaa not in summary or best is None:
        return None
    return compare_finals(summary[soaa]["final"], summary[best]["final"]), best


def compare_finals(mine, other):
    """"wins", "ties" or "loses": `mine` against `other` ({"mean", "std"}).

    A tie when the gap is within the sum of the two standard deviations over
    seeds, or within 2% of the other's loss.
    """
    if not math.isfinite(mine["mean"]) or not math.isfinite(other["mean"]):
        return ("ties" if mine["mean"] == other["mean"]
                else "wins" if mine["mean"] < other["mean"] else "loses")
    gap = mine["mean"] - other["mean"]
    margin = max(mine["std"] + other["std"], 0.02 * abs(other["mean"]))
    return "ties" if abs(gap) <= margin else "wins" if gap < 0 else "loses"


# -- the controller targets ---------------------------------------------------

# T2's reference: the best of these two (those that ran).
SCHEDULED_PEERS = ("adam_cosine", "schedulefree")


def rate_width(item, factor=2.0):
    """Decades of learning rate whose mean final loss is within `factor`x of
    the optimizer's best: log10(largest / smallest such grid rate)."""
    best = item["final"]["mean"]
    if not math.isfinite(best):
        return None
    good = [s["lr"] for s in item["sweep"].values()
            if math.isfinite(s["mean"]) and s["mean"] <= factor * best]
    return math.log10(max(good) / min(good))


def target_figures(summary, optimizer):
    """The controller targets' figures for one optimizer on one problem.

    - T1 `steps_ratio`: steps to reach tuned Adam's final training loss,
      over Adam's own (`inf`: never reached).
    - T2 `against_scheduled`: `compare_finals` against the best of Adam +
      cosine and ScheduleFreeAdamW, and which one that is.
    - T3 `width`, `adam_width`: `rate_width` of the optimizer and of Adam.
    - T4 `interior`: share of steps with the radius strictly inside its
      bounds (SOAA variants).
    Missing references give `None`.
    """
    item = summary[optimizer]
    figures = {"steps_ratio": None, "against_scheduled": None,
               "scheduled_peer": None, "width": rate_width(item),
               "adam_width": None, "interior": item.get("interior")}
    adam = summary.get("adam")
    if adam is not None:
        figures["adam_width"] = rate_width(adam)
        if adam.get("steps_to_adam"):
            mine = item.get("steps_to_adam")
            figures["steps_ratio"] = (math.inf if mine is None
                                      else mine / adam["steps_to_adam"])
    peers = [o for o in SCHEDULED_PEERS if o in summary]
    if peers:
        peer = min(peers, key=lambda o: summary[o]["final"]["mean"])
        figures["scheduled_peer"] = peer
        figures["against_scheduled"] = compare_finals(item["final"],
                                                      summary[peer]["final"])
    return figures


def target_verdicts(per_problem):
    """Pass/fail and the figures of T1-T3 and T4's interior part.

    `per_problem`: {problem: `target_figures(...)`} for one optimizer.
    """
    figures = list(per_problem.values())
    out = {}
    ratios = [f["steps_ratio"] for f in figures if f["steps_ratio"] is not None]
    if ratios:
        share = float(np.mean([r <= 0.8 for r in ratios]))
        out["T1"] = {"share_at_most_0.8": share, "worst": max(ratios),
                     "pass": share >= 0.8 and max(ratios) <= 1.1}
    words = [f["against_scheduled"] for f in figures
             if f["against_scheduled"] is not None]
    if words:
        share = float(np.mean([w in ("wins", "ties") for w in words]))
        out["T2"] = {"share_ties_or_wins": share, "pass": share >= 0.6}
    widths = [(f["width"], f["adam_width"]) for f in figures
              if f["width"] is not None and f["adam_width"] is not None]
    if widths:
        share = float(np.mean([w > a + 1e-9 for w, a in widths]))
        out["T3"] = {"share_wider": share, "pass": share >= 0.8}
    interior = [f["interior"] for f in figures if f["interior"] is not None]
    if interior:
        out["T4_interior"] = {"mean": float(np.mean(interior)),
                              "min": float(np.min(interior)),
                              "pass": float(np.min(interior)) >= 0.5}
    return out


# -- the worst case over problems ------------------------------------------------

# The worst-case line's references: an optimizer's final loss is divided by
# the best of these (those that ran) on each problem.
WORST_CASE_REFERENCES = ("adam", "adam_cosine", "schedulefree")
# "Within 5% of tuned Adam": a final loss at most (1 + NEAR_ADAM) x Adam's.
NEAR_ADAM = 0.05


def loss_ratio(mine, best):
    """`mine / best` for final losses (≥ 0); `inf` when `mine` diverged.

    A best of 0 gives 1 if `mine` is 0 too, else `inf`.
    """
    if not math.isfinite(mine):
        return math.inf
    if best <= 0:
        return 1.0 if mine <= best else math.inf
    return mine / best


def worst_case(summaries, optimizer):
    """An optimizer's worst case over problems, and how often it keeps up.

    `summaries`: {problem: `summarize(...)`}. Returns
    - `ratios`: {problem: its mean final train loss over the lowest of
      tuned Adam's, Adam + cosine's and ScheduleFreeAdamW's
      (`WORST_CASE_REFERENCES`, those that ran and did not diverge) on it};
    - `worst`, `worst_problem`: the largest of them and where (`None` when
      no reference ran);
    - `near_adam`: on how many problems its final loss is within 5% of
      tuned constant-rate Adam's (at most `1 + NEAR_ADAM` times it; lower
      counts too), out of `with_adam` problems where Adam ran (and did not
      diverge).
    Problems where `optimizer` did not run are left out.
    """
    ratios = {}
    near_adam = with_adam = 0
    for name, summary in summaries.items():
        if optimizer not in summary:
            continue
        mine = summary[optimizer]["final"]["mean"]
        references = [summary[o]["final"]["mean"]
                      for o in WORST_CASE_REFERENCES if o in summary]
        references = [r for r in references if math.isfinite(r)]
        if references:
            ratios[name] = loss_ratio(mine, min(references))
        adam = summary.get("adam", {}).get("final", {}).get("mean", math.inf)
        if math.isfinite(adam):
            with_adam += 1
            near_adam += bool(math.isfinite(mine)
                              and mine <= (1 + NEAR_ADAM) * adam)
    worst_problem = max(ratios, key=ratios.get) if ratios else None
    return {"ratios": ratios, "worst_problem": worst_problem,
            "worst": ratios[worst_problem] if ratios else None,
            "near_adam": near_adam, "with_adam": with_adam}


def worst_case_section(summaries, optimizers):
    """One line per optimizer of `optimizers` that ran: `worst_case`."""
    lines = []
    for optimizer in optimizers:
        figures = worst_case(summaries, optimizer)
        parts = []
        if figures["worst"] is not None:
            worst = figures["worst"]
            parts.append(
                f"worst ratio {worst:.2f} (on {figures['worst_problem']})"
                if math.isfinite(worst) else
                f"diverged on {figures['worst_problem']} (worst ratio ∞)")
        if figures["with_adam"]:
            parts.append(f"within 5% of tuned Adam on {figures['near_adam']} "
                         f"of {figures['with_adam']} problems")
        if parts:
            lines.append(f"- **{NAMES[optimizer]}**: " + "; ".join(parts)
                         + ".")
    if not lines:
        return []
    return [
        "Worst case per optimizer: the largest ratio, over the problems, of "
        "its final train loss to the best of tuned Adam, Adam + cosine and "
        "ScheduleFreeAdamW on that problem (those that ran; 1.00: it is, or "
        "matches, the best of them on every problem), and on how many "
        "problems its final train loss is within 5% of tuned "
        "constant-rate Adam's (at most 1.05 times it; lower counts):",
        "",
        *lines,
        "",
    ]


# -- plots ----------------------------------------------------------------------


def _smoothed(records, key, window):
    return np.array([trailing_mean(r[key], window) for r in records])


def _plain_log_ticks(axis):
    """Writes log-axis ticks as 0.01, 2, 300 rather than 10^-2, 2x10^0."""
    target = axis.yaxis
    target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    low, high = axis.get_ylim()

    def minor(value, _):
        # Within less than a decade, also label the 2s, 3s and 5s.
        mantissa = value / 10 ** math.floor(math.log10(value))
        labelled = high / low < 10 and round(mantissa) in (2, 3, 5)
        return f"{value:g}" if labelled else ""

    target.set_minor_formatter(ticker.FuncFormatter(minor))


def plotted(summary, recommended=RECOMMENDED):
    """The optimizers a panel shows, at most `MAX_CURVES`, best first.

    The recommended SOAA configuration, the paper's `soaa` and Adam (those
    that ran), then the strongest of the other optimizers that are not SOAA
    variants (`PLOTTED_OTHERS` of them when the three ran; more, up to
    `MAX_CURVES`, when some did not), then, if room is left, the strongest
    other SOAA variants.
    """
    order = ranking(summary)
    fixed = [o for o in (recommended, "soaa", "adam") if o in summary]
    peers = [o for o in order if o not in fixed and o not in SOAA_VARIANTS]
    rest = [o for o in order if o not in fixed and o in SOAA_VARIANTS]
    keep = set(fixed) | set((peers + rest)[:MAX_CURVES - len(fixed)])
    return [o for o in order if o in keep]


def _short(optimizer):
    return NAMES[optimizer].replace(" + cosine", "+cos")


def _style(optimizer):
    """Line width and style: the recommended SOAA bold, schedules dashed."""
    return {"lw": 2.2 if optimizer == RECOMMENDED else 1.4,
            "ls": "--" if optimizer.endswith("_cosine") else "-"}


def wall_clock(records):
    """The seeds' mean seconds since each run's first step, per step.

    Starting at the first step's end leaves out what the first step alone
    pays (a compilation or a retrace), for every optimizer and seed alike.
    """
    return np.mean([np.asarray(r["time"], "float64") - r["time"][0]
                    for r in records], axis=0)


def plot_problem(name, entry, summary, path):
    """Loss vs step and vs wall-clock, the sweep and the radius, one PNG.

    Every panel shows the same optimizers (`plotted`, at most `MAX_CURVES`)
    in the same fixed colours; one legend below the panels names them and
    the radius bounds, so no legend covers data.
    """
    info = entry["problem"]
    steps = info["steps"]
    window = 1 if info["exact_gradients"] else max(1, steps // 50)
    shown = plotted(summary)
    handles = []
    for optimizer in shown:
        item = summary[optimizer]
        label = f"#{item['rank']} {NAMES[optimizer]} (lr {item['lr']:g})"
        if item["final"]["diverged"]:
            label = f"#{item['rank']} {NAMES[optimizer]} (diverged)"
        handles.append(Line2D([], [], color=COLORS[optimizer],
                              label=label, **_style(optimizer)))
    variants = [o for o in shown if o in SOAA_VARIANTS
                and not summary[o]["final"]["diverged"]]
    paper_bounds = any(o not in HYPERGRADIENT_VARIANTS for o in variants)
    hd_bounds = sorted({tuple(summary[o]["radius_bounds"]) for o in variants
                        if o in HYPERGRADIENT_VARIANTS
                        and summary[o].get("radius_bounds")})
    if paper_bounds:
        handles.append(Line2D([], [], color="k", ls="--", lw=1,
                              label="radius bounds (paper): (1−γ)^e, 1+γ^e"))
    if hd_bounds:
        handles.append(Line2D([], [], color="k", ls=":", lw=1,
                              label="radius bounds: min/max_radius"))
    columns = 3
    rows = -(-len(handles) // columns)
    height = 7.6 + 0.3 * rows
    figure, axes = plt.subplots(2, 2, figsize=(11, height))
    (by_step, by_time), (by_lr, radius) = axes

    for optimizer in shown:
        item = summary[optimizer]
        if item["final"]["diverged"]:
            continue
        color, style = COLORS[optimizer], _style(optimizer)
        curves = _smoothed(item["runs"], "loss", window)
        mean = curves.mean(0)
        step_axis = np.arange(1, steps + 1)
        time_axis = wall_clock(item["runs"])
        for axis, x in ((by_step, step_axis), (by_time, time_axis)):
            axis.plot(x, mean, color=color, **style)
            axis.fill_between(x, curves.min(0), curves.max(0), color=color,
                              alpha=0.15, lw=0)
    smoothing = "" if window == 1 else f", {window}-step moving average"
    by_step.set(xlabel="step", ylabel="training loss", yscale="log",
                title=f"loss vs step (mean, min-max over seeds{smoothing})")
    by_time.set(xlabel="seconds since the first step (compiled; callbacks "
                "included)", ylabel="training loss", yscale="log",
                title="training loss vs wall-clock (compilation excluded)")

    for optimizer in shown:
        item = summary[optimizer]
        lrs = [s["lr"] for s in item["sweep"].values()]
        means = [s["mean"] for s in item["sweep"].values()]
        lows = [min(r["final_loss"] or math.inf for r in rs)
                for rs in entry["runs"][optimizer].values()]
        highs = [max(r["final_loss"] or math.inf for r in rs)
                 for rs in entry["runs"][optimizer].values()]
        finite = [i for i, m in enumerate(means) if math.isfinite(m)]
        x = [lrs[i] for i in finite]
        y = [means[i] for i in finite]
        error = [[y[j] - lows[i] for j, i in enumerate(finite)],
                 [highs[i] - y[j] for j, i in enumerate(finite)]]
        by_lr.errorbar(x, y, yerr=error, color=COLORS[optimizer], marker="o",
                       ms=4, capsize=3, **_style(optimizer))
        if not item["final"]["diverged"]:
            by_lr.plot([item["lr"]], [item["final"]["mean"]], marker="*",
                       ms=14, color=COLORS[optimizer], ls="none")
    by_lr.set(xscale="log", yscale="log", xlabel="learning rate",
              ylabel="final training loss",
              title="learning-rate sweep (mean, min-max; ★ tuned)")

    if variants:
        x = np.arange(1, steps + 1)
        titles = []
        for optimizer in variants:
            item = summary[optimizer]
            for record in item["runs"]:
                radius.plot(x, record["radius"], color=COLORS[optimizer],
                            lw=0.9, alpha=0.7,
                            ls=_style(optimizer)["ls"])
            on_lower, on_upper = item["bounds"]
            titles.append(f"{_short(optimizer)}: {on_lower:.0%} / "
                          f"{on_upper:.0%}")
        if paper_bounds:
            lower, upper = radius_bounds(steps, steps)
            radius.plot(x, lower, "k--", lw=1)
            radius.plot(x, upper, "k--", lw=1)
        for low, high in hd_bounds:
            radius.axhline(low, color="k", ls=":", lw=1)
            radius.axhline(high, color="k", ls=":", lw=1)
        if hd_bounds:
            radius.set_yscale("log")
            radius.yaxis.set_major_formatter(
                ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        radius.set_title("radius d, one line per seed\non lower / upper "
                         "bound: " + ", ".join(titles), fontsize=10)
    else:
        radius.text(0.5, 0.5, "SOAA not run (or diverged)", ha="center",
                    transform=radius.transAxes)
    radius.set(xlabel="step", ylabel="radius d")
    for axis in (by_step, by_time, by_lr):
        low, high = axis.get_ylim()
        if axis is not by_lr and high / low < 3:
            axis.set_yscale("linear")  # a narrow range reads better linear
        else:
            _plain_log_ticks(axis)
    grid = sorted({s["lr"] for o in shown
                   for s in summary[o]["sweep"].values()})
    by_lr.set_xticks(grid, [f"{lr:g}" for lr in grid], fontsize=8)
    by_lr.xaxis.set_minor_locator(ticker.NullLocator())
    hidden = len(summary) - len(shown)
    figure.suptitle(
        name + (f": {len(shown)} of {len(summary)} optimizers (#rank by final "
                "train loss; all in the report)" if hidden else ""),
        fontsize=12)
    legend_height = (0.3 * rows + 0.25) / height
    figure.legend(handles=handles, loc="lower center", ncol=columns,
                  fontsize=9, frameon=False, bbox_to_anchor=(0.5, 0.0))
    figure.tight_layout(rect=(0, legend_height, 1, 1))
    save_small_png(figure, path)
    plt.close(figure)


def save_small_png(figure, path):
    """Saves `figure` as a 256-colour PNG (about a third of the RGBA size)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=72, format="png")
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256).save(path, optimize=True)


# -- markdown -----------------------------------------------------------------


def _number(value):
    return f"{value:.4g}"


def _mean_std_text(pair):
    mean, std = pair
    return f"{_number(mean)} ± {std:.2g}"


def _final_text(final):
    return "diverged" if final["diverged"] else _mean_std_text(
        (final["mean"], final["std"]))


def table(results, summaries):
    """The main table: per problem, its optimizers from the best down."""
    lines = [
        "| problem | optimizer | rank | tuned lr | final train loss | steps to "
        "Adam's final loss | held-out metric | ms/step | radius: mean (on lower "
        "/ upper bound) | weights in the Fisher regime |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, summary in summaries.items():
        info = results[name]["problem"]
        for optimizer in ranking(summary):
            item = summary[optimizer]
            steps = item["steps_to_adam"]
            held_out = "—"
            if item["held_out"] is not None:
                metric = info["held_out_name"].replace("held-out ", "")
                held_out = f"{_mean_std_text(item['held_out'])} {metric}"
                if item["held_out_x"] is not None:
                    held_out += f" (at x: {_mean_std_text(item['held_out_x'])})"
            bounds = fisher = "—"
            if item.get("fisher_share") is not None:
                fisher = f"{item['fisher_share']:.1%}"
            if item["bounds"] is not None:
                bounds = (f"{item['mean_radius']:.2f} ({item['bounds'][0]:.0%} / "
                          f"{item['bounds'][1]:.0%})")
            lines.append(
                f"| {name} | {NAMES[optimizer]} | {item['rank']} / {len(summary)}"
                f" | {item['lr']:g}"
                f"{' (grid edge)' if item['at_edge'] else ''} | "
                f"{_final_text(item['final'])} | "
                f"{'not reached' if steps is None else steps} / {info['steps']} | "
                f"{held_out} | {item['ms_per_step']:.2f} | {bounds} | {fisher} |"
            )
    return lines


def sweep_table(summary):
    optimizers = list(summary)
    lrs = sorted({s["lr"] for item in summary.values()
                  for s in item["sweep"].values()})
    lines = ["| lr | " + " | ".join(NAMES[o] for o in optimizers) + " |",
             "|---|" + "---|" * len(optimizers)]
    for lr in lrs:
        cells = []
        for optimizer in optimizers:
            item = summary[optimizer]
            found = [s for s in item["sweep"].values() if s["lr"] == lr]
            if not found:
                cells.append("")
                continue
            text = _final_text(found[0])
            cells.append(f"**{text}**" if lr == item["lr"] else text)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return lines


def verdict_line(name, summary):
    """One line of the verdict: the problem's best, and each SOAA variant."""
    best = strongest(summary)
    if best is None:
        return None
    parts = []
    # The recommended configuration first.
    for soaa in sorted(SOAA_VARIANTS, key=lambda o: o != RECOMMENDED):
        found = verdict(summary, soaa)
        if found:
            word, other = found
            parts.append(
                f"{NAMES[soaa]} (rank {summary[soaa]['rank']} of {len(summary)}) "
                f"{word} against {NAMES[other]} "
                f"({_final_text(summary[soaa]['final'])} vs "
                f"{_final_text(summary[other]['final'])})"
            )
    if not parts:
        return None
    return (f"- **{name}**: best {NAMES[best]} "
            f"({_final_text(summary[best]['final'])}). " + "; ".join(parts) + ".")


def _ratio_text(ratio):
    if ratio is None:
        return "—"
    return "not reached" if not math.isfinite(ratio) else f"{ratio:.2f}"


def _width_text(width):
    return "—" if width is None else f"{width:.2f}"


def targets_section(summaries, level="##"):
    """The controller targets (T1-T3, T4's interior part), per SOAA variant.

    Needs Adam in the run; empty otherwise. `level`: the heading's.
    """
    variants = [o for o in SOAA_VARIANTS
                if all(o in s for s in summaries.values())]
    if not variants or not all("adam" in s for s in summaries.values()):
        return []
    lines = [
        f"{level} Targets for the radius controllers",
        "",
        "Per problem and SOAA variant. **T1**: steps to reach tuned Adam's "
        "final train loss, over Adam's own steps (target: ≤ 0.8 on ≥ 80% of "
        "problems, never > 1.1). **T2**: final train loss against the best "
        "of Adam + cosine and ScheduleFreeAdamW (target: ties or wins on "
        "≥ 60%). **T3**: decades of learning rate whose mean final loss is "
        "within 2x of the optimizer's best, against Adam's (target: wider "
        "on ≥ 80%). **T4** (its interior part): share of steps with the "
        "radius strictly inside its bounds (target ≥ 50%); the placebo and "
        "oracle parts are in `benchmarks/controller_signal.py`'s output.",
        "",
        "| problem | optimizer | T1 steps / Adam's | T2 vs best scheduled "
        "| T3 width (Adam's), decades | T4 interior |",
        "|---|---|---|---|---|---|",
    ]
    per_variant = {o: {} for o in variants}
    for name, summary in summaries.items():
        for optimizer in variants:
            figures = target_figures(summary, optimizer)
            per_variant[optimizer][name] = figures
            against = "—"
            if figures["against_scheduled"] is not None:
                against = (f"{figures['against_scheduled']} "
                           f"({NAMES[figures['scheduled_peer']]})")
            interior = ("—" if figures["interior"] is None
                        else f"{figures['interior']:.1%}")
            lines.append(
                f"| {name} | {NAMES[optimizer]} | "
                f"{_ratio_text(figures['steps_ratio'])} | {against} | "
                f"{_width_text(figures['width'])} "
                f"({_width_text(figures['adam_width'])}) | {interior} |")
    lines += ["", "Overall:", ""]
    for optimizer in variants:
        verdicts = target_verdicts(per_variant[optimizer])
        parts = []
        if "T1" in verdicts:
            t1 = verdicts["T1"]
            parts.append(f"T1 {'met' if t1['pass'] else 'missed'} "
                         f"(≤ 0.8 on {t1['share_at_most_0.8']:.0%}, worst "
                         f"{_ratio_text(t1['worst'])})")
        if "T2" in verdicts:
            t2 = verdicts["T2"]
            parts.append(f"T2 {'met' if t2['pass'] else 'missed'} "
                         f"(ties or wins on {t2['share_ties_or_wins']:.0%})")
        if "T3" in verdicts:
            t3 = verdicts["T3"]
            parts.append(f"T3 {'met' if t3['pass'] else 'missed'} "
                         f"(wider on {t3['share_wider']:.0%})")
        if "T4_interior" in verdicts:
            t4 = verdicts["T4_interior"]
            parts.append(f"T4 interior {'met' if t4['pass'] else 'missed'} "
                         f"(mean {t4['mean']:.1%}, lowest {t4['min']:.1%})")
        lines.append(f"- **{NAMES[optimizer]}**: " + "; ".join(parts) + ".")
    return lines + [""]


def versions_text(versions):
    """"keras-soaa **0.3.2** (keras 3.15.1, jax 0.10.2)": the versions the
    run had installed (`runner.versions()`, read when it ran)."""
    others = ", ".join(f"{k} {v}" for k, v in versions.items()
                       if k != "keras-soaa")
    return (f"keras-soaa **{versions.get('keras-soaa', '?')}**"
            + (f" ({others})" if others else ""))


def merged_text(config):
    """A line naming the runs `--merge` took from another folder, with the
    versions that made them."""
    merged = config.get("merged_from")
    if not merged or not merged["optimizers"]:
        return []
    made = merged.get("versions")
    return [f"Runs of {', '.join(NAMES[o] for o in merged['optimizers'])} "
            f"merged from `{merged['folder']}`"
            + (f", made with {versions_text(made)}" if made else "")
            + ".", ""]


# The problem sets (`problems.SETS`), as the report heads them.
SET_TITLES = {"calibration": "Calibration set (tuned on)",
              "held_out": "Held-out set (never tuned on)"}


def problem_set(entry):
    """The set of a result's problem (results from before the sets were
    named hold calibration problems only)."""
    return entry["problem"].get("set", "calibration")


def set_text(results):
    """The report's line saying which problem set its results cover."""
    found = {problem_set(entry) for entry in results.values()}
    if found == {"calibration"}:
        return ("Problem set: **calibration** (the problems a controller's "
                "constants may be tuned on).")
    if found == {"held_out"}:
        return ("Problem set: **held-out** (never tuned on: no controller "
                "constant was chosen by looking at these problems).")
    return ("Problem sets: **calibration** (tuned on) and **held-out** "
            "(never tuned on), each in its own section below.")


def results_section(results, summaries, optimizers, level="##"):
    """The main table, the verdict, the worst case and the targets for the
    problems of `summaries`."""
    lines = [*table(results, summaries), ""]
    verdicts = [line for name, summary in summaries.items()
                if (line := verdict_line(name, summary))]
    if verdicts:
        lines += [
            "SOAA against the strongest optimizer of each problem that is not "
            "SOAA, on final train loss (a tie: the gap is within the sum of "
            "the two stds, or within 2%):",
            "",
            *verdicts,
            "",
        ]
    lines += worst_case_section(summaries, optimizers)
    return lines + targets_section(summaries, level)


def write(results, config, out_dir):
    """Writes `report.md` and one PNG per problem; returns the file names."""
    summaries = {name: summarize(entry) for name, entry in results.items()}
    written = []
    for name, entry in results.items():
        plot_problem(name, entry, summaries[name],
                     os.path.join(out_dir, f"{name}.png"))
        written.append(f"{name}.png")

    seeds = config["seeds"]
    run = [NAMES[o] for o in config["optimizers"]]
    mode = config.get("mode", "quick" if config["quick"] else None)
    lines = [
        "# SOAA against Keras' optimizers",
        "",
        f"`{config['command'].strip()}`: "
        + (f"{mode} mode, " if mode else "")
        + f"{versions_text(config['versions'])}, backend "
        f"**{config['backend']}**, {config['machine']}, {len(seeds)} seed(s) "
        f"({', '.join(map(str, seeds))}), {config['minutes']:.1f} minutes"
        f"{' (quick smoke run: numbers mean nothing)' if config['quick'] else ''}.",
        "",
        set_text(results),
        "",
        *merged_text(config),
        f"Optimizers: {', '.join(run)}. Every optimizer gets the same "
        "learning-rate grid, seeds (a seed fixes the initial weights and the "
        "batch order) and steps, through `model.fit`; SOAA with "
        "`TrustRegionCallback` (which sets `total_steps`) and its default "
        "`radius_bound` γ = 0.1. Keras' optimizers run with their default "
        "arguments apart from the learning rate (AdamW, Muon: weight decay "
        "0.004; ScheduleFreeAdamW: no weight decay, no warmup; Muon: its AdamW "
        "step for non-2-D variables, embeddings and the output layer). "
        "*+ cosine*: the learning rate follows "
        "`keras.optimizers.schedules.CosineDecay` from the grid's rate to 0 "
        "at the last step.",
        "",
        *([] if "hypergradient" not in config else [
            "*SOAA-HD*: `SOAA(controller=\"hypergradient\")` with "
            + ", ".join(f"`{k}={v:g}`"
                        for k, v in config["hypergradient"].items())
            + ": after every step log d moves by radius_learning_rate × "
            "cos(g_t, u_{t−1}), clipped to [min_radius, max_radius]; no "
            "observed loss moves it (`TrustRegionCallback` only logs it). "
            "*SOAA* and *SOAA + cosine* use the paper's loss-ratio "
            "controller.",
            "",
        ]),
        *([] if not any(o.startswith("soaa_gr") for o in config["optimizers"])
          else [
            "*SOAA-GR*: `SOAA(controller=\"gradient_ratio\")` at its "
            "defaults (`radius_learning_rate=0.05`, `min_radius=0.1`, "
            "`max_radius=10`): after every step ρ = (1 + A/P)/2 from "
            "running averages of g_t·u_{t−1} (A) and m̂_{t−1}·u_{t−1} (P); "
            "log d grows by radius_learning_rate where ρ > 0.5 and shrinks "
            "by it where ρ < 0.1, clipped to [min_radius, max_radius]; no "
            "observed loss moves it.",
            "",
        ]),
        *([] if config["backend"] == "jax" or "schedulefree"
          not in config["optimizers"] else [
            f"Note: on {config['backend']}, Keras 3.15's ScheduleFreeAdamW is "
            "not the paper's update: it recovers x_old from y_old with the "
            "already updated z (its `momentum.value` is read after "
            "`assign_sub` changed it in place). On JAX it follows the paper.",
            "",
        ]),
        "- **rank**: by mean final train loss among the optimizers of the "
        "problem (rows are in that order).",
        "- **final train loss**: the mean training loss of the last 10% of "
        "steps, mean ± sample std over seeds. The **tuned lr** is the grid point with "
        "the lowest mean final train loss, for every optimizer alike; "
        "*(grid edge)* marks a rate at the end of the grid. For "
        "ScheduleFreeAdamW it is the loss at the point Keras trains, y.",
        "- **steps to Adam's final loss**: the first step at which the "
        "seed-averaged loss, averaged over the same trailing window, reaches "
        "tuned Adam's final train loss.",
        "- **held-out metric**: of the tuned runs, mean ± sample std over seeds. "
        "ScheduleFreeAdamW: at the weights Keras leaves in the model (the "
        "interpolated point y) and *at x*, the averaged point "
        "x = (y − (1 − β1)·z) / β1 that its authors evaluate.",
        "- **ms/step**: median over all of the optimizer's runs of `fit`'s wall "
        "time per step after compilation, callbacks included (SOAA's "
        "`TrustRegionCallback` hands each batch's loss to SOAA's controller "
        "with one compiled call and reads back a few scalars after every "
        "batch; the benchmark's recorder reads every optimizer's batch loss).",
        "- **radius**: SOAA's trust-region radius d (it multiplies the step) "
        "in the tuned runs: its mean over steps and seeds, and the share of "
        "steps after which it equals its lower bound or its upper bound "
        "(paper controller: (1 − γ)^e and 1 + γ^e, e = min(t − 1, T)/T; "
        "SOAA-HD: min_radius and max_radius). The rest of the steps it is "
        "strictly inside.",
        "- **weights in the Fisher regime**: SOAA steps by d·m̂ / max(d·c·v̂, "
        "√v̂). Where √v̂ is the larger (small gradients) the step is Adam's "
        "times d; where d·c·v̂ is (√v̂ > 1/(d·c)) it is m̂ / (c·v̂) and d cancels. "
        "The share of weights in the second case, sampled every 10 steps of "
        "the tuned runs, averaged.",
        "",
    ]
    # Every optimizer that ran, in the run's order.
    optimizers = list(dict.fromkeys(o for entry in results.values()
                                    for o in entry["runs"]))
    sets = [name for name in SET_TITLES
            if any(problem_set(entry) == name for entry in results.values())]
    if len(sets) == 1:
        lines += results_section(results, summaries, optimizers)
    else:
        # Each set on its own: the held-out figures are never mixed with
        # those of the problems tuned on.
        for name in sets:
            part = {p: s for p, s in summaries.items()
                    if problem_set(results[p]) == name}
            lines += [f"## {SET_TITLES[name]}", "",
                      *results_section(results, part, optimizers, "###")]
    for name, summary in summaries.items():
        info = results[name]["problem"]
        lines += [
            f"## {name}",
            "",
            f"{info['description']}; {info['steps']} steps.",
            "",
            f"![{name}]({name}.png)",
            "",
            "Final train loss per learning rate (tuned in bold):",
            "",
            *sweep_table(summary),
            "",
        ]
    with open(os.path.join(out_dir, "report.md"), "w") as file:
        file.write("\n".join(lines))
    written.append("report.md")
    return written


if __name__ == "__main__":
    import compare

    folder = sys.argv[1] if len(sys.argv) > 1 else compare.latest_run(
        modes=("full", "default", "quick"))
    if folder is None:
        raise SystemExit(f"no results.json under {compare.RUNS}; name a "
                         "folder: python benchmarks/report.py DIR")
    with open(os.path.join(folder, "results.json")) as file:
        saved = json.load(file)
    print(write(saved["results"], saved["config"], folder))
