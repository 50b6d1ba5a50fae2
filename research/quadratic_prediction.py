"""A same-batch test whose prediction is a quadratic model of the loss in theta.

SOAA's batch prediction for the step `theta -= eta * u` is
`eta * sum(g * u - v_hat * u**2 / 2)`: its curvature term scales with `eta`,
so where the loss is linear over the step `rho` is about 1.5, not 1
(`prediction_scale.py`). The quadratic model of the loss with the diagonal
Fisher `v_hat` as its Hessian predicts
`eta * sum(g * u) - eta**2 * sum(v_hat * u**2) / 2` instead: `rho` near 1
where the loss is linear, below it where the loss bends more than `v_hat`
says. `QuadraticSameBatchController` is the same-batch controller (same
constants) reading that prediction; the row `soaa_sbq_cosine` is it with
the recommended configuration's cosine decay. `install()` adds the
prediction kind to `keras_soaa.maths` and the row to the benchmark's table
for one run (the portable path only: JAX and TensorFlow, as `compare.py`
runs on JAX); importing changes nothing.

    python research/candidates.py --full --set calibration \
        --optimizers soaa_sbq_cosine --out DIR
"""

import os
import sys

from keras import ops

import keras_soaa
from keras_soaa import maths
from keras_soaa.controllers import SameBatchController, Sum

HERE = os.path.dirname(os.path.abspath(__file__))

QUADRATIC_BATCH_PREDICTION = "batch_predicted_reduction_quadratic"


def quadratic_batch_prediction(gradient_alignment, curvature, scalars):
    """`eta * a * sum(g * q) - eta**2 * a**2 / (2 * b2c) * sum(v * q * q)`.

    From `maths.predicted_reduction_sums(g, new_v, q)`, with `u = a * q`,
    `a = d / (1 - beta_1**t)`: the first-order term of
    `maths.batch_predicted_reduction`, the curvature term times `eta` once more.
    """
    step_scale = scalars.radius / scalars.beta_1_correction  # a
    lr = scalars.learning_rate
    return ops.cast(ops.subtract(
        ops.multiply(gradient_alignment, lr * step_scale),
        ops.multiply(curvature, ops.square(lr * step_scale)
                     / (2.0 * scalars.beta_2_correction)),
    ), "float32")


class QuadraticSameBatchController(SameBatchController):
    """`SameBatchController` reading the quadratic-model prediction."""

    sums = (Sum("predicted_reduction", QUADRATIC_BATCH_PREDICTION),)


def install():
    """Adds the prediction kind to `maths` and `soaa_sbq_cosine` to the table."""
    if QUADRATIC_BATCH_PREDICTION not in maths.PREDICTIONS:
        maths.PREDICTIONS = (*maths.PREDICTIONS, QUADRATIC_BATCH_PREDICTION)
        maths.FROM_SUMS[QUADRATIC_BATCH_PREDICTION] = quadratic_batch_prediction
    if os.path.join(HERE, "..", "benchmarks") not in sys.path:
        sys.path.insert(0, os.path.join(HERE, "..", "benchmarks"))
    import optimizers

    optimizers.OPTIMIZERS["soaa_sbq_cosine"] = optimizers.Optimizer(
        "soaa_sbq_cosine", "same-batch SOAA, quadratic prediction + cosine",
        "darkcyan",
        lambda lr, steps, model: keras_soaa.presets.recommended(
            lr, steps, controller=QuadraticSameBatchController()),
        schedule=True, radius_bounds=optimizers.constant_bounds("same_batch"))
