"""The benchmark (`benchmarks/compare.py --quick`) runs and writes its outputs."""

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import compare  # noqa: E402
import problems  # noqa: E402
import report  # noqa: E402
import runner  # noqa: E402

OPTIMIZERS = ("soaa", "adam")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("benchmark")
    results, config = compare.main(
        ["--quick", "--optimizers", ",".join(OPTIMIZERS), "--out", str(out)]
    )
    return out, results, config


def main_table_rows(text):
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("| problem | optimizer |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_has_a_row_per_problem_and_optimizer(quick_run):
    out, results, _ = quick_run
    rows = main_table_rows((out / "report.md").read_text())
    assert sorted((row[0], row[1]) for row in rows) == sorted(
        (name, report.NAMES[o]) for name in problems.PROBLEM_NAMES
        for o in OPTIMIZERS
    )
    for row in rows:
        grid = results[row[0]]["problem"]["lrs"]
        assert float(row[2].split()[0]) in grid
        assert "±" in row[3]
        steps = results[row[0]]["problem"]["steps"]
        assert row[4].endswith(f"/ {steps}")
        if row[1] == "SOAA":
            assert row[7].count("%") == 2
            assert 0 <= float(row[8].rstrip("%")) <= 100
        else:
            assert row[7] == row[8] == "—"
    text = (out / "report.md").read_text()
    for name in problems.PROBLEM_NAMES:
        assert f"## {name}" in text and f"![{name}]({name}.png)" in text


def test_plots_are_png_files(quick_run):
    out, _, _ = quick_run
    for name in problems.PROBLEM_NAMES:
        data = (out / f"{name}.png").read_bytes()
        assert data[:8] == PNG_SIGNATURE
        assert data[12:16] == b"IHDR"
        width, height = struct.unpack(">II", data[16:24])
        assert width >= 400 and height >= 300
        assert len(data) > 20_000


def test_every_run_is_recorded_and_soaa_radius_stays_in_its_bounds(quick_run):
    _, results, config = quick_run
    assert config["seeds"] == [0]
    for entry in results.values():
        steps = entry["problem"]["steps"]
        assert steps == compare.QUICK_STEPS
        assert set(entry["runs"]) == set(OPTIMIZERS)
        for optimizer, by_lr in entry["runs"].items():
            assert [float(lr) for lr in by_lr] == entry["problem"]["lrs"]
            for records in by_lr.values():
                (record,) = records
                assert len(record["loss"]) == steps
                assert np.all(np.isfinite(record["loss"]))
                assert np.all(np.diff(record["time"]) >= 0)
                if optimizer != "soaa":
                    assert record["radius"] is None
                    assert record["fisher_share"] is None
                    continue
                # Probed at steps 1 and 11, ... (every 10 steps).
                assert len(record["fisher_share"]) == -(-steps // 10)
                assert all(0 <= share <= 1 for share in record["fisher_share"])
                radius = np.array(record["radius"])
                lower, upper = report.radius_bounds(steps, steps)
                assert len(radius) == steps
                assert np.all(radius >= lower * (1 - 1e-6))
                assert np.all(radius <= upper * (1 + 1e-6))
                # The first observation puts the radius on its lower bound, 1.
                assert radius[0] == pytest.approx(1.0)


def test_report_redraws_identically_from_results_json(quick_run, tmp_path):
    out, _, _ = quick_run
    saved = json.loads((out / "results.json").read_text())
    report.write(saved["results"], saved["config"], str(tmp_path))
    assert (tmp_path / "report.md").read_text() == (out / "report.md").read_text()


def test_a_reused_compiled_model_reproduces_fresh_runs():
    problem = problems.make_problem("quadratic", steps=10, quick=True)
    learning_rates, seeds = [0.03, 0.1], [0]
    reused = runner.sweep(problem, "soaa", learning_rates, seeds, reuse=True)
    fresh = runner.sweep(problem, "soaa", learning_rates, seeds, reuse=False)
    for key in reused:
        for a, b in zip(reused[key], fresh[key]):
            np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
            np.testing.assert_allclose(a["radius"], b["radius"], rtol=1e-5)
    # The two rates really ran differently.
    first, second = (reused[key][0]["loss"] for key in reused)
    assert first[-1] != second[-1]


def test_radius_bounds_follow_the_spec():
    lower, upper = report.radius_bounds(steps=5, total_steps=4)
    # After step t: e = min(t - 1, T) / T.
    e = np.array([0, 1, 2, 3, 4]) / 4
    np.testing.assert_allclose(lower, 0.9**e)
    np.testing.assert_allclose(upper, 1 + 0.1**e)
    assert (lower[0], upper[0]) == (1.0, 2.0)
    assert (lower[-1], upper[-1]) == pytest.approx((0.9, 1.1))
    radii = [1.0, 1.5, upper[2], lower[3], 1.0]
    assert report.bound_fractions(radii, total_steps=4) == (0.4, 0.2)


def test_trailing_mean_and_verdict():
    np.testing.assert_allclose(
        report.trailing_mean([4.0, 2.0, 6.0, 0.0], window=2), [4, 3, 4, 3]
    )

    def entry(mean, std):
        return {"final": {"mean": mean, "std": std}}

    summary = {"soaa": entry(1.0, 0.01), "adam": entry(2.0, 0.01),
               "adamw": entry(3.0, 0.01)}
    assert report.verdict(summary) == ("wins", "adam")
    summary["soaa"] = entry(2.01, 0.0)
    assert report.verdict(summary) == ("ties", "adam")
    summary["soaa"] = entry(2.5, 0.1)
    assert report.verdict(summary) == ("loses", "adam")
