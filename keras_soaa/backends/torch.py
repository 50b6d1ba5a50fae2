"""SOAA's update of many variables at once, with `torch._foreach_*` kernels.

As Keras' torch Adam: `update_step` follows `SOAA.update_step` line for line,
each function named after the `keras_soaa.maths` one it stands for, on lists of
tensors, one per variable. `maths` functions of per-variable scalars run as
they are, on vectors, `replayed`. Where the skip rule will apply every step
(`applies_to_every_variable`), m, v and the weights are updated in place.
With `SOAA(fused=True)`, `update_group` (the step scalars, `update_step`
and the controller's sums) runs compiled (`compiled_update_group`).
"""

import functools
import types
import warnings
import weakref

import keras
import torch

from keras_soaa import maths
from keras_soaa.compile import CompiledCache, TorchTrace

_replays = CompiledCache()
# Per `SOAA(fused=True)`: its `update_group` under `torch.compile`.
_compiled_steps = weakref.WeakKeyDictionary()


def replayed(function, **constants):
    """`maths.<function>` with `constants` bound, replayed (`TorchTrace`).

    For the functions of per-variable scalars: a dozen tiny ops each, which op
    by op cost more than the kernels of a small model.
    """
    return _replays.get((function, *sorted(constants.items())),
                        lambda: TorchTrace(functools.partial(function, **constants)))


def previous_direction(momentums, velocities, scalars, epsilon):
    """`maths.previous_direction` for many variables."""
    directions = torch._foreach_sqrt(velocities)
    torch._foreach_mul_(directions, torch.rsqrt(scalars.previous_beta_2_correction))
    torch._foreach_add_(directions, epsilon)
    for m, q in zip(momentums, directions):
        torch.div(m, q, out=q)
    return directions


def step_sums(sums, grads, momentums, velocities, scalars, epsilon):
    """`maths.step_sums` for many variables: a vector per sum.

    A predicted reduction, known only after the step, gives an empty vector,
    which `_applied_totals` fills in.
    """
    operands = {"gradient": grads, "momentum": momentums, "velocity": velocities}
    if any("previous_direction" in s[1:] for s in sums):
        operands["previous_direction"] = previous_direction(
            momentums, velocities, scalars, epsilon)
    return tuple(torch.empty(0) if s.left in maths.PREDICTIONS
                 else _dots(zip(operands[s.left], operands[s.right])) for s in sums)


def _dots(pairs):
    # sum(a * b) without an array for the products.
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in pairs])


def moments(momentums, velocities, grads, beta_1, beta_2, in_place=False):
    """`maths.moments` for many variables: its formulas as lerp, mul-add.

    `in_place`: written into `momentums` and `velocities`, and returned.
    """
    if in_place:
        torch._foreach_lerp_(momentums, grads, 1 - beta_1)
        new_m, new_v = momentums, velocities
        torch._foreach_mul_(new_v, beta_2)
    else:
        new_m = torch._foreach_lerp(momentums, grads, 1 - beta_1)
        new_v = torch._foreach_mul(velocities, beta_2)
    torch._foreach_addcmul_(new_v, grads, grads, 1 - beta_2)
    return new_m, new_v


def curvature_sums(new_m, new_v) -> maths.CurvatureSums:
    """`maths.curvature_sums` for many variables: vectors of sums."""
    if _host_reads_are_free(new_v[0]):
        sum_m_sq = _dots(zip(new_m, new_m))
        sum_v = torch.stack([v.sum() for v in new_v])
        if bool(torch.isfinite(sum_m_sq).all() & torch.isfinite(sum_v).all()):
            return maths.CurvatureSums(sum_m_sq, sum_v, torch.ones_like(sum_v))
    # Rare on CPU (huge gradients), else always: the rescaling portable sums.
    return maths.CurvatureSums(
        *(torch.stack(sums) for sums in zip(*map(maths.curvature_sums, new_m, new_v)))
    )


