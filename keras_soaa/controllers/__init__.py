"""SOAA's trust-region controllers: one module each, one registry.

`SOAA(controller=...)` takes a registered name or a `Controller`. Adding
one is a module with a `Controller` subclass decorated with `register`
(see `base` for what a controller declares and does).
"""

from keras_soaa.controllers.base import (
    BATCH_PREDICTED_REDUCTION,
    PREDICTED_REDUCTION,
    Context,
    Controller,
    LogRadiusController,
    LossPair,
    Sum,
)
from keras_soaa.controllers.gradient_ratio import GradientRatioController
from keras_soaa.controllers.hypergradient import HypergradientController
from keras_soaa.controllers.paper import PaperController
from keras_soaa.controllers.registry import get, names, register, serialize
from keras_soaa.controllers.same_batch import SameBatchController

# What `SOAA()` uses: the paper's controller.
DEFAULT = PaperController.name

__all__ = [
    "BATCH_PREDICTED_REDUCTION",
    "DEFAULT",
    "PREDICTED_REDUCTION",
    "Context",
    "Controller",
    "GradientRatioController",
    "HypergradientController",
    "LogRadiusController",
    "LossPair",
    "PaperController",
    "SameBatchController",
    "Sum",
    "get",
    "names",
    "register",
    "serialize",
]
