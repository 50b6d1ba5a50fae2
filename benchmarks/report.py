"""The tables (markdown) and figures (matplotlib) of a benchmark run.

    python benchmarks/report.py DIR   # redraws DIR's report from its results.json
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
from matplotlib import ticker  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from optimizers import OPTIMIZERS, PEERS, RECOMMENDED, label  # noqa: E402

# Every panel shows at most this many optimizers (all are in the tables).
MAX_CURVES = 5
SET_TITLES = {"calibration": "Calibration set (tuned on)",
              "held_out": "Held-out set (never tuned on)"}


# -- numbers --------------------------------------------------------------------


def trailing_mean(values, window):
    """Mean of the last `window` values at each step (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, "float64"), 0, 0.0))
    ends = np.arange(1, len(sums))
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def mean_std(values):
    values = np.asarray(values, "float64")
    return float(values.mean()), float(values.std(ddof=min(1, len(values) - 1)))


def bound_shares(name, radii):
    """Shares of steps on row `name`'s lower and upper radius bound, or `None`."""
    row = OPTIMIZERS.get(name)
    if row is None or row.radius_bounds is None:
        return None
    radii = np.asarray(radii, "float64")
    return tuple(float(np.mean(np.abs(radii - bound) <= 1e-5 * bound))
                 for bound in row.radius_bounds(len(radii)))


def summarize(entry):
    """Per optimizer: its sweep, tuned rate (the lowest mean final training
    loss over seeds) and the tuned runs' figures; ranked."""
    info = entry["problem"]
    summary = {}
    for name, by_lr in entry["runs"].items():
        sweep = {}
        for key, records in by_lr.items():
            finals = [r["final_loss"] for r in records]
            diverged = any(f is None for f in finals)
            mean, std = (math.inf, 0.0) if diverged else mean_std(finals)
            sweep[key] = {"lr": float(key), "mean": mean, "std": std,
                          "diverged": diverged}
        key = min(sweep, key=lambda k: sweep[k]["mean"])
        runs = by_lr[key]
        lrs = [s["lr"] for s in sweep.values()]
        item = {"sweep": sweep, "lr": float(key), "final": sweep[key],
                "runs": runs, "soaa": runs[0]["radius"] is not None,
                "at_edge": len(lrs) > 1 and float(key) in (min(lrs), max(lrs)),
                "ms_per_step": float(np.median([r["ms_per_step"] for rs in
                                                by_lr.values() for r in rs])),
                "held_out": None, "held_out_x": None, "bounds": None}
        for field in ("held_out", "held_out_x"):
            values = [r.get(field) for r in runs]
            if all(v is not None for v in values):
                item[field] = mean_std(values)
        if item["soaa"] and not sweep[key]["diverged"]:
            shares = [bound_shares(name, r["radius"]) for r in runs]
            if None not in shares:
                item["bounds"] = tuple(np.mean(shares, axis=0))
            item["mean_radius"] = float(np.mean([r["radius"] for r in runs]))
            fisher = [s for r in runs for s in r.get("fisher_share") or []]
            item["fisher_share"] = float(np.mean(fisher)) if fisher else None
        if not sweep[key]["diverged"]:
            item["curve"] = np.mean([r["loss"] for r in runs], axis=0)
        summary[name] = item
    for rank, name in enumerate(ranking(summary), start=1):
        summary[name]["rank"] = rank
    target = summary.get("adam", {}).get("final", {}).get("mean", math.inf)
    for item in summary.values():
        item["steps_to_adam"] = None
        if "curve" in item and math.isfinite(target):
            smooth = trailing_mean(item["curve"], info["final_window"])
            reached = np.nonzero(smooth <= target * (1 + 1e-9))[0]
            if len(reached):
                item["steps_to_adam"] = int(reached[0]) + 1
    return summary


def ranking(summary):
    """From the lowest mean final training loss up (ties keep run order)."""
    return sorted(summary, key=lambda o: summary[o]["final"]["mean"])


def compare_finals(mine, other):
    """"wins", "ties" or "loses" on final loss: a tie when the gap is within
    the sum of the two stds over seeds, or within 2% of `other`'s."""
    if not (math.isfinite(mine["mean"]) and math.isfinite(other["mean"])):
        return ("ties" if mine["mean"] == other["mean"]
                else "wins" if mine["mean"] < other["mean"] else "loses")
    gap = mine["mean"] - other["mean"]
    margin = max(mine["std"] + other["std"], 0.02 * abs(other["mean"]))
    return "ties" if abs(gap) <= margin else "wins" if gap < 0 else "loses"


