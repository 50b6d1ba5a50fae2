"""keras-soaa: the SOAA optimizer (arXiv 2410.02293) for Keras 3.

Importing the package registers `SOAA` and the built-in controllers for
Keras serialization, so a model saved with them loads with
`keras.saving.load_model` without `custom_objects`.
"""

from keras_soaa import controllers, presets
from keras_soaa.callback import TrustRegionCallback
from keras_soaa.optimizer import SOAA

__version__ = "0.4.0"

__all__ = ["SOAA", "TrustRegionCallback", "__version__", "controllers", "presets"]
