"""keras-soaa: the SOAA optimizer (arXiv 2410.02293) for Keras 3.

Importing the package registers `SOAA` for Keras serialization, so a model
saved with it loads with `keras.saving.load_model` without `custom_objects`.
"""

from keras_soaa.callback import TrustRegionCallback
from keras_soaa.optimizer import SOAA

__version__ = "0.3.2"

__all__ = ["SOAA", "TrustRegionCallback", "__version__"]