def loss_ratio(mine, best):
    """`mine / best` (final losses ≥ 0); `inf` if `mine` diverged."""
    if not math.isfinite(mine):
        return math.inf
    if best <= 0:
        return 1.0 if mine <= best else math.inf
    return mine / best


def best_peer(summary):
    """The peer (`PEERS`) with the lowest finite final loss, or `None`."""
    peers = [p for p in PEERS
             if p in summary and math.isfinite(summary[p]["final"]["mean"])]
    return min(peers, key=lambda p: summary[p]["final"]["mean"], default=None)


def worst_case(summaries, name):
    """`name`'s final loss over the best peer's per problem (`ratios`), the largest
    (`worst`, `worst_problem`), within 5% of Adam's on `near_adam` of `with_adam`."""
    ratios, near_adam, with_adam = {}, 0, 0
    for problem, summary in summaries.items():
        if name not in summary:
            continue
        mine = summary[name]["final"]["mean"]
        if (peer := best_peer(summary)) is not None:
            ratios[problem] = loss_ratio(mine, summary[peer]["final"]["mean"])
        adam = summary.get("adam", {}).get("final", {}).get("mean", math.inf)
        if math.isfinite(adam):
            with_adam += 1
            near_adam += bool(math.isfinite(mine) and mine <= 1.05 * adam)
    worst = max(ratios, key=ratios.get) if ratios else None
    return {"ratios": ratios, "worst_problem": worst,
            "worst": ratios[worst] if ratios else None,
            "near_adam": near_adam, "with_adam": with_adam}


def verdict(summaries):
    """The recommended SOAA against the best peer, per problem where both
    ran: {problem: (word (`compare_finals`), peer, ratio of final losses)}."""
    found = {}
    for problem, summary in summaries.items():
        if RECOMMENDED in summary and (peer := best_peer(summary)):
            mine, other = summary[RECOMMENDED]["final"], summary[peer]["final"]
            found[problem] = (compare_finals(mine, other), peer,
                              loss_ratio(mine["mean"], other["mean"]))
    return found


def verdict_lines(summaries):
    """The verdict in words: printed by `compare.py` and in the report."""
    name = f"{label(RECOMMENDED)} ({RECOMMENDED}, keras_soaa.presets.recommended)"
    found = verdict(summaries)
    if not found:
        return [f"{name}: no verdict (it did not run, or none of "
                f"{', '.join(label(p) for p in PEERS)} did)."]
    worst = max(found, key=lambda p: found[p][2])
    lines = [f"{name} against the best peer of each problem (the best of "
             f"{', '.join(label(p) for p in PEERS)} that ran, each at its tuned "
             "rate), on final training loss:",
             f"- worst ratio to the best peer: {_ratio(found[worst][2])} (on {worst})"]
    for word in ("wins", "ties", "loses"):
        cases = [f"{problem} ({_ratio(ratio)} x {label(peer)})"
                 for problem, (w, peer, ratio) in found.items() if w == word]
        lines.append(f"- {word} on {len(cases)}: " + (", ".join(cases) or "none"))
    return lines + ["(a tie: the gap is within the sum of the two standard "
                    "deviations over seeds, or within 2%)"]


def _ratio(ratio):
    return "∞ (diverged)" if not math.isfinite(ratio) else f"{ratio:.2f}"


# -- markdown -----------------------------------------------------------------


def _final(final):
    return ("diverged" if final["diverged"]
            else f"{final['mean']:.4g} ± {final['std']:.2g}")


def _pair(pair):
    return f"{pair[0]:.4g} ± {pair[1]:.2g}"


def table(results, summaries):
    """The main table: per problem, its optimizers from the best down."""
    lines = ["| problem | optimizer | rank | tuned lr | final train loss | steps to "
             "Adam's final loss | held-out metric | ms/step | radius: mean (on lower "
             "/ upper bound) | weights in the Fisher regime |", "|---" * 10 + "|"]
    for problem, summary in summaries.items():
        info = results[problem]["problem"]
        for name in ranking(summary):
            item = summary[name]
            held_out = radius = fisher = "—"
            if item["held_out"] is not None:
                metric = info["held_out_name"].replace("held-out ", "")
                held_out = f"{_pair(item['held_out'])} {metric}"
                if item["held_out_x"] is not None:
                    held_out += f" (at x: {_pair(item['held_out_x'])})"
            if item.get("mean_radius") is not None:
                radius = f"{item['mean_radius']:.2f}"
                if item["bounds"] is not None:
                    radius += f" ({item['bounds'][0]:.0%} / {item['bounds'][1]:.0%})"
            if item.get("fisher_share") is not None:
                fisher = f"{item['fisher_share']:.1%}"
            steps = item["steps_to_adam"]
            lines.append(
                f"| {problem} | {label(name)} | {item['rank']} / {len(summary)} | "
                f"{item['lr']:g}{' (grid edge)' if item['at_edge'] else ''} | "
                f"{_final(item['final'])} | {'not reached' if steps is None else steps}"
                f" / {info['steps']} | {held_out} | {item['ms_per_step']:.2f} | "
                f"{radius} | {fisher} |")
    return lines


