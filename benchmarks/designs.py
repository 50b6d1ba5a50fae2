"""Candidate radius controllers, written against `keras_soaa.controllers`.

Prototypes, not library code: each is a `DesignController` (one public
`Controller` subclass) that reads per-step sums of the update's reading pass
and moves the radius by its own rule, so it runs on every backend, the
torch fast path included. `benchmarks/controller_designs.py` measures them
against the library's controllers.

Notation: `q_prev` is the previous step's Adam direction times
`1 - beta_1^(t-1)` (the `"previous_direction"` operand).

- `ratio` (classic thresholds): the actual reduction of the last step by the
  trapezoid rule, `1/2 (m_hat_prev + g_t) . u_prev`, against its linear
  prediction `m_hat_prev . u_prev`: `rho = 1/2 (1 + EMA(g . q_hat) /
  EMA(m_hat . q_hat))`, EMAs with `beta = 0.9`. Grow `d` by `1 + gamma`
  above `high`, shrink by `1 - gamma` below `low`, else keep it.
- `ratio_log` (continuous): `log d += gamma * clip(2 (rho - target), -1,
  1)`: hypergradient descent normalised by the predicted reduction.
- `hd_snr` (Adam-normalised hypergradient): `log d += gamma * EMA(cos) /
  sqrt(EMA(cos^2))`, the hypergradient's sign-to-noise ratio.
- `hd_floor` (hypergradient with a horizon correction): the hypergradient's
  `log d += gamma * cos`, clipped below by a floor that relaxes with
  training progress `p = min(t / total_steps, 1)` from 1 to `min_radius`
  (`floor = min_radius ** p`): a greedy hypergradient cannot shrink the
  step below Adam's early in the run (short-horizon bias), only late.

Besides the designs, `VARIANTS` holds configurations of the library's own
controllers (e.g. the hypergradient with `min_radius=1`).
"""

import math

import keras
from keras import ops

import keras_soaa
from keras_soaa.controllers import Controller, Sum, hypergradient

DESIGNS = ("ratio", "ratio_log", "hd_snr", "hd_floor")


@keras_soaa.controllers.register("benchmark_design")
class DesignController(Controller):
    """One of `DESIGNS` (see the module docstring), with its constants."""

    sums = (
        Sum("alignment", "gradient", "previous_direction"),
        Sum("gradient_sq", "gradient", "gradient"),
        Sum("direction_sq", "previous_direction", "previous_direction"),
        Sum("momentum_alignment", "momentum", "previous_direction"),
    )
    state = ("average_a", "average_b")

    def __init__(self, design="ratio", gamma=0.05, ema=0.9, low=0.25,
                 high=0.75, target=0.5):
        if design not in DESIGNS:
            raise ValueError(f"Argument `design` must be one of {DESIGNS}. "
                             f"Received: design={design!r}")
        self.design, self.gamma, self.ema = design, float(gamma), float(ema)
        self.low, self.high, self.target = float(low), float(high), float(target)

    def get_config(self):
        return {"design": self.design, "gamma": self.gamma, "ema": self.ema,
                "low": self.low, "high": self.high, "target": self.target}

    def adapt(self, radius, state, sums, iterations, settings):
        beta = self.ema
        log_radius = ops.log(radius)
        if self.design in ("ratio", "ratio_log"):
            previous = ops.cast(iterations, "float32")
            # (1 - beta_1^(t-1))^2 g . q_hat, against m_hat . q_hat likewise.
            numerator = (1.0 - ops.power(settings.beta_1, previous)) * sums.alignment
            predicted = sums.momentum_alignment
            valid = ops.logical_and(
                ops.logical_and(ops.isfinite(numerator), ops.isfinite(predicted)),
                predicted > 0.0,
            )
            a = keras_soaa.controllers.base.masked_average(
                state.average_a, numerator, valid, beta)
            b = keras_soaa.controllers.base.masked_average(
                state.average_b, predicted, valid, beta)
            ratio = ops.where(b > 0.0, a / ops.where(b > 0.0, b, 1.0), 1.0)
            rho = 0.5 * (1.0 + ratio)
            if self.design == "ratio":
                factor = ops.where(rho > self.high, 1.0 + self.gamma,
                                   ops.where(rho < self.low, 1.0 - self.gamma, 1.0))
                log_radius = log_radius + ops.log(factor)
            else:
                log_radius = log_radius + self.gamma * ops.clip(
                    2.0 * (rho - self.target), -1.0, 1.0)
        elif self.design == "hd_floor":
            log_radius = log_radius + self.gamma * hypergradient.cosine(sums)
            total = float(settings.total_steps or 0)
            progress = (ops.minimum(ops.cast(iterations, "float32") / total, 1.0)
                        if total else 0.0)
            floor = progress * math.log(settings.min_radius)
            log_radius = ops.maximum(log_radius, floor)
            a, b = state.average_a, state.average_b
        else:  # hd_snr
            norms = ops.sqrt(sums.gradient_sq) * ops.sqrt(sums.direction_sq)
            cosine = ops.divide(sums.alignment, ops.where(norms > 0.0, norms, 1.0))
            valid = ops.logical_and(ops.isfinite(cosine), norms > 0.0)
            a = keras_soaa.controllers.base.masked_average(
                state.average_a, cosine, valid, beta)
            b = keras_soaa.controllers.base.masked_average(
                state.average_b, cosine**2, valid, beta)
            log_radius = log_radius + self.gamma * a / (ops.sqrt(b) + 1e-12)
        radius = keras_soaa.controllers.base.clip_log_radius(log_radius, settings)
        return radius, type(state)(a, b)


# name -> SOAA's arguments but the learning rate; `*_cosine` adds the
# cosine schedule.
VARIANTS = {
    "soaa_ratio": {"controller": DesignController("ratio")},
    "soaa_ratio_log": {"controller": DesignController("ratio_log")},
    "soaa_hd_snr": {"controller": DesignController("hd_snr")},
    # Thresholds from the ratio's distribution at Adam's tuned rate with
    # d = 1 (benchmarks/results/controller_designs.md).
    "soaa_ratio_t": {"controller": DesignController("ratio", low=0.1, high=0.5)},
    "soaa_ratio_log_t": {"controller": DesignController("ratio_log", target=0.25)},
    "soaa_hd_floor": {"controller": DesignController("hd_floor")},
    "soaa_hd_min1": {"controller": "hypergradient", "min_radius": 1.0},
}


def make(name, learning_rate):
    """The prototype optimizer `name` (a `VARIANTS` key, maybe `_cosine`)."""
    return keras_soaa.SOAA(learning_rate=learning_rate,
                           **VARIANTS[name.removesuffix("_cosine")])


def names():
    return [n for base in VARIANTS for n in (base, base + "_cosine")]


__all__ = ["DesignController", "make", "names", "keras"]