def step_direction(new_m, new_v, curvature_scale, scalars, epsilon):
    """`maths.step_direction` for many variables (`curvature_scale`: a vector)."""
    b2c = scalars.beta_2_correction
    sqrt_v_hat = torch._foreach_sqrt(new_v)
    torch._foreach_mul_(sqrt_v_hat, torch.rsqrt(b2c))
    scale = scalars.radius * curvature_scale / b2c
    denominator = torch._foreach_mul(new_v, list(scale.unbind()))
    torch._foreach_maximum_(denominator, sqrt_v_hat)  # NaN propagates
    torch._foreach_add_(denominator, epsilon)
    for m, r in zip(new_m, denominator):
        torch.div(m, r, out=r)
    return denominator


def new_weight(thetas, directions, scalars, weight_decays, dtypes, in_place=False):
    """`maths.new_weight` for many variables.

    `weight_decays`: one per variable (`None`: not decayed); `dtypes`: theirs.
    `in_place`: written into `thetas` (which then do not saturate), returned.
    """
    lr = scalars.learning_rate
    step_scale = scalars.radius / scalars.beta_1_correction
    if in_place:
        for theta, direction, weight_decay in zip(thetas, directions, weight_decays):
            if weight_decay is not None:
                theta.addcmul_(theta, -weight_decay * lr)
            theta.addcmul_(direction, -lr * step_scale)
        return thetas
    new_thetas = []
    for theta, direction, weight_decay, dtype in zip(thetas, directions,
                                                     weight_decays, dtypes):
        if weight_decay is not None:
            theta = torch.addcmul(theta, theta, -weight_decay * lr)
        new_theta = torch.addcmul(theta, direction, -lr * step_scale)
        largest = maths.LARGEST_FINITE.get(keras.backend.standardize_dtype(dtype))
        if largest is not None:
            new_theta.clamp_(-largest, largest)
        new_thetas.append(new_theta.to(dtype))
    return new_thetas


def prediction_sums(kinds, grads, new_m, new_v, directions):
    """`maths.predicted_reduction_sums` of each of `kinds`, many variables.

    Returns one `(alignment, curvature)` pair of vectors per kind. Both kinds
    share the curvature, `sum(new_v * q * q)`; the alignment is over `new_m`,
    or over `g` for `BATCH_PREDICTED_REDUCTION`.
    """
    if not kinds:
        return ()
    weighted = torch._foreach_mul(new_v, directions)
    curvature = _dots(zip(weighted, directions))
    firsts = {maths.PREDICTED_REDUCTION: new_m,
              maths.BATCH_PREDICTED_REDUCTION: grads}
    return tuple((_dots(zip(firsts[kind], directions)), curvature)
                 for kind in kinds)


def update_variables(optimizer, grads, variables, learning_rate):
    """Runs `update_group` once per compute dtype over the non-empty variables.

    Adds the controller's sums to their variables, as `SOAA.update_step` does.
    """
    groups = {}
    for grad, variable in zip(grads, variables):
        if 0 in tuple(variable.shape):
            continue  # no element: nothing to update, nothing predicted
        m, v = optimizer._moments_of(variable)
        groups.setdefault(m.dtype, []).append((grad, variable, m, v))
    # Inside `torch.compile` (`jit_compile=True`) the step is compiled already.
    step = (compiled_update_group(optimizer) if optimizer.fused is True
            and not torch.compiler.is_compiling() else update_group)
    inputs = tuple(map(keras.ops.convert_to_tensor,
                       (learning_rate, optimizer.iterations, optimizer.radius)))
    for dtype, members in groups.items():
        grads, variables, momentums, velocities = zip(*members)
        step(
            inputs,
            [keras.ops.convert_to_tensor(g) for g in grads],
            [variable.value for variable in variables],
            [m.value for m in momentums],
            [v.value for v in velocities],
            [optimizer._weight_decay_of(variable) for variable in variables],
            [total.value for total in optimizer._sums],
            beta_1=optimizer.beta_1, beta_2=optimizer.beta_2,
            epsilon=optimizer.epsilon, sums=optimizer.controller.sums, dtype=dtype,
        )


