"""Mixture-level slab bounds in the frame that whitens p's moment-matched Gaussian.

The chain rule over slabs along one direction, with the coupling (upper) or Donsker-Varadhan
(lower) bound inside every slab.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distkl._gaussian import (
    GaussianMixture,
)
from distkl._logspace import safe_logsumexp
from distkl.bounds._closed import coupling_upper_bound
from distkl.bounds._components import grid_cells
from distkl.bounds._dv import Slab, dv_quadratic_lower_bound
from distkl.bounds._truncated import standardize, truncate, truncated_normal
from distkl.quadrature import kl_integrand

# ---- mixture-level slabs (in the frame that whitens p's moment-matched Gaussian) -----------------


def affine(m: GaussianMixture, shift: Tensor, tril: Tensor) -> GaussianMixture:
    r"""The image of `m` under $x \mapsto L^{-1}(x - c)$ (KL is invariant under it)."""
    lb = tril.unsqueeze(-3)
    loc = torch.linalg.solve_triangular(
        lb, (m.loc - shift.unsqueeze(-2)).unsqueeze(-1), upper=False
    ).squeeze(-1)
    new_tril = torch.linalg.solve_triangular(lb.expand_as(m.tril()), m.tril(), upper=False)
    return GaussianMixture(m.log_weights, loc, None, new_tril, m.event_shape)


def separating_direction(mp: GaussianMixture, mq: GaussianMixture) -> Tensor:
    r"""Leading generalised eigenvector of between- vs within-component scatter of p and q pooled.

    The direction along which the components of both mixtures are most separated; `(*, D)`,
    unit. Any direction keeps the slab bounds valid.
    """
    with torch.no_grad():
        w = torch.cat([mp.log_weights.exp(), mq.log_weights.exp()], -1) * 0.5
        mu = torch.cat([mp.loc, mq.loc], -2)
        cov = torch.cat([mp.covariance(), mq.covariance()], -3)
        mean = (w.unsqueeze(-1) * mu).sum(-2)
        dev = mu - mean.unsqueeze(-2)
        between = (w[..., None, None] * dev.unsqueeze(-1) * dev.unsqueeze(-2)).sum(-3)
        within = (w[..., None, None] * cov).sum(-3)
        chol = torch.linalg.cholesky(within)
        eye = torch.eye(mp.dim, dtype=mu.dtype, device=mu.device).expand_as(chol)
        inv = torch.linalg.solve_triangular(chol, eye, upper=False)
        sym = inv @ between @ inv.transpose(-1, -2)
        _, vecs = torch.linalg.eigh(0.5 * (sym + sym.transpose(-1, -2)))
        u = (inv.transpose(-1, -2) @ vecs[..., -1:]).squeeze(-1)
        return u / u.norm(dim=-1, keepdim=True)


_MIXTURE_SLAB_GRID = (-4.0, -3.0, -2.25, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.25, 3.0, 4.0)


def _mixture_slabs(
    mp: GaussianMixture, mq: GaussianMixture, u: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Slab edges along `u` and the truncated statistics of every component of p and q.

    Returns `(lo, hi)` `(*, S)`, p's `(log Z, M1, M2)` `(*, S, Ka)`, q's `log Z`
    `(*, S, Kb)` and the between-slab term `KL(p(S) || q(S))` `(*,)`.
    """

    lo, hi = grid_cells(_MIXTURE_SLAB_GRID, u)
    shape = u.shape[:-1] + lo.shape
    lo, hi = lo.expand(shape), hi.expand(shape)

    def stats(m: GaussianMixture) -> tuple[Tensor, Tensor, Tensor]:
        centre = (m.loc * u.unsqueeze(-2)).sum(-1)  # (*, K)
        sd = (m.tril().transpose(-1, -2) @ u[..., None, :, None]).squeeze(-1).norm(dim=-1)
        zl = standardize(lo.unsqueeze(-1), centre.unsqueeze(-2), sd.unsqueeze(-2))
        zh = standardize(hi.unsqueeze(-1), centre.unsqueeze(-2), sd.unsqueeze(-2))
        return truncated_normal(zl, zh)

    log_zp, m1, m2 = stats(mp)
    log_zq, _, _ = stats(mq)
    log_fs = safe_logsumexp(mp.log_weights.unsqueeze(-2) + log_zp, -1)
    log_gs = safe_logsumexp(mq.log_weights.unsqueeze(-2) + log_zq, -1)
    between = kl_integrand(log_fs - log_gs, log_fs, log_gs)
    between = torch.where(log_fs == -math.inf, torch.zeros_like(between), between).sum(-1)
    return lo, hi, log_zp, m1, m2, log_zq, between


