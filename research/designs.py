# ruff: noqa: D102, D103, D205, D209
"""Candidate radius controllers, written against `keras_soaa.controllers`.

Prototypes, not library code: each is a `DesignController` (one public
`Controller` subclass) that reads per-step sums of the update's reading pass
and moves the radius by its own rule, so it runs on every backend, the
torch fast path included. `controller_designs.py` measures them against the
library's controllers.

Written against `keras_soaa.controllers.Controller`'s protocol (one pure
`update`, constants as `__init__` arguments). Importing this module
registers nothing (a `Controller` instance needs no registration);
`install()`, which the studies call from their `main`, adds the rows of
`VARIANTS` to the benchmark's optimizer table.

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
from keras_soaa.controllers import HypergradientController, Sum, hypergradient
from keras_soaa.controllers.base import LogRadiusController, masked_average

DESIGNS = ("ratio", "ratio_log", "hd_snr", "hd_floor")


class DesignController(LogRadiusController):
    """One of `DESIGNS` (see the module docstring), with its constants."""

    sums = (
        Sum("alignment", "gradient", "previous_direction"),
        Sum("gradient_sq", "gradient", "gradient"),
        Sum("direction_sq", "previous_direction", "previous_direction"),
        Sum("momentum_alignment", "momentum", "previous_direction"),
    )
    state = ("average_a", "average_b")

    def __init__(self, design="ratio", gamma=0.05, ema=0.9, low=0.25,
                 high=0.75, target=0.5, min_radius=0.1, max_radius=10.0):
        if design not in DESIGNS:
            raise ValueError(f"Argument `design` must be one of {DESIGNS}. "
                             f"Received: design={design!r}")
        super().__init__(gamma, min_radius, max_radius)
        self.design, self.gamma, self.ema = design, float(gamma), float(ema)
        self.low, self.high, self.target = float(low), float(high), float(target)
        self.needs_total_steps = design == "hd_floor"

    def get_config(self):
        return {"design": self.design, "gamma": self.gamma, "ema": self.ema,
                "low": self.low, "high": self.high, "target": self.target,
                "min_radius": self.min_radius, "max_radius": self.max_radius}

    def update(self, radius, state, sums, context, loss=None):
        beta = self.ema
        log_radius = ops.log(radius)
        before = context.step - 1.0  # steps before the one updated for
        a, b = state.average_a, state.average_b
        if self.design in ("ratio", "ratio_log"):
            # (1 - beta_1^(t-1))^2 g . q_hat, against m_hat . q_hat likewise.
            numerator = (1.0 - ops.power(context.beta_1, before)) * sums.alignment
            predicted = sums.momentum_alignment
            valid = ops.logical_and(
                ops.logical_and(ops.isfinite(numerator), ops.isfinite(predicted)),
                predicted > 0.0)
            a = masked_average(a, numerator, valid, beta)
            b = masked_average(b, predicted, valid, beta)
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
            total = float(context.total_steps or 0)
            progress = ops.minimum(before / total, 1.0) if total else 0.0
            log_radius = ops.maximum(log_radius,
                                     progress * math.log(self.min_radius))
        else:  # hd_snr
            norms = ops.sqrt(sums.gradient_sq) * ops.sqrt(sums.direction_sq)
            cosine = ops.divide(sums.alignment, ops.where(norms > 0.0, norms, 1.0))
            valid = ops.logical_and(ops.isfinite(cosine), norms > 0.0)
            a = masked_average(a, cosine, valid, beta)
            b = masked_average(b, cosine**2, valid, beta)
            log_radius = log_radius + self.gamma * a / (ops.sqrt(b) + 1e-12)
        return self.clip(log_radius), type(state)(a, b)


# name -> SOAA's arguments but the learning rate; `*_cosine` adds the
# cosine schedule.
VARIANTS = {
    "soaa_ratio": {"controller": DesignController("ratio")},
    "soaa_ratio_log": {"controller": DesignController("ratio_log")},
    "soaa_hd_snr": {"controller": DesignController("hd_snr")},
    # Thresholds from the ratio's distribution at Adam's tuned rate with
    # d = 1 (results/controller_designs.md).
    "soaa_ratio_t": {"controller": DesignController("ratio", low=0.1, high=0.5)},
    "soaa_ratio_log_t": {"controller": DesignController("ratio_log", target=0.25)},
    "soaa_hd_floor": {"controller": DesignController("hd_floor")},
    "soaa_hd_min1": {"controller": HypergradientController(min_radius=1.0)},
}


LABELS = {"soaa_ratio": "SOAA-ratio", "soaa_ratio_log": "SOAA-ratio-log",
          "soaa_hd_snr": "SOAA-HD-SNR", "soaa_ratio_t": "SOAA-ratio (0.1/0.5)",
          "soaa_ratio_log_t": "SOAA-ratio-log (0.25)",
          "soaa_hd_floor": "SOAA-HD-floor", "soaa_hd_min1": "SOAA-HD (d >= 1)"}
# Their bounds on the radius: SOAA's `min_radius`, `max_radius`.
BOUNDS = {"soaa_hd_min1": (1.0, 10.0)}
COLOURS = ("darkred", "darkgoldenrod", "indigo", "black", "teal", "darkgreen",
           "navy")


def make(name, learning_rate, steps):
    """The prototype optimizer `name` (a `VARIANTS` key, maybe `_cosine`)."""
    if name.endswith("_cosine"):
        learning_rate = keras.optimizers.schedules.CosineDecay(
            learning_rate, decay_steps=steps, alpha=0.0)
    return keras_soaa.SOAA(learning_rate=learning_rate,
                           **VARIANTS[name.removesuffix("_cosine")])


def names():
    """Every variant, with and without the cosine schedule."""
    return [n for base in VARIANTS for n in (base, base + "_cosine")]


def install():
    """Adds every variant to the benchmark's `optimizers.OPTIMIZERS` (call it
    before `compare.main`)."""
    import numpy as np
    import optimizers

    for index, base in enumerate(VARIANTS):
        low, high = BOUNDS.get(base, (0.1, 10.0))
        for name in (base, base + "_cosine"):
            optimizers.OPTIMIZERS[name] = optimizers.Optimizer(
                name, LABELS[base] + (" + cosine" if name != base else ""),
                COLOURS[index],
                lambda lr, steps, model, name=name: make(name, lr, steps),
                schedule=name.endswith("_cosine"),
                radius_bounds=lambda steps, low=low, high=high: (
                    np.full(steps, low), np.full(steps, high)))