def sweep_table(summary):
    """Final loss per learning rate and optimizer, the tuned one in bold."""
    def cell(name, lr):
        found = [s for s in summary[name]["sweep"].values() if s["lr"] == lr]
        text = _final(found[0]) if found else ""
        return f"**{text}**" if found and lr == summary[name]["lr"] else text

    lrs = sorted({s["lr"] for i in summary.values() for s in i["sweep"].values()})
    return ["| lr | " + " | ".join(label(o) for o in summary) + " |",
            "|---|" + "---|" * len(summary),
            *(f"| {lr:g} | " + " | ".join(cell(o, lr) for o in summary) + " |"
              for lr in lrs)]


def worst_case_lines(summaries, names):
    lines = []
    for name in names:
        figures = worst_case(summaries, name)
        parts = []
        if figures["worst"] is not None:
            parts.append(f"worst ratio {figures['worst']:.2f} (on "
                         f"{figures['worst_problem']})" if math.isfinite(
                             figures["worst"]) else
                         f"diverged on {figures['worst_problem']} (worst ratio ∞)")
        if figures["with_adam"]:
            parts.append(f"within 5% of tuned Adam on {figures['near_adam']} "
                         f"of {figures['with_adam']} problems")
        if parts:
            lines.append(f"- **{label(name)}**: " + "; ".join(parts) + ".")
    return lines and [
        "Worst case per optimizer: the largest ratio, over the problems, of its final "
        "train loss to the best peer's (the best of "
        f"{', '.join(label(p) for p in PEERS)} that ran; 1.00: it is, or matches, the "
        "best of them everywhere), and on how "
        "many problems its final train loss is within 5% of tuned Adam's:", "",
        *lines, ""]


def section(results, summaries, names, level="##"):
    """Verdict, main table and worst cases for the problems of `summaries`."""
    words = verdict_lines(summaries)
    if len(words) > 1:  # the head, a list, the tie rule
        words = [words[0], "", *words[1:-1], "", words[-1]]
    return [f"{level} Verdict", "", *words, "", *table(results, summaries), "",
            *worst_case_lines(summaries, names)]


INTRO = [
    "- **recommended SOAA**: `keras_soaa.presets.recommended`, the same-batch "
    "controller (radius in [0.01, 100], one more forward pass every 4th batch) "
    "with a cosine decay of the rate to 0; *SOAA (paper)*: `SOAA()`; *SOAA (paper) "
    "+ cosine*: `keras_soaa.presets.paper_cosine`; *SOAA-HD*, *SOAA-GR*, *SOAA "
    "same-batch*: `controller=\"hypergradient\"`, `\"gradient_ratio\"` (radius in "
    "[0.1, 10]), `\"same_batch\"`; *+ cosine*: `CosineDecay` of the rate to 0. "
    "Keras' optimizers at "
    "their defaults but the rate. Every optimizer gets the same rate grid, seeds "
    "(initial weights and batch order) and steps, in `model.fit` (SOAA with "
    "`TrustRegionCallback`).",
    "- **final train loss**: the mean training loss of the last 10% of steps, mean ± "
    "std over seeds, at the **tuned lr** (the grid point with the lowest mean; *grid "
    "edge*: an end of the grid). **Steps to Adam's final loss**: the first step where "
    "the mean curve (same window) reaches it.",
    "- **held-out metric**: of the tuned runs; ScheduleFreeAdamW also *at x*, its "
    "averaged point (Keras trains y). **ms/step**: median time per step of `fit` "
    "after compilation, callbacks included.",
    "- **radius**: SOAA's radius d, mean and shares of steps on its lower / upper "
    "bound. **Fisher regime**: the share of weights whose step is m̂ / (c·v̂), where "
    "d cancels (else Adam's step times d).",
]


