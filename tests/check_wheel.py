"""Builds keras-soaa as users install it and trains with it, away from the source.

    python tests/check_wheel.py

Builds the sdist and the wheel (`python -m build`), checks that the sdist
holds what a build needs, that the wheel holds every module of `keras_soaa/`
and nothing outside it, and that its classifiers are valid.
It then installs the wheel into an empty folder and, from another one (so
neither the checkout nor an editable install can be imported instead), trains
a small model with `SOAA` and `TrustRegionCallback` on TensorFlow, JAX and
torch. Exits non-zero on the first failure. `tests/run_all_backends.py` runs
it after the lint.
"""

import email
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("tensorflow", "jax", "torch")

# Run in the installed copy: trains one epoch and checks the radius moved.
TRAIN = """
import os, sys
import numpy as np
import keras
import keras_soaa

installed = os.path.realpath(sys.argv[1])
assert os.path.realpath(keras_soaa.__file__).startswith(installed), keras_soaa.__file__
rng = np.random.default_rng(0)
x = rng.normal(size=(64, 4)).astype("float32")
y = x @ rng.normal(size=(4, 1)).astype("float32")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                          keras.layers.Dense(1)])
model.compile(optimizer=keras_soaa.SOAA(learning_rate=0.01), loss="mse")
history = model.fit(x, y, batch_size=16, epochs=2, verbose=0,
                    callbacks=[keras_soaa.TrustRegionCallback()])
losses = history.history["loss"]
assert np.isfinite(losses).all() and losses[-1] < losses[0], losses
assert history.history["radius"][-1] != 1.0, history.history
print(keras.backend.backend(), "trained from", keras_soaa.__file__, "loss", losses)
"""


def build(out: Path) -> tuple[Path, Path]:
    """Builds the sdist and the wheel from the checkout; returns their paths.

    From a copy of the checkout without what builds and installs leave
    behind, as a fresh clone is: setuptools takes the files an editable
    install's `*.egg-info` lists as package data, which would hide a
    subpackage left out of the packages.
    """
    source = out.parent / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "*.egg-info", "build", "dist", "runs", "site",
        "__pycache__", ".*_cache",
    ))
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir",
         str(out), str(source)],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    (sdist,) = out.glob("keras_soaa-*.tar.gz")
    (wheel,) = out.glob("keras_soaa-*.whl")
    return sdist, wheel


def modules() -> set[str]:
    """The paths of `keras_soaa`'s modules in the checkout."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / "keras_soaa").rglob("*.py")
    }


def check_sdist(sdist: Path) -> list[str]:
    """Returns what the sdist lacks of what a build needs (none: `[]`)."""
    with tarfile.open(sdist) as archive:
        top = sdist.name.removesuffix(".tar.gz")
        names = {name.removeprefix(top + "/") for name in archive.getnames()}
    needed = modules() | {"pyproject.toml", "README.md", "LICENSE"}
    return [f"missing from the sdist: {n}" for n in sorted(needed - names)]


def check_wheel(wheel: Path) -> list[str]:
    """Returns the problems with the wheel's files and metadata (none: `[]`)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        classifiers = email.message_from_bytes(archive.read(metadata)).get_all(
            "Classifier", []
        )
    packaged = [n for n in names if ".dist-info/" not in n]
    problems = [
        f"missing from the wheel: {m}" for m in sorted(modules() - set(packaged))
    ]
    problems += [
        f"outside the package: {n}" for n in packaged
        if not n.startswith("keras_soaa/")
    ]
    from trove_classifiers import classifiers as known

    problems += [f"unknown classifier: {c}" for c in classifiers if c not in known]
    return problems


def train_everywhere(wheel: Path, work: Path) -> list[str]:
    """Installs `wheel` into a folder of its own and trains on each backend."""
    site = work / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(site), str(wheel)],
        check=True,
    )
    elsewhere = work / "run"
    elsewhere.mkdir()
    failing = []
    for backend in BACKENDS:
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(site))
        # From an empty folder: `-c` puts the working folder on `sys.path`.
        result = subprocess.run(
            [sys.executable, "-c", TRAIN, str(site)],
            cwd=elsewhere, env=env, capture_output=True, text=True,
        )
        print(result.stdout.strip() or result.stderr[-3000:], flush=True)
        if result.returncode != 0:
            failing.append(backend)
    return [f"the installed wheel does not train on {b}" for b in failing]


def main() -> int:
    """Builds, inspects and tries the wheel; returns the exit status."""
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        sdist, wheel = build(work / "dist")
        print(f"built {sdist.name} and {wheel.name}")
        problems = (
            check_sdist(sdist) + check_wheel(wheel) or train_everywhere(wheel, work)
        )
    for problem in problems:
        print(problem)
    print("wheel check:", "failed" if problems else "passed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
