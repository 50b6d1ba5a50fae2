"""Ready-made SOAA configurations, chosen by measurement.

`recommended` is the configuration whose worst case against the strongest
peers (tuned Adam, Adam + cosine decay, ScheduleFreeAdamW) was the smallest
on the benchmark's calibration problems and also on its held-out ones;
`paper_cosine` is the one it replaced in 0.5.0. docs/recommended.md gives
the figures.
"""

import keras

from keras_soaa import validation
from keras_soaa.optimizer import SOAA


def recommended(learning_rate: float, total_steps: int, **kwargs) -> SOAA:
    """SOAA with the same-batch trust region and a cosine decay of the rate to 0.

    The controller is `SameBatchController()` (`controller="same_batch"`):
    every 4th batch, that batch's loss after its step against the reduction
    its own quadratic model predicted. Train with
    `keras_soaa.TrustRegionCallback()` in `fit`, which runs that extra
    forward pass inside the train step (or call `observe_step` in a custom
    loop). Where the train step cannot be hooked (`run_eagerly` or
    `steps_per_execution > 1` on TensorFlow and JAX, a `tf.distribute`
    strategy, Flax NNX), use `paper_cosine`.

    Args:
        learning_rate: Float > 0: the rate at step 0.
        total_steps: Integer >= 1: the number of optimizer steps of the run;
            the rate reaches 0 there.
        **kwargs: any other argument of `SOAA` (not `learning_rate`); a
            `controller` replaces the same-batch one.

    Returns:
        The `SOAA` optimizer.
    """
    return _with_cosine_decay(learning_rate, total_steps,
                              **{"controller": "same_batch", **kwargs})


def paper_cosine(learning_rate: float, total_steps: int, **kwargs) -> SOAA:
    """SOAA with the paper's controller and a cosine decay of the rate to 0.

    `recommended` until 0.5.0. Train with `keras_soaa.TrustRegionCallback()`
    in `fit` (or call `observe_loss` in a custom loop), as for `SOAA()`.

    Args:
        learning_rate: Float > 0: the rate at step 0.
        total_steps: Integer >= 1: the number of optimizer steps of the run;
            the rate reaches 0 there, and the radius bounds narrow over it.
        **kwargs: any other argument of `SOAA` (not `learning_rate`).

    Returns:
        The `SOAA` optimizer.
    """
    return _with_cosine_decay(learning_rate, total_steps, **kwargs)


def _with_cosine_decay(learning_rate, total_steps, **kwargs) -> SOAA:
    if total_steps is None:
        raise ValueError("Argument `total_steps` is required: the rate decays "
                         "to 0 over it. Received: total_steps=None")
    # Checked here, so that a bad value names its argument rather than
    # failing inside the schedule.
    validation.real(learning_rate, "learning_rate", "> 0")
    validation.steps(total_steps)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=learning_rate, decay_steps=total_steps, alpha=0.0
    )
    return SOAA(learning_rate=schedule, total_steps=total_steps, **kwargs)