def write(results, config, out_dir):
    """Writes `report.md` and one PNG per problem; returns the file names."""
    summaries = {name: summarize(entry) for name, entry in results.items()}
    written = []
    for name, entry in results.items():
        plot_problem(name, entry, summaries[name], os.path.join(out_dir, f"{name}.png"))
        written.append(f"{name}.png")
    versions = config["versions"]
    others = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "keras-soaa")
    merged = config.get("merged_from")
    lines = [
        "# SOAA against Keras' optimizers", "",
        f"`{config['command'].strip()}`: {config['mode']} mode, keras-soaa "
        f"**{versions.get('keras-soaa', '?')}** ({others}), backend "
        f"**{config['backend']}**, {config['machine']}, "
        f"{len(config['seeds'])} seed(s), {config['minutes']:.1f} minutes"
        + (" (a quick smoke run: its numbers mean nothing)"
           if config["mode"] == "quick" else "") + ".", "",
        f"Problems: **{SET_TITLES.get(config.get('set'), 'both sets, apart')}**. "
        "Optimizers: " + ", ".join(label(o) for o in config["optimizers"]) + ".", "",
        *([f"Runs of {', '.join(label(o) for o in merged['optimizers'])} "
           f"merged from `{merged['folder']}`.", ""] if merged else []),
        *INTRO, *([] if config["backend"] == "jax" else [
            "- On TensorFlow and torch, Keras 3.15's ScheduleFreeAdamW reads z after "
            "updating it: not quite the paper's update (JAX's is)."]), "",
    ]
    names = list(dict.fromkeys(o for e in results.values() for o in e["runs"]))
    sets = [s for s in SET_TITLES
            if any(e["problem"].get("set") == s for e in results.values())]
    if len(sets) < 2:
        lines += section(results, summaries, names)
    else:  # each set on its own: held-out figures never mix with tuned ones
        for name in sets:
            part = {p: s for p, s in summaries.items()
                    if results[p]["problem"]["set"] == name}
            lines += [f"## {SET_TITLES[name]}", "",
                      *section(results, part, names, "###")]
    for name, summary in summaries.items():
        info = results[name]["problem"]
        lines += [f"## {name}", "", f"{info['description']}; {info['steps']} steps.",
                  "", f"![{name}]({name}.png)", "",
                  "Final train loss per learning rate (tuned in bold):", "",
                  *sweep_table(summary), ""]
    with open(os.path.join(out_dir, "report.md"), "w") as file:
        file.write("\n".join(lines))
    return written + ["report.md"]


# -- figures --------------------------------------------------------------------


def plotted(summary):
    """At most `MAX_CURVES` optimizers, in rank order: the recommended SOAA, the
    paper's and Adam, then the strongest non-SOAA, then other SOAA variants."""
    order = ranking(summary)
    fixed = [o for o in (RECOMMENDED, "soaa", "adam") if o in summary]
    rest = ([o for o in order if o not in fixed and not summary[o]["soaa"]]
            + [o for o in order if o not in fixed and summary[o]["soaa"]])
    keep = set(fixed) | set(rest[:MAX_CURVES - len(fixed)])
    return [o for o in order if o in keep]


def style(name):
    """Colour from the table; the recommended SOAA bold; schedules dashed."""
    row = OPTIMIZERS.get(name)
    return {"color": row.colour if row else "black",
            "lw": 2.2 if name == RECOMMENDED else 1.4,
            "ls": "--" if row and row.schedule else "-"}


def wall_clock(records):
    """Mean seconds since each run's first step (which may compile)."""
    return np.mean([np.asarray(r["time"], "float64") - r["time"][0]
                    for r in records], axis=0)


def log_axis(axis):
    """Log ticks written 0.01, 2, 300; a narrow range is drawn linear."""
    low, high = axis.get_ylim()
    if high / low < 3:
        axis.set_yscale("linear")
        return
    axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.yaxis.set_minor_formatter(ticker.FuncFormatter(  # 2s, 3s, 5s too
        lambda v, _: f"{v:g}" if high / low < 10 and f"{v:.0e}"[0] in "235"
        else ""))