def slab_coupling_upper_bound(mp: GaussianMixture, mq: GaussianMixture, u: Tensor) -> Tensor:
    r"""Upper bound on `KL(p || q)`: chain rule over slabs, coupling bound inside each slab.

    With slabs $S_j$ along `u`,
    $\mathrm{KL}(p\|q) = \mathrm{KL}(p(S)\|q(S))
    + \sum_j p(S_j)\,\mathrm{KL}(p|_{S_j}\|q|_{S_j})$ exactly, and
    $p|_{S_j} = \sum_a w_{a|j}\, p_a|_{S_j}$ is a mixture of truncated Gaussians (likewise
    q), so [`coupling_upper_bound`][distkl.bounds.coupling_upper_bound] applies in every slab with
    the closed form

    $$
    \mathrm{KL}(p_a|_S \| q_b|_S) = \tfrac12\bigl[\delta^\top\Gamma_b^{-1}\delta
    + 2M_1\,\delta^\top\Gamma_b^{-1}v + M_2\,v^\top\Gamma_b^{-1}v
    + \mathrm{tr}(\Gamma_b^{-1}\Sigma_a) - v^\top\Gamma_b^{-1}v - M_2 - D + 1\bigr]
    + \tfrac12\log\tfrac{|\Gamma_b|}{|\Sigma_a|} - \log\tfrac{p_a(S)}{q_b(S)},
    $$

    $\delta = \mu_a - \nu_b$, $v = \Sigma_a u / \sigma_a$, $M_1, M_2$ the
    truncated standard-normal moments of $u^\top x$ under $p_a$. In a slab where the
    components separate, the coupling becomes exact.

    Returns `(*,)`. Source: chain rule (Cover & Thomas 2006, eq. 2.67) and Hershey & Olsen
    (2007), sec. 6, applied to truncated components.
    """
    d = mp.dim
    lo, hi, log_zp, m1, m2, log_zq, between = _mixture_slabs(mp, mq, u)
    lp = mp.tril()
    lq = mq.tril()
    su = (lp @ (lp.transpose(-1, -2) @ u[..., None, :, None])).squeeze(-1)  # (*, Ka, D)
    sd = (su * u.unsqueeze(-2)).sum(-1).sqrt()
    v = su / sd.unsqueeze(-1)
    delta = mp.loc.unsqueeze(-2) - mq.loc.unsqueeze(-3)  # (*, Ka, Kb, D)
    lqb = lq.unsqueeze(-4).expand(*delta.shape, d)
    wd = torch.linalg.solve_triangular(lqb, delta.unsqueeze(-1), upper=False).squeeze(-1)
    wv = torch.linalg.solve_triangular(
        lqb, v.unsqueeze(-2).expand_as(delta).unsqueeze(-1), upper=False
    ).squeeze(-1)
    ratio = torch.linalg.solve_triangular(lqb, lp.unsqueeze(-3).expand_as(lqb), upper=False)
    a2 = wv.square().sum(-1)
    a1 = 2.0 * (wd * wv).sum(-1)
    a0 = wd.square().sum(-1) + ratio.square().sum((-2, -1)) - a2
    half_ld = lq.diagonal(dim1=-2, dim2=-1).log().sum(-1).unsqueeze(-2) - lp.diagonal(
        dim1=-2, dim2=-1
    ).log().sum(-1).unsqueeze(-1)
    kl_s = (
        0.5
        * (
            a0.unsqueeze(-3)
            + a1.unsqueeze(-3) * m1.unsqueeze(-1)
            + (a2.unsqueeze(-3) - 1.0) * m2.unsqueeze(-1)
            - d
            + 1
        )
        + half_ld.unsqueeze(-3)
        - log_zp.unsqueeze(-1)
        + log_zq.unsqueeze(-2)
    )  # (*, S, Ka, Kb)
    log_fs = safe_logsumexp(mp.log_weights.unsqueeze(-2) + log_zp, -1)
    log_gs = safe_logsumexp(mq.log_weights.unsqueeze(-2) + log_zq, -1)
    lw = mp.log_weights.unsqueeze(-2) + log_zp - log_fs.unsqueeze(-1)
    lv = mq.log_weights.unsqueeze(-2) + log_zq - log_gs.unsqueeze(-1)
    within = coupling_upper_bound(lw, lv, kl_s)
    fs = log_fs.exp()
    within = torch.where(fs > 0, fs * within, torch.zeros_like(within)).sum(-1)
    return between + within