@torch.no_grad()
def update_group(inputs, grads, params, momentums, velocities, weight_decays, totals,
                 *, beta_1, beta_2, epsilon, sums, dtype):
    """`update_step` from the step's `(learning_rate, iterations, radius)`.

    Computes the step's `maths.StepScalars` in `dtype` (`maths.step_scalars`),
    runs `update_step` and adds its sums to `totals` (the values of the
    controller's sum variables) in place. The unit `fused=True` compiles.
    """
    scalars_of = (functools.partial(maths.step_scalars, beta_1=beta_1, beta_2=beta_2,
                                    dtype=dtype)
                  if torch.compiler.is_compiling() else replayed(
                      maths.step_scalars, beta_1=beta_1, beta_2=beta_2, dtype=dtype))
    added = update_step(grads, params, momentums, velocities, weight_decays,
                        scalars_of(*inputs), beta_1=beta_1, beta_2=beta_2,
                        epsilon=epsilon, sums=sums)
    for total, value in zip(totals, added):
        total.add_(value)


@torch.no_grad()
def update_step(grads, params, momentums, velocities, weight_decays, scalars, *,
                beta_1, beta_2, epsilon, sums=()):
    """Applies SOAA's step to variables that share one compute dtype.

    Args:
        grads: one gradient tensor per variable.
        params: the variables' torch tensors, updated in place.
        momentums: their `m` (of the compute dtype), updated in place.
        velocities: their `v`, updated in place.
        weight_decays: one per variable, `None` where it is not decayed.
        scalars: the step's `maths.StepScalars` in the compute dtype.
        beta_1: the optimizer's `beta_1`.
        beta_2: the optimizer's `beta_2`.
        epsilon: the optimizer's `epsilon`.
        sums: the controller's `Sum`s (`Controller.sums`).

    Returns:
        The controller's `sums` over the applied steps (a tuple of float32
        scalars, one per sum).
    """
    dtype = momentums[0].dtype
    grads = [g.to(dtype) for g in grads]
    thetas = [p.to(dtype) for p in params]

    # From the old moments: before they are updated in place below.
    declared = sums
    sum_vectors = step_sums(declared, grads, momentums, velocities, scalars, epsilon)
    # Every `g**2` finite, per variable: the skip rule's test, which `addcmul`
    # (`v + (1 - beta_2) * g * g`, in that order) can miss. From `g`'s extremes
    # (NaN where `g` holds one): one pass, no temporary, a quarter of the
    # time of `_foreach_norm(grads, inf)`, which runs per tensor on CPU.
    grads_ok = _squares_are_finite(
        torch.stack([torch.stack(torch.aminmax(g)) for g in grads]))
    in_place = applies_to_every_variable(grads, params, scalars, beta_1, beta_2,
                                         grads_ok)
    new_m, new_v = moments(momentums, velocities, grads, beta_1, beta_2, in_place)
    sums = curvature_sums(new_m, new_v)
    sizes = torch.tensor([p.numel() for p in params], dtype=dtype)
    c, is_finite = replayed(_scale_and_check, epsilon=epsilon)(sums, sizes, scalars)
    is_finite = is_finite & grads_ok
    directions = step_direction(new_m, new_v, c, scalars, epsilon)
    new_params = new_weight(thetas, directions, scalars, weight_decays,
                            [p.dtype for p in params], in_place)
    kinds = tuple(kind for kind in maths.PREDICTIONS
                  if any(s.left == kind for s in declared))
    predicted_sums = prediction_sums(kinds, grads, new_m, new_v, directions)

    if not in_place:  # computed aside: write what the skip rule keeps
        states = momentums + velocities + params
        news = [*new_m, *new_v, *new_params]
        if _host_reads_are_free(params[0]) and bool(is_finite.all()):
            # Every step applied (a free host check here): a plain copy.
            torch._foreach_copy_(states, news)
        else:
            for ok, state, new in zip(is_finite.unbind() * 3, states, news):
                torch.where(ok, new, state, out=state)
    return replayed(_applied_totals, sums=tuple(declared), kinds=kinds)(
        predicted_sums, scalars, is_finite, sum_vectors)


