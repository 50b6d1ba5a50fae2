"""Candidate radius controllers measured against the library's (issue 17).

Prototypes, not library code: each is a `keras_soaa.SOAA` subclass that
reuses the hypergradient controller's per-step sums (its reading pass: `g`
and the old moments) and replaces only the rule that moves the radius. They
run on the portable `update_step` (the JAX benchmark); the library keeps the
design that measures best (`benchmarks/tune_controller.py --designs`).

Notation (`../shared/CONTROLLERS.md`): `q_prev` is the previous step's Adam
direction as `maths.previous_step_quotient` rebuilds it (times
`1 - beta_1^(t-1)`); `u_prev = eta * d * q_prev / (1 - beta_1^(t-1))`.

- `ratio` (design 1, classic thresholds): the actual reduction of the last
  step by the trapezoid rule, `ared = 1/2 (m_hat_prev + g_t) . u_prev`,
  against its linear prediction `m_hat_prev . u_prev` (the Fisher term is
  `eta * d * sqrt(v_hat) / 2` of it, negligible where d matters):
  `rho = 1/2 (1 + EMA(g . q_hat) / EMA(m_hat . q_hat))`, EMAs with
  `beta = 0.9`. Grow `d` by `1 + gamma` above 0.75, shrink by `1 - gamma`
  below 0.25, else keep it.
- `ratio_log` (design 1, continuous): `log d += kappa * (2 rho - 1)`, i.e.
  hypergradient descent normalised by the predicted reduction instead of the
  norms, on smoothed sums.
- `hd_snr` (design 2, Adam-normalised): `log d += kappa * EMA(cos) /
  sqrt(EMA(cos^2))`, the hypergradient's sign-to-noise ratio.
"""

import math

import keras
from keras import ops

import keras_soaa
from keras_soaa import maths

DESIGNS = ("ratio", "ratio_log", "hd_snr")


class DesignSOAA(keras_soaa.SOAA):
    """SOAA whose radius follows one of `DESIGNS` (see the module docstring)."""

    def __init__(self, design, gamma=0.05, ema=0.9, low=0.25, high=0.75,
                 target=0.5, **kwargs):
        kwargs.setdefault("controller", "hypergradient")
        super().__init__(**kwargs)
        if design not in DESIGNS:
            raise ValueError(f"design: unknown {design!r}")
        self.design, self.gamma, self.ema = design, gamma, ema
        self.low, self.high, self.target = low, high, target

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._design_vars = [
            self.add_variable(shape=(), initializer="zeros", dtype="float32",
                              aggregation="only_first_replica",
                              name=f"design_{name}")
            for name in ("sum_mq", "ema_a", "ema_b")
        ]

    def _add_gradient_sums(self, gradient, m, v, scalars, is_finite):
        super()._add_gradient_sums(gradient, m, v, scalars, is_finite)
        q_prev = maths.previous_step_quotient(m, v, scalars, self.epsilon)
        value = ops.cast(ops.sum(ops.multiply(m, q_prev)), "float32")
        self.assign_add(self._design_vars[0],
                        maths.finite_or_zero(value, is_finite))

    def _adapt_radius_to_gradients(self):
        g_q, g_sq, q_sq = (ops.convert_to_tensor(v)
                           for v in self._gradient_sums)
        sum_mq, ema_a, ema_b = (ops.convert_to_tensor(v)
                                for v in self._design_vars)
        beta = self.ema
        log_radius = ops.log(ops.convert_to_tensor(self._radius))
        if self.design in ("ratio", "ratio_log"):
            previous = ops.cast(self.iterations, "float32")
            b1c_prev = 1.0 - ops.power(self.beta_1, previous)
            numerator = b1c_prev * g_q  # (1 - beta_1^(t-1))^2 g . q_hat
            valid = ops.logical_and(
                ops.logical_and(ops.isfinite(numerator), ops.isfinite(sum_mq)),
                sum_mq > 0.0,
            )
            new_a = ops.where(valid, beta * ema_a + (1 - beta) * numerator, ema_a)
            new_b = ops.where(valid, beta * ema_b + (1 - beta) * sum_mq, ema_b)
            ratio = ops.where(new_b > 0.0,
                              new_a / ops.where(new_b > 0.0, new_b, 1.0), 1.0)
            rho = 0.5 * (1.0 + ratio)
            if self.design == "ratio":
                factor = ops.where(
                    rho > self.high, 1.0 + self.gamma,
                    ops.where(rho < self.low, 1.0 - self.gamma, 1.0))
                log_radius = log_radius + ops.log(factor)
            else:
                log_radius = log_radius + self.gamma * ops.clip(
                    2.0 * (rho - self.target), -1.0, 1.0)
        else:  # hd_snr
            norms = ops.sqrt(g_sq) * ops.sqrt(q_sq)
            cosine = ops.divide(g_q, ops.where(norms > 0.0, norms, 1.0))
            valid = ops.logical_and(ops.isfinite(cosine), norms > 0.0)
            new_a = ops.where(valid, beta * ema_a + (1 - beta) * cosine, ema_a)
            new_b = ops.where(valid, beta * ema_b + (1 - beta) * cosine**2,
                              ema_b)
            snr = new_a / (ops.sqrt(new_b) + 1e-12)
            log_radius = log_radius + self.gamma * snr
        log_radius = ops.clip(log_radius, math.log(self.min_radius),
                              math.log(self.max_radius))
        self._radius.assign(ops.exp(log_radius))
        self._design_vars[1].assign(new_a)
        self._design_vars[2].assign(new_b)
        for variable in (*self._gradient_sums, self._design_vars[0]):
            variable.assign(0.0)


# name -> (design, extra arguments); `*_cosine` adds the cosine schedule.
VARIANTS = {
    "soaa_ratio": ("ratio", {}),
    "soaa_ratio_log": ("ratio_log", {}),
    "soaa_hd_snr": ("hd_snr", {}),
    # Calibrated on the ratio's distribution at Adam's tuned rate with d = 1
    # (median 0.27 on digits, the quadratic and breast cancer).
    "soaa_ratio_t": ("ratio", {"low": 0.1, "high": 0.5}),
    "soaa_ratio_log_t": ("ratio_log", {"target": 0.25}),
}


def make(name, learning_rate):
    """The prototype optimizer `name` (a `VARIANTS` key, maybe `_cosine`)."""
    base = name.removesuffix("_cosine")
    design, extra = VARIANTS[base]
    return DesignSOAA(design, learning_rate=learning_rate, **extra)


def names():
    return [n for base in VARIANTS for n in (base, base + "_cosine")]


__all__ = ["DesignSOAA", "make", "names", "keras"]
