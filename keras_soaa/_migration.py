"""What older keras-soaa versions wrote, read into the current layout.

Keras restores an optimizer's variables by position, so their order is a file
format, the state layout (docs/saving.md, "State layout"):

- layouts 1 to 3 (keras-soaa 0.1 to 0.4): Keras' own variables, the moments,
  five scalars every controller shared (`OLD_SHARED`), then the controller's
  sums and state (layout 1: the paper's controller, which had none);
- layout 4: Keras' own variables, `state_layout` (4.0), the moments, `radius`,
  then the controller's sums and state (`SOAA.controller_state()`).

Where layout 4 has the scalar `state_layout`, layouts 1-3 have the first
moment (an array unless the first variable is a scalar): a state, weights-only
files included, is read as the layout found there. Also here: SOAA's arguments
that moved to the controllers in layout 4.
"""

import inspect
import warnings

import numpy as np

from keras_soaa import controllers, validation

STATE_LAYOUT_VERSION = 4
OLD_SHARED = ("radius", "loss_average", "loss_count", "predicted_reduction",
              "previous_predicted_reduction")
# SOAA's arguments before layout 4 -> the controllers' argument.
MOVED = {"radius_bound": "radius_bound", "radius_learning_rate": "learning_rate",
         "min_radius": "min_radius", "max_radius": "max_radius"}


def _taken(controller, moved: dict) -> dict:
    # Those of `moved` the controller's `__init__` takes, in its spelling.
    accepted = inspect.signature(type(controller).__init__).parameters
    return {MOVED[k]: v for k, v in moved.items() if MOVED[k] in accepted}


def _with_moved(controller, moved: dict):
    # The controller given those of `moved` it takes.
    controller = controllers.get(controller)
    taken = _taken(controller, moved)
    if not taken:
        return controller
    return type(controller).from_config({**controller.get_config(), **taken})


def controller_with_deprecated_arguments(controller, kwargs: dict):
    """Pops SOAA's deprecated controller arguments from `kwargs`, with a warning.

    Returns the controller given those it takes (`SOAA(radius_bound=0.2)`
    gives `PaperController(radius_bound=0.2)`).
    """
    moved = {name: kwargs.pop(name) for name in MOVED if name in kwargs}
    if not moved:
        return controller
    cls = type(controllers.get(controller))
    spelled = ", ".join(f"{k}={v!r}" for k, v in _taken(
        controllers.get(controller), moved).items())
    warnings.warn(
        f"SOAA's arguments {', '.join(f'`{k}`' for k in moved)} are deprecated "
        "and will be removed in the next release: they are the controller's "
        f"arguments now. Use `SOAA(controller=keras_soaa.controllers."
        f"{cls.__name__}({spelled}))` (an argument the controller does not "
        "take had no effect).", DeprecationWarning, stacklevel=3)
    return _with_moved(controller, moved)


def config_in_current_layout(config: dict) -> dict:
    """`SOAA.get_config()` of any version as this one's (without the version).

    Raises:
        ValueError: for a layout newer than this keras-soaa's.
    """
    config = dict(config)
    version = config.pop("state_layout_version", 1)
    if version > STATE_LAYOUT_VERSION:
        raise ValueError(
            f"This SOAA config has state layout version {version}, but this "
            f"keras-soaa reads up to version {STATE_LAYOUT_VERSION}: it was "
            "saved by a newer keras-soaa. Upgrade keras-soaa to load it."
        )
    if version < STATE_LAYOUT_VERSION:
        moved = {name: config.pop(name) for name in MOVED if name in config}
        controller = _with_moved(config.get("controller", controllers.DEFAULT), moved)
        config["controller"] = controllers.serialize(controller)
    return config


class _Store:
    # A Keras variable store reordered: `sources[i]` is entry `i`'s key, or a value.
    def __init__(self, store, sources):
        self._store, self._sources = store, sources

    def keys(self):
        return [str(i) for i in range(len(self._sources))]

    def __getitem__(self, key):
        source = self._sources[int(key)]
        return self._store[source] if isinstance(source, str) else source


def _layout_of(store, index: int) -> float:
    # 4 or later where the state says so, else 1-3 (0 stands for those).
    value = np.asarray(store[str(index)]) if str(index) in store.keys() else None
    if value is None or value.shape != () or float(value) < STATE_LAYOUT_VERSION:
        return 0.0
    return float(value)


def store_in_current_layout(optimizer, store):
    """`optimizer`'s saved variables (`load_own_variables`) in layout 4.

    Raises:
        ValueError: if the store fits no layout of this controller, or
            carries a newer layout.
    """
    count, variables = len(store.keys()), optimizer.variables
    index = next(i for i, v in enumerate(variables) if v is optimizer._state_layout)
    layout = _layout_of(store, index)
    if layout:
        if layout != STATE_LAYOUT_VERSION or count != len(variables):
            validation.refuse_state(optimizer, count, f"layout {layout:g}")
        return store
    fields = ("radius", *optimizer.controller_state())
    old = OLD_SHARED + tuple(f for f in fields if f not in OLD_SHARED)
    leading = len(variables) - len(fields)  # Keras', `state_layout`, moments
    if count != leading - 1 + len(old):
        validation.refuse_state(optimizer, count, "layout 1-3")
    marker = np.array(STATE_LAYOUT_VERSION, dtype="float32")
    return _Store(store, [
        *map(str, range(index)), marker, *map(str, range(index, leading - 1)),
        *(str(leading - 1 + old.index(field)) for field in fields),
    ])
