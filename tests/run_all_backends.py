"""Lint, then run the test suite once per Keras backend.

    python tests/run_all_backends.py [pytest args...]

Runs `ruff check`, then `tests/check_wheel.py` (the built wheel installs and
trains on every backend), then `mkdocs build --strict` (the documentation site
in docs/ builds with no broken link, anchor or API reference; the site goes to
a temporary directory, not the repository), then `pytest` with `KERAS_BACKEND`
set to tensorflow, jax and torch in turn (its output streams through, a line
per test file), with a line of passed, failed, skipped and error counts per
backend, and ends with one summary line (failed there counts errors). Exits
non-zero if the lint, the wheel check, the docs build or any backend fails (or
runs no test).
"""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax", "torch")


def count(pattern, text):
    found = re.findall(rf"(\d+) {pattern}", text)
    return int(found[-1]) if found else 0


def main(pytest_args):
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT
    )
    if lint.returncode != 0:
        print("ruff check failed")
        return 1
    wheel = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "check_wheel.py")], cwd=ROOT
    )
    if wheel.returncode != 0:
        print("wheel check failed")
        return 1
    with tempfile.TemporaryDirectory(prefix="keras-soaa-site-") as site_dir:
        docs = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict",
             "--site-dir", site_dir],
            cwd=ROOT, env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
        )
    if docs.returncode != 0:
        print("mkdocs build failed")
        return 1
    totals = dict.fromkeys(("passed", "failed", "skipped", "errors"), 0)
    failing = []
    for backend in BACKENDS:
        start = time.time()
        print(f"=== KERAS_BACKEND={backend}", flush=True)
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1")
        # pytest's line per test file streams through as each file finishes.
        with subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
             *pytest_args],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        ) as pytest:
            last = ""
            for line in pytest.stdout:
                print(line, end="", flush=True)
                last = line if line.strip() else last
        counts = {
            "passed": count("passed", last), "failed": count("failed", last),
            "skipped": count("skipped", last), "errors": count("errors?", last),
        }
        for key, value in counts.items():
            totals[key] += value
        if pytest.returncode != 0 or counts["passed"] == 0:
            failing.append(backend)
        print(f"=== {backend}: " + ", ".join(f"{v} {k}" for k, v in counts.items())
              + f" in {time.time() - start:.0f}s", flush=True)
    if failing:
        print(f"backends failing: {', '.join(failing)}")
    print(f"total: {totals['passed']} passed, "
          f"{totals['failed'] + totals['errors']} failed, "
          f"{totals['skipped']} skipped")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
