"""Writes saved_models/: one small SOAA model saved mid-training per backend.

Why. Keras restores an optimizer's variables *by position*, so the order and
meaning of SOAA's variables (iterations, learning rate, m and v of every
weight, then the five trust-region scalars) is a file format: the "state
layout", versioned by `keras_soaa.optimizer.STATE_LAYOUT_VERSION` in the
optimizer's config. These files were written by keras-soaa with state layout
version 1. `tests/test_saving.py` loads each of them on every backend and
asserts that the restored weights, m, v, five scalars and config equal what
is stored here, and that training continues as it did on the backend that
wrote the file. A change to SOAA that moves, adds or reinterprets a variable
makes those tests fail: bump `STATE_LAYOUT_VERSION` then, and keep loading
(or clearly refusing) these version-1 files.

How. For each backend, in a fresh process with `KERAS_BACKEND=<backend>`:
a Dense(8, tanh) -> Dense(2) model (weights from NumPy, seed 0) is compiled
with the SOAA below and `fit` on 64 samples of `make_data(seed=1)` in batches
of 16 (no shuffle) with `TrustRegionCallback`, for 2 of 3 epochs (stopped
after epoch 2, so the callback infers `total_steps` = 3 x 4 = 12 where it is
not given), then saved. The same process then trains the third epoch and
records the result. Each backend gets a different SOAA configuration so the
files cover a float learning rate, a schedule, weight decay and clipping:

    tensorflow: SOAA(learning_rate=0.05, radius_bound=0.9, initial_radius=1.3)
    jax:        SOAA(learning_rate=CosineDecay(0.08, decay_steps=12),
                     beta_1=0.85, radius_bound=0.5, weight_decay=0.01)
    torch:      SOAA(learning_rate=0.05, total_steps=20, initial_radius=0.8,
                     clipnorm=1.0)

Files, for each backend B:

    soaa_B.keras  the model saved after 8 steps (`model.save`).
    soaa_B.npz    x, y (the data); `restored/weight/<i>` and
                  `restored/optimizer/<i>`, the state saved in soaa_B.keras
                  (model.weights, then model.optimizer.variables in order);
                  `predictions` (the model's output on x at that state);
                  `continued/...` the state after the third epoch on B, and
                  `continued_fed_losses` the 4 losses fed to SOAA during it.
    soaa_B.json   the optimizer config, variable names in order, the five
                  scalars by name, the versions used, and this command.

Command (from the repository root, with the project's virtualenv):

    .venv/bin/python saved_models/make_golden.py

Run it only on purpose: the tests compare against these files. The restored
state depends only on the layout; the `continued/...` part also depends on
SOAA's arithmetic (compared within float32 rounding), so an intended change
of the update rule means regenerating the files, and a layout change means
bumping the version and writing new files next to these (under new names).
"""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BACKENDS = ("tensorflow", "jax", "torch")
COMMAND = ".venv/bin/python saved_models/make_golden.py"


# The files of later state layouts, written by keras-soaa 0.4.0 (the last
# release with layouts 2 and 3): name -> (backend, state layout). Written
# with `--layouts`; the layout-1 files above are not rewritten then.
LATER_LAYOUTS = {
    "soaa_hypergradient_jax": ("jax", 2),
    "soaa_gradient_ratio_torch": ("torch", 3),
}
# Layout 4 (keras-soaa 0.5): the configurations above, in its spelling,
# written with `--layout4`.
LAYOUT_4 = {
    "soaa_layout4_tensorflow": ("tensorflow", 4),
    "soaa_layout4_jax": ("jax", 4),
    "soaa_layout4_torch": ("torch", 4),
}


