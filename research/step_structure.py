"""Where SOAA's compiled step loses time to Adam's on XLA for CPU (JAX).

    python research/step_structure.py [--size 20e6] [--repeats 5]

A breakdown, not a benchmark: SOAA's step on one variable written in plain
`jax.numpy` the way `SOAA.update_step` builds it (docs/algorithm.md, "One
step"), with each piece removed in turn, timed against Adam's step in the
same process (each jitted with m, v and the weights donated, as `fit` does;
sides alternated, median of the repeats). The pieces:

- `skip rule`: where the step is applied. `early` is the library's rule for
  `beta_1 <= beta_2`: every `new_v` finite (`maths.moments_are_finite`),
  decided before the sums; `from sums` decides from the curvature sum
  `sum(new_v)` itself (finite exactly when every `new_v` is, see
  `curvature_sums`), before the moments are written; `late` decides from
  `c` after the sums, and writes the moments after the update
  (`maths.is_finite_step`); `none` applies every step (not a valid SOAA).
- `prediction`: the two predicted-reduction sums `sum(m * q)` and
  `sum(v * q * q)` the paper's controller reads, or none.
- `reduce`: each sum as `jnp.sum` (XLA's reduction, which XLA for CPU hands
  to XNNPACK), or all sums of a pass as one variadic `lax.reduce`.

Writes a Markdown table to stdout.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BETA_1, BETA_2, EPSILON, LR, RADIUS = 0.9, 0.999, 1e-7, 1e-3, 1.0
SCALE = 2.0**-32  # `maths.OVERFLOW_SCALE`
T = 10  # the step's bias corrections at t = 10
B1C, B2C = 1 - BETA_1**T, 1 - BETA_2**T


def adam(theta, m, v, g):
    """Keras' Adam, as XLA fuses it (one pass)."""
    m = m + (g - m) * (1 - BETA_1)
    v = v + (g * g - v) * (1 - BETA_2)
    return theta - LR * (m / B1C) / (jnp.sqrt(v / B2C) + EPSILON), m, v, 0.0


def _variadic_sum(*terms):
    return lax.reduce(terms, tuple(jnp.float32(0) for _ in terms),
                      lambda a, b: tuple(x + y for x, y in zip(a, b)), (0,))


def _plain_sum(*terms):
    return tuple(jnp.sum(term) for term in terms)


def soaa(skip_rule, prediction, reduce):
    """SOAA's step with the given skip rule, prediction sums and reductions."""
    sums_of = _variadic_sum if reduce == "variadic" else _plain_sum

    def step(theta, m, v, g):
        new_m = m + (g - m) * (1 - BETA_1)
        new_v = v + (g * g - v) * (1 - BETA_2)
        ok = True
        if skip_rule == "early":
            ok = jnp.all(jnp.isfinite(new_v)) & jnp.isfinite(LR)
            new_m, new_v = jnp.where(ok, new_m, m), jnp.where(ok, new_v, v)
        # From the new moments as computed (equal to the kept ones where the
        # step applies; where it does not, c is not used).
        sum_m_sq, sum_v = sums_of(jnp.square(new_m * SCALE), new_v * SCALE**2)
        if skip_rule == "from sums":
            ok = jnp.isfinite(sum_v) & jnp.isfinite(LR)
            new_m, new_v = jnp.where(ok, new_m, m), jnp.where(ok, new_v, v)
        elif skip_rule == "late":
            ok = jnp.isfinite(sum_m_sq) & jnp.isfinite(sum_v)
        n = new_v.size
        c = 1 + (sum_m_sq / B1C**2) / (sum_v / B2C + n * EPSILON * SCALE**2)
        sqrt_v_hat = jnp.sqrt(new_v) / np.sqrt(B2C)
        fisher = new_v * (RADIUS * c / B2C)
        q = new_m / (jnp.where(sqrt_v_hat >= fisher, sqrt_v_hat, fisher) + EPSILON)
        new_theta = jnp.where(ok, theta - LR * RADIUS / B1C * q, theta)
        predicted = 0.0
        if prediction:
            alignment, curvature = sums_of(new_m * q, new_v * q * q)
            predicted = alignment - curvature
        if skip_rule == "late":
            new_m, new_v = jnp.where(ok, new_m, m), jnp.where(ok, new_v, v)
        return new_theta, new_m, new_v, predicted

    return step


CASES = {
    "Adam": adam,
    "SOAA as it is (early, prediction)": soaa("early", True, "plain"),
    "early, no prediction": soaa("early", False, "plain"),
    "no skip rule, prediction": soaa("none", True, "plain"),
    "no skip rule, no prediction": soaa("none", False, "plain"),
    "from sums, prediction": soaa("from sums", True, "plain"),
    "from sums, no prediction": soaa("from sums", False, "plain"),
    "late, prediction": soaa("late", True, "plain"),
    "late, no prediction": soaa("late", False, "plain"),
    "early, prediction, variadic reduce": soaa("early", True, "variadic"),
}


def main(argv=None):
    """Times every case; prints the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=float, default=20e6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    size = int(args.size)
    g = jax.random.normal(jax.random.PRNGKey(0), (size,))
    inputs = (g * 0.5, g * 0.1, g * g * 0.01 + 1e-3)
    steps = {name: jax.jit(f, donate_argnums=(0, 1, 2)) for name, f in CASES.items()}
    state = {name: tuple(x + 0 for x in inputs) for name in CASES}
    for name, step in steps.items():  # compile
        state[name] = jax.block_until_ready(step(*state[name], g))[:3]
    times = {name: [] for name in CASES}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(5):
                out = step(*state[name], g)
                state[name] = out[:3]
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / 5)
    adam_time = np.median(times["Adam"])
    print(f"One step on one variable of {size:,} float32 elements, JAX "
          f"{jax.__version__} on {jax.devices()[0].platform}, median of "
          f"{args.repeats} repeats.\n")
    print("| step | ms | / Adam |\n|---|---|---|")
    for name in CASES:
        median = np.median(times[name])
        print(f"| {name} | {1e3 * median:.1f} | {median / adam_time:.2f} |")


if __name__ == "__main__":
    main()
