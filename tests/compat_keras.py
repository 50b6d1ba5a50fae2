"""Run the core tests against other Keras releases, in scratch virtualenvs.

    python tests/compat_keras.py [--root DIR] [--keras SPEC ...]
        [--backends NAME ...] [--tree SRC] [-- PYTEST_ARGS...]

For each Keras requirement SPEC (default: `keras-nightly` and `keras==3.13.2`;
e.g. `--keras keras==3.14.1` for another), this creates a virtualenv under
DIR (default: `<system temp dir>/keras-soaa-compat`; refused inside the
repository), installs into it `tensorflow-cpu`, `jax[cpu]`, `torch==2.13.0`
(exactly that version: the local CPU wheel; any other version pulls a
multi-GB CUDA build), `pytest` and `hypothesis`, then that Keras. This
package is not installed there: the repository (or `--tree SRC`, a copy of
it, e.g. `git archive HEAD | tar -x -C SRC` to test the last commit while the
working tree is mid-edit) goes on `PYTHONPATH`, and no file in it is
written. A venv that already exists is reused (pip only tops it up), so a
second run skips the downloads.

It then runs `pytest` on `CORE_TESTS` once per backend with `KERAS_BACKEND`
set, and ends with a table: Keras version, backend, passed, failed, skipped,
errors, seconds. The pytest output of each run is kept beside its venv in
`DIR/<venv>/pytest-<backend>.log`, and the failing tests' short summary
lines (with their messages) are printed under the table. Arguments after
`--` go to pytest, e.g. `-- -k "not golden"` to leave out the golden-file
tests (`.keras` files written by Keras 3.15, which older Keras can't load:
there they skip themselves, as the torch run's `format="torch"` export does)
or `-- tests/test_same_batch.py` to run another file too.
Exits 1 if an install fails or any run fails or runs no test.

Keras older than the one `pyproject.toml` requires is expected to fail in
places; the table is the record of where.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE_TESTS = (
    "tests/test_callback.py",
    "tests/test_optimizer.py",
    "tests/test_saving.py",
    "tests/test_controllers.py",
)
BACKENDS = ("tensorflow", "jax", "torch")
BASE_PACKAGES = ("tensorflow-cpu", "jax[cpu]", "torch==2.13.0", "pytest", "hypothesis")


def venv_name(spec):
    return "keras-" + re.sub(r"[^A-Za-z0-9.]+", "-", spec).strip("-")


def pip(python, *args):
    command = [str(python), "-m", "pip", "install", "-q", *args]
    print("$", " ".join(command[2:]), flush=True)
    return subprocess.run(command).returncode == 0


def prepare(spec, home):
    """Creates or tops up the venv for `spec`; returns its python or None."""
    python = home / "bin" / "python"
    if not python.exists():
        print(f"creating {home}", flush=True)
        venv.create(home, with_pip=True)
    if not pip(python, *BASE_PACKAGES):
        return None
    if spec.startswith("keras-nightly"):
        # TensorFlow pulls released `keras`; both wheels own `keras/`, so
        # remove both and put the nightly back alone.
        subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y",
                        "keras", "keras-nightly"])
        if not pip(python, "--upgrade", spec):
            return None
    elif not pip(python, spec):
        return None
    return python


def versions(python):
    code = ("import importlib.metadata as m\n"
            "for p in ('keras', 'keras-nightly', 'tensorflow-cpu', 'jax', 'torch'):\n"
            "    try: print(p, m.version(p))\n"
            "    except m.PackageNotFoundError: pass\n")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return dict(line.split() for line in out.stdout.splitlines())


def count(word, text):
    found = re.findall(rf"(\d+) {word}", text)
    return int(found[-1]) if found else 0


def run_tests(python, tree, backend, log_path, pytest_args):
    env = dict(
        os.environ, KERAS_BACKEND=backend, PYTHONDONTWRITEBYTECODE="1",
        COLUMNS="250",  # room for the messages in pytest's summary lines
        PYTHONPATH=os.pathsep.join(
            [str(tree), str(tree / "tests"), os.environ.get("PYTHONPATH", "")]
        ),
    )
    start = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run(
            [str(python), "-m", "pytest", "-p", "no:cacheprovider", "-q",
             *CORE_TESTS, *pytest_args],
            cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT,
        ).returncode
    text = log_path.read_text()
    tail = text.strip().splitlines()[-1:] or [""]
    result = {
        word: count(word, tail[0]) for word in ("passed", "failed", "skipped")
    }
    result["errors"] = count("errors?", tail[0])
    result["seconds"] = time.time() - start
    result["ok"] = code == 0 and result["passed"] > 0
    lines = text.splitlines()
    result["failures"] = [
        line for line in lines if line.startswith(("FAILED", "ERROR"))
    ]
    if not result["ok"] and not result["failures"]:  # e.g. conftest not loading
        result["failures"] = [line for line in lines if line.startswith("E ")][:5]
    return result


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root", type=Path,
        default=Path(tempfile.gettempdir()) / "keras-soaa-compat",
    )
    # "extend": a repeated `--keras` adds to the list (a plain `nargs="+"`
    # keeps only the last one); the defaults apply when none is given.
    parser.add_argument("--keras", nargs="+", action="extend")
    parser.add_argument("--backends", nargs="+", action="extend")
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args()
    args.keras = args.keras or ["keras-nightly", "keras==3.13.2"]
    args.backends = args.backends or list(BACKENDS)
    root = args.root.resolve()
    if root == ROOT or ROOT in root.parents:
        parser.error("--root must be outside the repository")
    rows, failures, ok = [], [], True
    for spec in args.keras:
        home = root / venv_name(spec)
        python = prepare(spec, home)
        if python is None:
            print(f"install failed for {spec}", flush=True)
            rows.append((spec, "-", "install failed", "", "", "", ""))
            ok = False
            continue
        found = versions(python)
        keras_version = found.get("keras-nightly") or found.get("keras", "?")
        print("installed:", ", ".join(f"{k} {v}" for k, v in found.items()), flush=True)
        for backend in args.backends:
            print(f"=== keras {keras_version}, KERAS_BACKEND={backend}", flush=True)
            log = home / f"pytest-{backend}.log"
            result = run_tests(
                python, args.tree.resolve(), backend, log, args.pytest_args
            )
            ok = ok and result["ok"]
            rows.append((
                keras_version, backend, result["passed"], result["failed"],
                result["skipped"], result["errors"], f"{result['seconds']:.0f}",
            ))
            failures += [(keras_version, backend, line) for line in result["failures"]]
            print("=== " + " ".join(map(str, rows[-1])), flush=True)
    header = ("keras", "backend", "passed", "failed", "skipped", "errors", "seconds")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(7)]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
    for keras_version, backend, line in failures:
        print(f"[{keras_version} {backend}] {line}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
