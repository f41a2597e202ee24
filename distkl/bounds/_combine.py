"""Every applicable bound for a pair of mixtures (float64), per component and per mixture."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distkl._gaussian import (
    GaussianMixture,
    pairwise_kl,
)
from distkl.bounds._cells import cell_bounds_1d
from distkl.bounds._closed import (
    component_upper_bound,
    coupling_upper_bound,
    mixing_information_bounds,
    mixture_weights,
)
from distkl.bounds._components import (
    box_component_upper_bound,
    slab_component_lower_bound,
    whitened_q,
)
from distkl.bounds._dv import dv_quadratic_lower_bound
from distkl.bounds._slabs import (
    affine,
    separating_direction,
    slab_coupling_upper_bound,
    slab_dv_lower_bound,
)


def _sanitize(x: Tensor, bad: float) -> Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, bad), x)


def component_bounds(
    mp: GaussianMixture, mq: GaussianMixture, *, refine: bool = True
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds on `KL(p_a || q)` for every component: `(*batch, Ka)` each.

    `refine=False` skips the box and slab refinements (closed forms and global DV only).
    """
    kl_ab = pairwise_kl(mp, mq)
    jensen = component_upper_bound(mq.log_weights, kl_ab)
    m, r = whitened_q(mp.loc, mp.tril(), mq)
    lv = mq.log_weights.unsqueeze(-2).expand(m.shape[:-1])
    zero = torch.zeros_like(mp.loc)
    eye = torch.eye(mp.dim, dtype=zero.dtype, device=zero.device).expand(*zero.shape, mp.dim)
    lower, start = dv_quadratic_lower_bound((zero, eye), lv, m, r)
    upper = jensen
    if mq.num_components > 1 and refine:
        for k in sorted({min(2, mp.dim), min(3, mp.dim)}):
            upper = torch.minimum(
                upper, box_component_upper_bound(m, r, mq.log_weights, kl_ab, k=k)
            )
        lower = torch.maximum(lower, slab_component_lower_bound(m, r, mq.log_weights, kl_ab, start))
    return lower.clamp(min=0.0), upper


def all_bounds(
    mp: GaussianMixture, mq: GaussianMixture, *, cells: bool = True
) -> tuple[list[Tensor], list[Tensor]]:
    """Every applicable lower and upper bound, each of shape `(*batch,)` (float64).

    `cells=False` skips the 1-D partition bounds (used by the tests to check the general ones).
    """
    w = mixture_weights(mp)
    kl_ab = pairwise_kl(mp, mq)
    i_low, i_up = mixing_information_bounds(mp)
    uppers = [coupling_upper_bound(mp.log_weights, mq.log_weights, kl_ab)]
    lowers: list[Tensor] = []
    if mp.dim == 1 and cells:
        # The partition of the line is nearly exact; the closed forms cover single Gaussians.
        jensen_a = component_upper_bound(mq.log_weights, kl_ab)
        uppers.append((w * jensen_a).sum(-1) - i_low)
        low_a, _ = component_bounds(mp, mq, refine=False)
        lo, up = cell_bounds_1d(mp, mq)
        return [lo, (w * low_a).sum(-1) - i_up], [*uppers, up]
    # KL(p||q) = sum_a w_a [KL(p_a||q) - KL(p_a||p)]; the second sum is the mixing information.
    low_a, up_a = component_bounds(mp, mq)
    if mp.num_components > 1:
        self_low, self_up = component_bounds(mp, mp)
        i_low = torch.maximum(i_low, (w * self_low).sum(-1))
        i_up = torch.minimum(i_up, (w * self_up).sum(-1))
    uppers.append((w * up_a).sum(-1) - i_low)
    lowers.append((w * low_a).sum(-1) - i_up)
    if mp.num_components > 1:
        # Mixture level, in the frame whitening p's moment-matched Gaussian.
        mean, cov = mp.moment_match()
        chol = torch.linalg.cholesky(cov)
        fp, fq = affine(mp, mean, chol), affine(mq, mean, chol)
        d = mp.dim
        eye = torch.eye(d, dtype=mean.dtype, device=mean.device)
        target1 = (torch.zeros_like(mean), eye.expand(*mean.shape, d))
        dv, start = dv_quadratic_lower_bound(target1, fq.log_weights, fq.loc, fq.tril())
        lowers.append(dv)
        u = separating_direction(fp, fq)
        uppers.append(slab_coupling_upper_bound(fp, fq, u))
        lowers.append(slab_dv_lower_bound(fp, fq, u, start))
    return [_sanitize(x, -math.inf) for x in lowers], [_sanitize(x, math.inf) for x in uppers]