def compiled_update_group(optimizer):
    """`update_group` compiled with `torch.compile`, for `optimizer` (`fused=True`).

    Inductor fuses the step's kernels into a few loops: on a small model the
    step costs a fraction of its dozens of kernel launches. Compiled once per
    variable shapes, on the first step (seconds; a C++ compiler is needed).
    A copy of the code object per optimizer: Dynamo keeps compiled graphs per
    code object, up to `recompile_limit` of them.
    """
    if optimizer not in _compiled_steps:
        plain = update_group.__wrapped__  # under `torch.no_grad()`
        copy = types.FunctionType(plain.__code__.replace(), plain.__globals__,
                                  plain.__name__, plain.__defaults__, plain.__closure__)
        copy.__kwdefaults__ = plain.__kwdefaults__
        _compiled_steps[optimizer] = _CompiledStep(
            torch.compile(torch.no_grad()(copy), dynamic=False))
    return _compiled_steps[optimizer]


class _CompiledStep:
    # The compiled step, or, once compiling it has failed (e.g. no C++
    # compiler), `update_group` after one warning.

    def __init__(self, compiled):
        self._step = compiled

    def __call__(self, *args, **kwargs):
        try:
            return self._step(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            # Raised while compiling, before the step ran: nothing written.
            if self._step is update_group:
                raise
            self._step = update_group
            warnings.warn(
                "SOAA(fused=True) could not compile its step with torch.compile "
                f"({type(error.inner_exception).__name__}: "
                f"{str(error.inner_exception)[:300]}); it runs the step uncompiled, "
                "as `fused=None` does. `fused=None` avoids this attempt.",
                UserWarning, stacklevel=2)
            return update_group(*args, **kwargs)


def _host_reads_are_free(tensor):
    # On CPU, outside `torch.compile` (where a host read breaks the graph);
    # on an accelerator it would stall the queue.
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def applies_to_every_variable(grads, params, scalars, beta_1, beta_2, grads_ok):
    """Whether the skip rule will apply every variable's step, known up front.

    Then `update_step` writes `m`, `v` and `theta` in place (no new arrays).
    On CPU outside `torch.compile` (host reads are free there), for variables
    of the compute dtype, when the learning rate and every `g**2` are finite
    (`grads_ok`): then so are `new_v` and `c`, as in
    `maths.moments_are_finite`.
    Otherwise the step is computed aside and selected per variable.
    """
    return (
        _host_reads_are_free(params[0])
        and beta_1 <= beta_2
        and all(g.dtype == p.dtype for g, p in zip(grads, params))
        and bool(torch.isfinite(scalars.learning_rate))
        and bool(grads_ok.all())
    )


def _squares_are_finite(extremes):
    # Per variable, from its `(min, max)`: whether every `g**2` is finite
    # (four ops: run as they are, faster than a replay).
    largest = torch.amax(torch.abs(extremes), dim=1)
    return torch.isfinite(largest * largest)


# The per-variable scalar maths between the kernels, in two `replayed` calls.
def _scale_and_check(sums, sizes, scalars, epsilon):
    # `maths.curvature_scale` and `maths.is_finite_step`: `(c, is_finite)`.
    c, sum_v_hat_eps = maths.curvature_scale(sums, sizes, scalars, epsilon)
    return c, maths.is_finite_step(c, sum_v_hat_eps, scalars)


def _applied_totals(predicted_sums, scalars, is_finite, sum_vectors, sums, kinds):
    # The predictions `kinds` where a sum reads one (`maths.FROM_SUMS`), then
    # the float32 totals over the applied steps only (`maths.finite_or_zero`).
    predicted = {kind: maths.FROM_SUMS[kind](*pair, scalars)
                 for kind, pair in zip(kinds, predicted_sums)}
    vectors = tuple(predicted.get(s.left, vector)
                    for s, vector in zip(sums, sum_vectors))
    return tuple(torch.sum(maths.finite_or_zero(vector.to(torch.float32), is_finite))
                 for vector in vectors)