def slab_dv_lower_bound(
    mp: GaussianMixture,
    mq: GaussianMixture,
    u: Tensor,
    start: tuple[Tensor, Tensor],
    *,
    iterations: int = 8,
) -> Tensor:
    r"""Lower bound on `KL(p || q)`: chain rule over slabs, Donsker-Varadhan in each slab.

    $\mathrm{KL}(p\|q) \ge \mathrm{KL}(p(S)\|q(S)) + \sum_j p(S_j)\,
    \sup_{T_j}\bigl(\mathbb E_{p|_{S_j}} T_j - \log \mathbb E_{q|_{S_j}} e^{T_j}\bigr)$ with
    quadratic $T_j$; $p|_{S_j}$ enters through its mean and covariance (mixtures
    of truncated Gaussians), $q|_{S_j}$ through closed-form slab masses of tilted
    Gaussians. Started from the unsliced optimum `start`.

    Returns `(*,)`. Source: chain rule (Cover & Thomas 2006, eq. 2.67); Donsker & Varadhan
    (1983).
    """
    lo, hi, log_zp, _, _, _, between = _mixture_slabs(mp, mq, u)
    ns = lo.shape[-1]
    d = mp.dim
    u_s = u.unsqueeze(-2).expand(*u.shape[:-1], ns, d)
    loc_p = mp.loc.unsqueeze(-3).expand(*mp.loc.shape[:-2], ns, *mp.loc.shape[-2:])
    root_p = mp.tril().unsqueeze(-4).expand(*loc_p.shape, d)
    log_z, mean_a, cov_a = truncate(
        loc_p, root_p, u_s.unsqueeze(-2).expand_as(loc_p), lo.unsqueeze(-1), hi.unsqueeze(-1)
    )  # (*, S, Ka, ...)
    logits = mp.log_weights.unsqueeze(-2) + log_z
    log_fs = safe_logsumexp(logits, -1)
    rho = torch.exp(
        logits - torch.where(torch.isfinite(log_fs), log_fs, torch.zeros_like(log_fs)).unsqueeze(-1)
    )
    t_mean = (rho.unsqueeze(-1) * mean_a).sum(-2)
    second = (rho[..., None, None] * (cov_a + mean_a.unsqueeze(-1) * mean_a.unsqueeze(-2))).sum(-3)
    t_cov = second - t_mean.unsqueeze(-1) * t_mean.unsqueeze(-2)
    t_cov = 0.5 * (t_cov + t_cov.transpose(-1, -2))
    loc_q = mq.loc.unsqueeze(-3).expand(*mq.loc.shape[:-2], ns, *mq.loc.shape[-2:])
    root_q = mq.tril().unsqueeze(-4).expand(*loc_q.shape, d)
    lv = mq.log_weights.unsqueeze(-2).expand(loc_q.shape[:-1])
    keep = log_fs > -700.0  # slabs p does not reach contribute nothing
    lo_k = torch.where(keep, lo, torch.zeros_like(lo))
    hi_k = torch.where(keep, hi, torch.ones_like(hi))
    eye = torch.eye(d, dtype=t_cov.dtype, device=t_cov.device)
    t_cov = torch.where(keep[..., None, None], t_cov, eye.expand_as(t_cov))
    t_mean = torch.where(keep[..., None], t_mean, torch.zeros_like(t_mean))
    start_s = (start[0].unsqueeze(-3), start[1].unsqueeze(-2))
    j, _ = dv_quadratic_lower_bound(
        (t_mean, t_cov),
        lv,
        loc_q,
        root_q,
        slab=Slab(u_s, lo_k, hi_k),
        start=start_s,
        iterations=iterations,
    )
    ok = keep & torch.isfinite(j)
    within = torch.where(ok, log_fs.exp() * j.clamp(min=0.0), torch.zeros_like(j)).sum(-1)
    return between + within
