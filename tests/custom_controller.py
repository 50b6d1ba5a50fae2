"""Two user-defined controllers, written as a user would (public names only).

They are the examples of docs/custom-controller.md, each under 25 lines.
"""

from keras import ops

import keras_soaa
from keras_soaa.controllers import Controller, LogRadiusController, Sum


@keras_soaa.controllers.register("test_sign")
class SignController(LogRadiusController):
    """`log d` moves by `learning_rate` with the sign of `sum(g * q_prev)`."""

    sums = (Sum("alignment", "gradient", "previous_direction"),)
    state = ("steps",)

    def update(self, radius, state, sums, context, loss=None):
        log_radius = ops.log(radius) + self.learning_rate * ops.sign(sums.alignment)
        return self.clip(log_radius), state._replace(steps=state.steps + 1.0)


@keras_soaa.controllers.register("test_loss_trend")
class LossTrendController(Controller):
    """`d` shrinks by `factor` when the loss rises above its average, else grows."""

    state = ("average", "count")
    needs_loss = True

    def __init__(self, factor=1.2, decay=0.9):
        self.factor, self.decay = float(factor), float(decay)

    def get_config(self):
        return {"factor": self.factor, "decay": self.decay}

    def update(self, radius, state, sums, context, loss=None):
        seen = ops.logical_and(ops.isfinite(loss), state.count > 0)  # NaN: no news
        rose = ops.logical_and(seen, loss > state.average)
        radius = ops.where(rose, radius / self.factor,
                           ops.where(seen, radius * self.factor, radius))
        average = ops.where(seen, self.decay * state.average + (1 - self.decay) * loss,
                            ops.where(ops.isfinite(loss), loss, state.average))
        count = state.count + ops.cast(ops.isfinite(loss), "float32")
        return ops.clip(radius, 0.1, 10.0), state._replace(average=average, count=count)
