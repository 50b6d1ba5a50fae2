"""A user-defined controller, written as a user would (public names only)."""

from keras import ops

import keras_soaa
from keras_soaa.controllers import Controller, Sum
from keras_soaa.controllers.base import clip_log_radius


@keras_soaa.controllers.register("test_sign")
class SignController(Controller):
    """`log d` moves by `step` with the sign of `sum(g * q_prev)`; counts steps."""

    sums = (Sum("alignment", "gradient", "previous_direction"),)
    state = ("steps",)

    def __init__(self, step=0.1):
        self.step = float(step)

    def get_config(self):
        return {"step": self.step}

    def adapt(self, radius, state, sums, iterations, settings):
        move = ops.where(sums.alignment > 0.0, self.step,
                         ops.where(sums.alignment < 0.0, -self.step, 0.0))
        return (clip_log_radius(ops.log(radius) + move, settings),
                type(state)(state.steps + 1.0))