def make_optimizer(backend, stem=None):
    """The SOAA configuration of `backend`'s golden file (or of `stem`'s)."""
    import keras

    from keras_soaa import SOAA, controllers

    if stem == "soaa_layout4_tensorflow":
        return SOAA(learning_rate=0.05, initial_radius=1.3,
                    controller=controllers.PaperController(radius_bound=0.9))
    if stem == "soaa_layout4_jax":
        return SOAA(learning_rate=0.05, initial_radius=1.2,
                    controller=controllers.HypergradientController(
                        learning_rate=0.2, min_radius=0.5, max_radius=4.0))
    if stem == "soaa_layout4_torch":
        schedule = keras.optimizers.schedules.CosineDecay(0.05, decay_steps=12)
        return SOAA(learning_rate=schedule, weight_decay=0.01,
                    controller=controllers.GradientRatioController(
                        learning_rate=0.1, decay=0.8, grow_above=0.4))
    if stem == "soaa_hypergradient_jax":
        return SOAA(
            learning_rate=0.05, controller="hypergradient", initial_radius=1.2,
            radius_learning_rate=0.2, min_radius=0.5, max_radius=4.0,
        )
    if stem == "soaa_gradient_ratio_torch":
        from keras_soaa.controllers import GradientRatioController

        schedule = keras.optimizers.schedules.CosineDecay(0.05, decay_steps=12)
        return SOAA(
            learning_rate=schedule, weight_decay=0.01, radius_learning_rate=0.1,
            controller=GradientRatioController(decay=0.8, grow_above=0.4),
        )
    if backend == "tensorflow":
        return SOAA(learning_rate=0.05, radius_bound=0.9, initial_radius=1.3)
    if backend == "jax":
        schedule = keras.optimizers.schedules.CosineDecay(0.08, decay_steps=12)
        return SOAA(
            learning_rate=schedule, beta_1=0.85, radius_bound=0.5,
            weight_decay=0.01,
        )
    if backend == "torch":
        return SOAA(
            learning_rate=0.05, total_steps=20, initial_radius=0.8, clipnorm=1.0
        )
    raise ValueError(backend)


def make_one(backend, name=None):
    """Writes <name>.{keras,npz,json} (soaa_<backend>); runs under `backend`."""
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import keras
    import numpy as np
    import saving_worker as w

    import keras_soaa

    assert keras.backend.backend() == backend
    x, y = w.make_data(seed=1)
    model = w.make_model(make_optimizer(backend, name), seed=0)
    w.fit(model, x, y, epochs=3, callbacks=[w.StopAfterEpoch(2)])

    stem = os.path.join(HERE, name or f"soaa_{backend}")
    model.save(stem + ".keras")
    restored = w.model_state(model)
    predictions = w.to_numpy(model(x))
    config = model.optimizer.get_config()
    names = w.variable_names(model)
    # Every scalar of the optimizer after its moments, by name.
    scalars = {
        v.name: float(w.to_numpy(v)) for v in model.optimizer.variables
        if tuple(v.shape) == () and v.name not in ("iteration", "learning_rate")
    }

    fed = w.fit(model, x, y, epochs=3, initial_epoch=2)
    continued = w.model_state(model)

    arrays = {"x": x, "y": y, "predictions": predictions}
    arrays.update({f"restored/{k}": v for k, v in restored.items()})
    arrays.update({f"continued/{k}": v for k, v in continued.items()})
    arrays["continued_fed_losses"] = np.array(fed, dtype=np.float64)
    np.savez_compressed(stem + ".npz", **arrays)

    backend_module = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
    info = {
        "backend": backend,
        "state_layout_version": config["state_layout_version"],
        "optimizer_config": config,
        "variable_names": names,
        "scalars": scalars,
        "steps_saved": 8,
        "steps_continued": 4,
        "versions": {
            "keras": keras.__version__,
            "keras_soaa": keras_soaa.__version__,
            "numpy": np.__version__,
            backend: __import__(backend_module[backend]).__version__,
            "python": sys.version.split()[0],
        },
        "command": COMMAND,
    }
    with open(stem + ".json", "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
        f.write("\n")


def main():
    """Writes the files of every backend, each in its own process."""
    if len(sys.argv) >= 3 and sys.argv[1] == "--backend":
        make_one(*sys.argv[2:])
        return
    if sys.argv[1:] in (["--layouts"], ["--layout4"]):
        files = LATER_LAYOUTS if sys.argv[1] == "--layouts" else LAYOUT_4
        jobs = [(backend, name) for name, (backend, _) in files.items()]
    else:
        jobs = [(backend, f"soaa_{backend}") for backend in BACKENDS]
    for backend, name in jobs:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--backend", backend, name],
            env=env, cwd=ROOT, check=True,
        )
        for ext in ("keras", "npz", "json"):
            path = os.path.join(HERE, f"{name}.{ext}")
            print(f"{os.path.relpath(path, ROOT)}: {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    main()
