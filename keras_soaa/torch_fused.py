"""SOAA's update of all variables at once with `torch._foreach_*` kernels.

On torch, Keras runs the portable `update_step` eagerly, one variable and one
small op at a time; Keras' own torch Adam avoids that with multi-tensor
kernels (`keras/src/backend/torch/optimizers/torch_adam.py`). This module is
the same for SOAA: the maths of `SOAA.update_step`, every variable of a dtype
in one pass of foreach calls. Tests check that it gives the numbers of the
portable path, skips included.

The per-variable sums are BLAS dot products (`sum(a * b)` without an array
for the products), the bias corrections are folded into scalars, and most
kernels write in place: on CPU a foreach call is a loop of per-tensor
kernels, and every new array is freshly mapped memory. A variable whose step
is not finite keeps its weights and moments (`torch.where`); when every
step is finite, the new values are copied in.
"""

import torch
from keras import ops

from keras_soaa import trust_region
from keras_soaa.optimizer import _curvature_sums, curvature_scale_of_sums


@torch.no_grad()
def update(optimizer, grads, variables, learning_rate):
    """Applies one SOAA step to `variables` (Keras torch variables).

    Args:
        optimizer: the `SOAA` optimizer, built on `variables`.
        grads: one gradient tensor per variable.
        variables: the Keras variables to update.
        learning_rate: the learning rate of this step (a scalar tensor).
    """
    groups = {}
    for grad, variable in zip(grads, variables):
        if 0 in tuple(variable.shape):
            continue  # no element: nothing to update, nothing predicted
        index = optimizer._get_variable_index(variable)
        dtype = optimizer._momentums[index].value.dtype
        groups.setdefault(dtype, []).append((grad, variable, index))
    for dtype, members in groups.items():
        _update_group(optimizer, dtype, *zip(*members), learning_rate)


def _dots(pairs):
    # BLAS dot products: sum(a * b) without an array for the products.
    return torch.stack([torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in pairs])


def _update_group(optimizer, dtype, grads, variables, indices, learning_rate):
    moments = [optimizer._momentums[i].value for i in indices]
    velocities = [optimizer._velocities[i].value for i in indices]
    params = [v.value for v in variables]
    thetas = [p.to(dtype) for p in params]
    grads = [ops.convert_to_tensor(g).to(dtype) for g in grads]
    epsilon = optimizer.epsilon

    lr = ops.convert_to_tensor(learning_rate).to(dtype)
    step = (ops.convert_to_tensor(optimizer.iterations) + 1).to(dtype)
    beta_1_correction = trust_region.bias_correction(optimizer.beta_1, step)
    beta_2_correction = trust_region.bias_correction(optimizer.beta_2, step)
    radius = ops.convert_to_tensor(optimizer.radius).to(dtype)

    # Few passes and few new arrays: on CPU every foreach call is a loop of
    # per-tensor kernels, and every new array is freshly mapped memory. The
    # bias corrections are folded into scalars instead of making m_hat and
    # v_hat arrays.
    new_m = torch._foreach_lerp(moments, grads, 1 - optimizer.beta_1)
    new_v = torch._foreach_mul(velocities, optimizer.beta_2)
    torch._foreach_addcmul_(new_v, grads, grads, 1 - optimizer.beta_2)

    sum_m_sq = _dots(zip(new_m, new_m))
    sum_v = torch.stack([v.sum() for v in new_v])
    scale = torch.ones_like(sum_v)
    if not bool(torch.isfinite(sum_m_sq).all() & torch.isfinite(sum_v).all()):
        # Rare (huge gradients): the portable path's sums, which rescale
        # where a plain sum overflows. The host check costs one sync, free
        # on CPU, so it guards only this branch.
        sum_m_sq, sum_v, scale = (
            torch.stack(sums)
            for sums in zip(*map(_curvature_sums, new_m, new_v))
        )
    sizes = torch.tensor([p.numel() for p in params], dtype=dtype)
    curvature_scale, sum_v_hat_eps = curvature_scale_of_sums(
        sum_m_sq, sum_v, scale, sizes, beta_1_correction, beta_2_correction,
        epsilon,
    )

    # u = d * m_hat / (max(sqrt(v_hat), d * c * v_hat) + epsilon)
    sqrt_v_hat = torch._foreach_sqrt(new_v)
    torch._foreach_mul_(sqrt_v_hat, torch.rsqrt(beta_2_correction))
    direction = torch._foreach_mul(
        new_v, list((radius * curvature_scale / beta_2_correction).unbind())
    )
    torch._foreach_maximum_(direction, sqrt_v_hat)
    torch._foreach_add_(direction, epsilon)
    for m, u in zip(new_m, direction):
        torch.div(m, u, out=u)
    torch._foreach_mul_(direction, radius / beta_1_correction)

    new_thetas = thetas
    if optimizer.weight_decay is not None:
        decay = -lr * optimizer.weight_decay
        new_thetas = [
            torch.addcmul(t, t, decay) if optimizer._use_weight_decay(v) else t
            for t, v in zip(thetas, variables)
        ]
    new_params = [
        torch.addcmul(t, u, -lr).to(p.dtype)
        for t, u, p in zip(new_thetas, direction, params)
    ]

    # sum(m_hat * u) and sum(v_hat * u**2), the latter as
    # sum((sqrt(v_hat) * u)**2): u**2 alone underflows when v_hat is huge.
    gain = _dots(zip(new_m, direction)) / beta_1_correction
    torch._foreach_mul_(sqrt_v_hat, direction)
    curvature = _dots(zip(sqrt_v_hat, sqrt_v_hat))
    predicted = (lr * (gain - 0.5 * curvature)).to(torch.float32)
    # min and max propagate NaN: both are finite iff every new weight is.
    weight_bounds = torch.stack([
        torch.stack(torch.aminmax(p)).to(torch.float32) for p in new_params
    ])
    is_finite = (
        torch.isfinite(sum_v_hat_eps)
        & torch.isfinite(predicted)
        & torch.isfinite(weight_bounds).all(dim=1)
    )

    states = moments + velocities + params
    news = list(new_m) + list(new_v) + new_params
    if params[0].device.type == "cpu" and bool(is_finite.all()):
        # The usual step: a plain copy. (A host check is free on CPU; on an
        # accelerator it would stall the queue, so `where` is used there.)
        torch._foreach_copy_(states, news)
    else:
        for ok, state, new in zip(is_finite.unbind() * 3, states, news):
            torch.where(ok, new, state, out=state)
    total = torch.where(is_finite, predicted, 0.0).sum()
    optimizer._predicted_reduction.value.add_(total)
