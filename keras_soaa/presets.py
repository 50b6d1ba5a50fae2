"""Ready-made SOAA configurations, chosen by measurement.

`recommended` is the configuration whose worst case against the strongest
peers (tuned Adam, Adam + cosine decay, ScheduleFreeAdamW) was the smallest
on the benchmark's calibration problems; the documentation's results page
gives the figures, on those problems and on held-out ones.
"""

import keras

from keras_soaa import validation
from keras_soaa.optimizer import SOAA


def recommended(learning_rate: float, total_steps: int, **kwargs) -> SOAA:
    """SOAA with the paper's controller and a cosine decay of the rate to 0.

    Train with `keras_soaa.TrustRegionCallback()` in `fit` (or call
    `observe_loss` in a custom loop), as for `SOAA()`.

    Args:
        learning_rate: Float > 0: the rate at step 0.
        total_steps: Integer >= 1: the number of optimizer steps of the run;
            the rate reaches 0 there, and the radius bounds narrow over it.
        **kwargs: any other argument of `SOAA` (not `learning_rate`).

    Returns:
        The `SOAA` optimizer.
    """
    # Checked by SOAA's own rules first, so a bad value names its argument.
    if total_steps is None:
        raise ValueError("Argument `total_steps` is required: the rate decays "
                         "to 0 over it. Received: total_steps=None")
    validation.validate_hyperparameters(
        learning_rate, 0.9, 0.999, 1e-8, 0.1, total_steps, 1.0, None, 0.05,
        0.1, 10.0, None,
    )
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate, decay_steps=total_steps, alpha=0.0
    )
    return SOAA(learning_rate=schedule, total_steps=total_steps, **kwargs)
