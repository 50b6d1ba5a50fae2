"""An independent float64 NumPy reference of SOAA, written from docs/algorithm.md.

It shares no code with `keras_soaa`: the tests compare the optimizer with it.
"""

import numpy as np


class ReferenceSOAA:
    """SOAA over a list of float64 arrays, one block per variable."""

    def __init__(
        self,
        weights,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        radius_bound=0.1,
        total_steps=None,
        initial_radius=1.0,
        weight_decay=None,
        controller="paper",
        radius_learning_rate=0.05,
        min_radius=0.1,
        max_radius=10.0,
        shrink_below=0.25,
        grow_above=0.75,
        shrink=0.5,
        grow=1.25,
    ):
        self.weights = [np.array(w, dtype=np.float64) for w in weights]
        self.m = [np.zeros_like(w) for w in self.weights]
        self.v = [np.zeros_like(w) for w in self.weights]
        self.learning_rate = learning_rate
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.radius_bound = radius_bound
        self.total_steps = total_steps
        self.weight_decay = weight_decay
        self.controller = controller
        self.radius_learning_rate = radius_learning_rate
        self.min_radius = min_radius
        self.max_radius = max_radius
        # The same-batch controller's constants and the last step's prediction
        # on its own batch.
        self.same_batch = dict(shrink_below=shrink_below, grow_above=grow_above,
                               shrink=shrink, grow=grow)
        self.step_prediction = 0.0
        self.iterations = 0
        self.radius = float(initial_radius)
        # The gradient-ratio controller's averages of actual and predicted.
        self.ratio_actual = 0.0
        self.ratio_predicted = 0.0
        self.loss_average = 0.0
        self.loss_count = 0
        self.predicted_reduction = 0.0
        self.previous_predicted_reduction = 0.0
        # Which branch of r = max(d F, sqrt(v_hat)) each element took.
        self.fisher_branch_count = 0
        self.sqrt_branch_count = 0
        # The direction u of each variable at the last step (None: skipped).
        self.last_directions = [None] * len(self.weights)

    def step(self, grads, learning_rate=None):
        """One optimizer step; `learning_rate` overrides the constant one."""
        lr = self.learning_rate if learning_rate is None else learning_rate
        t = self.iterations + 1
        b1, b2, eps, d = self.beta_1, self.beta_2, self.epsilon, self.radius
        self.last_directions = [None] * len(self.weights)
        # Hypergradient: g_t against the previous step's Adam direction.
        alignment = gradient_sq = direction_sq = predicted_alignment = 0.0
        step_prediction = 0.0
        for i, g in enumerate(grads):
            g = np.asarray(g, dtype=np.float64)
            if not np.all(np.isfinite(g)):
                continue
            if t > 1:
                previous = self.m[i] / (1 - b1 ** (t - 1)) / (
                    np.sqrt(self.v[i] / (1 - b2 ** (t - 1))) + eps
                )
                alignment += np.sum(g * previous)
                gradient_sq += np.sum(g**2)
                direction_sq += np.sum(previous**2)
                m_hat_previous = self.m[i] / (1 - b1 ** (t - 1))
                predicted_alignment += np.sum(m_hat_previous * previous)
            m = b1 * self.m[i] + (1 - b1) * g
            v = b2 * self.v[i] + (1 - b2) * g**2
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            c = 1 + np.sum(m_hat**2) / np.sum(v_hat + eps)
            fisher = c * v_hat
            r = np.maximum(d * fisher, np.sqrt(v_hat))
            self.fisher_branch_count += int(
                np.sum(d * fisher > np.sqrt(v_hat))
            )
            self.sqrt_branch_count += int(np.sum(d * fisher < np.sqrt(v_hat)))
            u = d * m_hat / (r + eps)
            theta = self.weights[i]
            if self.weight_decay is not None:
                theta = theta - lr * self.weight_decay * theta
            self.weights[i] = theta - lr * u
            self.last_directions[i] = u
            self.m[i], self.v[i] = m, v
            prediction = lr * np.sum(m_hat * u - 0.5 * v_hat * u**2)
            self.predicted_reduction += prediction
            # The same-batch test's: this batch's gradient in place of m_hat.
            step_prediction += lr * np.sum(g * u - 0.5 * v_hat * u**2)
        self.iterations = t
        self.step_prediction = step_prediction
        if self.controller == "hypergradient":
            norms = np.sqrt(gradient_sq * direction_sq)
            cosine = alignment / norms if norms > 0 else 0.0
            log_radius = np.log(self.radius) + self.radius_learning_rate * cosine
            self.radius = float(np.exp(np.clip(
                log_radius, np.log(self.min_radius), np.log(self.max_radius)
            )))
        if self.controller == "gradient_ratio":
            # rho = 1/2 (1 + EMA(g . u_prev) / EMA(m_hat_prev . u_prev)).
            if predicted_alignment > 0:
                self.ratio_actual = 0.9 * self.ratio_actual + 0.1 * alignment
                self.ratio_predicted = (
                    0.9 * self.ratio_predicted + 0.1 * predicted_alignment
                )
            if self.ratio_predicted > 0:
                rho = 0.5 * (1 + self.ratio_actual / self.ratio_predicted)
                step = int(rho > 0.5) - int(rho < 0.1)
                log_radius = np.log(self.radius) + self.radius_learning_rate * step
                self.radius = float(np.exp(np.clip(
                    log_radius, np.log(self.min_radius), np.log(self.max_radius)
                )))

    def bounds(self):
        """The radius bounds `(lower, upper)` at the current iteration."""
        e = min(self.iterations - 1, self.total_steps) / self.total_steps
        e = max(e, 0.0)
        return (1 - self.radius_bound) ** e, 1 + self.radius_bound**e

    def observe(self, loss):
        """Feeds one observed loss to the controller."""
        if self.controller != "paper":  # only the paper's reads losses
            return
        lower, upper = self.bounds()
        if np.isfinite(loss):
            self.loss_count += 1
            k = self.loss_count
            self.loss_average = (
                self.beta_1 * self.loss_average + (1 - self.beta_1) * loss
            )
            if k == 1:
                corrected = loss  # docs/algorithm.md: "= ℓ exactly when k = 1"
            else:
                corrected = self.loss_average / (1 - self.beta_1**k)
            rho = (corrected - loss) / max(
                self.previous_predicted_reduction, self.epsilon
            )
            self.radius = min(upper, max(lower, rho * self.radius))
        else:
            self.radius = lower
        self.previous_predicted_reduction = self.predicted_reduction
        self.predicted_reduction = 0.0

    def observe_step(self, before, after):
        """The same-batch controller's test of the last step (docs/algorithm.md)."""
        p, constants = self.step_prediction, self.same_batch
        if not (np.isfinite(before) and p > 0):
            return
        rho = (before - after) / p
        if not np.isfinite(after) or rho < constants["shrink_below"]:
            self.radius *= constants["shrink"]
        elif rho > constants["grow_above"]:
            self.radius *= constants["grow"]
        self.radius = float(np.clip(self.radius, self.min_radius, self.max_radius))

    def loss_for_ratio(self, rho):
        """The loss whose observation gives the ratio `rho` (for test design).

        Solves `(corrected_average(loss) - loss) / p_prev = rho` for `loss`.
        """
        k = self.loss_count + 1
        p = max(self.previous_predicted_reduction, self.epsilon)
        if k == 1:
            return 1.0
        correction = 1 - self.beta_1**k
        carried = self.beta_1 * self.loss_average / correction
        slope = (1 - self.beta_1) / correction - 1
        return (rho * p - carried) / slope

    def scalars(self):
        """The paper controller's five scalars in the spec's order; for the
        others the radius and their state (as `conftest.scalars_of`)."""
        if self.controller == "hypergradient":
            return np.array([self.radius])
        if self.controller == "gradient_ratio":
            return np.array([self.radius, self.ratio_actual, self.ratio_predicted])
        return np.array(
            [
                self.radius,
                self.loss_average,
                self.loss_count,
                self.predicted_reduction,
                self.previous_predicted_reduction,
            ]
        )