def plot_problem(name, entry, summary, path):
    """Loss vs step and vs time, the rate sweep and SOAA's radius: one PNG."""
    steps = entry["problem"]["steps"]
    window = 1 if entry["problem"]["exact_gradients"] else max(1, steps // 50)
    shown = plotted(summary)
    live = [o for o in shown if not summary[o]["final"]["diverged"]]
    handles = [Line2D([], [], **style(o), label=f"#{summary[o]['rank']} {label(o)} ("
                      + ("diverged" if o not in live else f"lr {summary[o]['lr']:g}")
                      + ")") for o in shown]
    figure, ((by_step, by_time), (by_lr, radius)) = plt.subplots(
        2, 2, figsize=(11, 8.2))
    x = np.arange(1, steps + 1)
    for o in live:
        curves = np.array([trailing_mean(r["loss"], window)
                           for r in summary[o]["runs"]])
        for axis, along in ((by_step, x), (by_time, wall_clock(summary[o]["runs"]))):
            axis.plot(along, curves.mean(0), **style(o))
            axis.fill_between(along, curves.min(0), curves.max(0),
                              color=style(o)["color"], alpha=0.15, lw=0)
    smoothing = "" if window == 1 else f", {window}-step moving average"
    by_step.set(xlabel="step", ylabel="training loss", yscale="log",
                title=f"loss vs step (mean, min-max over seeds{smoothing})")
    by_time.set(xlabel="seconds since the first step", yscale="log", ylabel=
                "training loss", title="loss vs wall-clock (compilation excluded)")
    for o in shown:
        points = [(s["lr"], s["mean"], [r["final_loss"] or math.inf
                                         for r in entry["runs"][o][key]])
                  for key, s in summary[o]["sweep"].items()
                  if math.isfinite(s["mean"])]
        if points:
            lrs, means, finals = zip(*points)
            by_lr.errorbar(lrs, means, yerr=[[m - min(f) for m, f in zip(
                means, finals)], [max(f) - m for m, f in zip(means, finals)]],
                marker="o", ms=4, capsize=3, **style(o))
        if o in live:
            by_lr.plot([summary[o]["lr"]], [summary[o]["final"]["mean"]],
                       marker="*", ms=14, color=style(o)["color"], ls="none")
    by_lr.set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final "
              "training loss", title="learning-rate sweep (mean, min-max; ★ tuned)")
    grid = sorted({s["lr"] for o in shown for s in summary[o]["sweep"].values()})
    by_lr.set_xticks(grid, [f"{lr:g}" for lr in grid], fontsize=8)
    by_lr.xaxis.set_minor_locator(ticker.NullLocator())
    plot_radius(radius, [o for o in live if summary[o]["soaa"]], summary, x)
    for axis in (by_step, by_time, by_lr):
        log_axis(axis)
    hidden = len(summary) - len(shown)
    figure.suptitle(name + (f": {len(shown)} of {len(summary)} optimizers "
                            "(#rank by final train loss; all in the report)"
                            if hidden else ""), fontsize=12)
    figure.legend(handles=handles, loc="lower center", ncol=3, fontsize=9,
                  frameon=False)
    figure.tight_layout(rect=(0, (0.3 * -(-len(handles) // 3) + 0.25) / 8.2, 1, 1))
    buffer = io.BytesIO()  # a 256-colour PNG: a third of the RGBA size
    figure.savefig(buffer, dpi=72, format="png")
    plt.close(figure)
    from PIL import Image

    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(256).save(path, optimize=True)


def plot_radius(axis, names, summary, x):
    """SOAA's radius per seed, with each row's bounds (dotted)."""
    if not names:
        axis.text(0.5, 0.5, "SOAA not run (or diverged)", ha="center",
                  transform=axis.transAxes)
    titles, bounds = [], set()
    for name in names:
        item = summary[name]
        for record in item["runs"]:
            axis.plot(x, record["radius"], alpha=0.7, **{**style(name), "lw": 0.9})
        row = OPTIMIZERS.get(name)
        if row is not None and row.radius_bounds is not None:
            bounds.add(tuple(map(tuple, row.radius_bounds(len(x)))))
        if item["bounds"] is not None:
            titles.append(f"{label(name)}: {item['bounds'][0]:.0%} / "
                          f"{item['bounds'][1]:.0%}")
    for lower, upper in bounds:
        axis.plot(x, lower, "k:", lw=1)
        axis.plot(x, upper, "k:", lw=1)
    low, high = axis.get_ylim()
    if low > 0 and high / low > 3:  # a wide range (constant bounds): log
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.yaxis.set_minor_formatter(ticker.NullFormatter())
    axis.set(xlabel="step", ylabel="radius d")
    axis.set_title("radius d per seed, bounds dotted; on lower / upper "
                   "bound:\n" + ", ".join(titles), fontsize=9)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python benchmarks/report.py DIR")
    with open(os.path.join(sys.argv[1], "results.json")) as file:
        saved = json.load(file)
    print(write(saved["results"], saved["config"], sys.argv[1]))
