"""SOAA's update of all variables at once with `torch._foreach_*` kernels.

On torch, Keras runs the portable `update_step` eagerly, one variable and one
small op at a time; Keras' own torch Adam avoids that with multi-tensor
kernels (`keras/src/backend/torch/optimizers/torch_adam.py`). This module is
the same for SOAA: the maths of `SOAA.update_step`, every variable of a dtype
in one pass of foreach calls. Tests check that it gives the numbers of the
portable path, skips included.

The per-variable sums are norms: `sum(x**2) = norm(x)**2`, and `new_v`,
`m_hat * u` (`u` has the sign of `m_hat`) are never negative, so their sums
are L1 norms. A variable whose step is not finite keeps its weights and
moments (one `torch.where` each).
"""

import torch
from keras import ops

from keras_soaa import trust_region
from keras_soaa.optimizer import _curvature_sums, curvature_scale_of_sums


def _norms(tensors, order):
    return torch.stack(torch._foreach_norm(tensors, order))


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
        moment = optimizer._momentums[optimizer._get_variable_index(variable)]
        groups.setdefault(moment.value.dtype, []).append((grad, variable))
    for dtype, members in groups.items():
        _update_group(optimizer, dtype, *zip(*members), learning_rate)


def _update_group(optimizer, dtype, grads, variables, learning_rate):
    indices = [optimizer._get_variable_index(v) for v in variables]
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

    new_m = torch._foreach_lerp(moments, grads, 1 - optimizer.beta_1)
    new_v = torch._foreach_lerp(
        velocities, torch._foreach_mul(grads, grads), 1 - optimizer.beta_2
    )
    m_hat = torch._foreach_div(new_m, beta_1_correction)
    v_hat = torch._foreach_div(new_v, beta_2_correction)

    sum_m_sq = torch.square(_norms(new_m, 2))
    sum_v = _norms(new_v, 1)
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

    sqrt_v_hat = torch._foreach_sqrt(v_hat)
    scaled_fisher = torch._foreach_mul(
        v_hat, list((radius * curvature_scale).unbind())
    )
    denominator = torch._foreach_maximum(sqrt_v_hat, scaled_fisher)
    torch._foreach_add_(denominator, epsilon)
    direction = torch._foreach_div(torch._foreach_mul(m_hat, radius), denominator)

    new_thetas = thetas
    if optimizer.weight_decay is not None:
        decays = [
            lr * optimizer.weight_decay
            if optimizer._use_weight_decay(v) else torch.zeros_like(lr)
            for v in variables
        ]
        new_thetas = torch._foreach_sub(thetas, torch._foreach_mul(thetas, decays))
    new_thetas = torch._foreach_sub(new_thetas, torch._foreach_mul(direction, lr))
    new_params = [t.to(p.dtype) for t, p in zip(new_thetas, params)]

    gain = _norms(torch._foreach_mul(m_hat, direction), 1)
    curvature = torch.square(
        _norms(torch._foreach_mul(sqrt_v_hat, direction), 2)
    )
    predicted = (lr * (gain - 0.5 * curvature)).to(torch.float32)
    largest_new_weight = _norms(new_params, float("inf")).to(torch.float32)
    is_finite = (
        torch.isfinite(sum_v_hat_eps)
        & torch.isfinite(predicted)
        & torch.isfinite(largest_new_weight)
    )

    for ok, state, new in zip(
        is_finite.unbind() * 3,
        moments + velocities + params,
        list(new_m) + list(new_v) + new_params,
    ):
        torch.where(ok, new, state, out=state)
    total = torch.where(is_finite, predicted, 0.0).sum()
    optimizer._predicted_reduction.value.add_(total)
