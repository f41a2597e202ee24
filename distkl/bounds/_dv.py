"""Donsker-Varadhan lower bounds on KL with quadratic test functions (whole space or one slab)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from distkl._logspace import safe_logsumexp
from distkl.bounds._truncated import truncate

#: Relative rounding allowance for sums of closed-form terms (about 500 ulps in float64).
ROUNDING = 1e-13


# ---- Donsker-Varadhan with quadratic test functions ----------------------------------------------


class Slab(NamedTuple):
    """The slab `lo <= u'x <= hi`: `u (*, D)` unit, `lo, hi (*)`."""

    u: Tensor
    lo: Tensor
    hi: Tensor


def _tilt(
    a_mat: Tensor, h: Tensor, loc: Tensor, root: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Tilt the components $\mathcal N(m_b, R_bR_b^\top)$ by $e^T$, T = -x'Ax/2 + h'x.

    $$
    \log\!\int \mathcal N(x; m, RR^\top) e^{T(x)}dx = T(m) - \tfrac12\log\det(I + M)
    + \tfrac12 k^\top (I + M)^{-1} k, \quad M = R^\top A R,\; k = R^\top(h - Am),
    $$

    finite iff $I + M \succ 0$. Returns `(log integral, tilted mean, tilted root, ok)`.
    """
    d = loc.shape[-1]
    eye = torch.eye(d, dtype=loc.dtype, device=loc.device)
    a_b = a_mat.unsqueeze(-3)
    am = (a_b @ loc.unsqueeze(-1)).squeeze(-1)
    t_m = -0.5 * (loc * am).sum(-1) + (h.unsqueeze(-2) * loc).sum(-1)
    rt = root.transpose(-1, -2)
    mm = rt @ a_b @ root
    mm = 0.5 * (mm + mm.transpose(-1, -2)) + eye
    chol, info = torch.linalg.cholesky_ex(mm)
    ok = info == 0
    chol = torch.where(ok[..., None, None], chol, eye.expand_as(chol))
    k = (rt @ (h.unsqueeze(-2) - am).unsqueeze(-1)).squeeze(-1)
    w = torch.linalg.solve_triangular(chol, k.unsqueeze(-1), upper=False)
    log_int = (
        t_m - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1) + 0.5 * w.squeeze(-1).square().sum(-1)
    )
    log_int = torch.where(ok, log_int, torch.full_like(log_int, math.inf))
    shift = torch.linalg.solve_triangular(chol.transpose(-1, -2), w, upper=True)
    mean = loc + (root @ shift).squeeze(-1)
    new_root = torch.linalg.solve_triangular(chol, rt, upper=False).transpose(-1, -2)
    return log_int, mean, new_root, ok


def _dv_objective(
    a_mat: Tensor,
    h: Tensor,
    target: tuple[Tensor, Tensor],
    log_v: Tensor,
    loc: Tensor,
    root: Tensor,
    slab: Slab | None,
    log_mass_q: Tensor,
    conservative: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""`J = E_f[T] - log E_q[e^T]` (q restricted to `slab` if given) and q e^T's moments.

    `target = (mean, cov)` of f (only these enter $\mathbb E_f T$ for quadratic T);
    `log_mass_q` is $\log q(\text{slab})$ (0 without a slab). Returns
    `(J, mean, cov)` of the normalised (restricted) tilted mixture; `J = -inf` where
    $e^T$ is not integrable. `conservative` subtracts a bound on the rounding error.
    """
    t_mean, t_cov = target
    log_int, mean, new_root, _ = _tilt(a_mat, h, loc, root)
    if slab is None:
        log_z = torch.zeros_like(log_int)
        cov = new_root @ new_root.transpose(-1, -2)
    else:
        u = slab.u.unsqueeze(-2).expand_as(mean)
        log_z, mean, cov = truncate(mean, new_root, u, slab.lo.unsqueeze(-1), slab.hi.unsqueeze(-1))
    logits = log_v + log_int + log_z
    log_norm = safe_logsumexp(logits, -1)
    e_t = (
        -0.5 * (a_mat * t_cov).sum((-2, -1))
        - 0.5 * (t_mean * (a_mat @ t_mean.unsqueeze(-1)).squeeze(-1)).sum(-1)
        + (h * t_mean).sum(-1)
    )
    j = e_t - log_norm + log_mass_q
    if conservative:  # subtract a bound on the rounding error of the terms summed
        j = j - ROUNDING * (e_t.abs() + log_norm.abs() + log_mass_q.abs() + 1.0)
    j = torch.where(torch.isfinite(log_norm), j, torch.full_like(j, -math.inf))
    rho = torch.exp(logits - log_norm.unsqueeze(-1))
    rho = torch.where(torch.isfinite(rho), rho, torch.zeros_like(rho))
    mu = (rho.unsqueeze(-1) * mean).sum(-2)
    second = (rho[..., None, None] * (cov + mean.unsqueeze(-1) * mean.unsqueeze(-2))).sum(-3)
    s = second - mu.unsqueeze(-1) * mu.unsqueeze(-2)
    return j, mu, 0.5 * (s + s.transpose(-1, -2))


def _dv_maximise(
    target: tuple[Tensor, Tensor],
    log_v: Tensor,
    loc: Tensor,
    root: Tensor,
    slab: Slab | None,
    log_mass_q: Tensor,
    start: tuple[Tensor, Tensor] | None,
    iterations: int,
) -> tuple[Tensor, Tensor]:
    r"""Maximise the quadratic Donsker-Varadhan objective; returns `(A, h)` (no gradients).

    Each step moves the natural parameters of T by the difference between those of the Gaussian
    matching f's moments and those of the Gaussian matching the tilted $q e^T$ (the Newton
    step when $q e^T$ is Gaussian; an ascent direction always, since the Gaussian
    log-partition is convex), halving it until the objective increases.
    """
    t_mean, t_cov = target
    batch = t_mean.shape[:-1]
    d = t_mean.shape[-1]
    eye = torch.eye(d, dtype=t_mean.dtype, device=t_mean.device)
    with torch.no_grad():
        t_chol, t_info = torch.linalg.cholesky_ex(t_cov)
        t_ok = t_info == 0
        t_chol = torch.where(t_ok[..., None, None], t_chol, eye.expand_as(t_chol))
        t_prec = torch.cholesky_inverse(t_chol)
        t_nat = (t_prec @ t_mean.unsqueeze(-1)).squeeze(-1)
        if start is None:
            a_mat = torch.zeros(*batch, d, d, dtype=t_mean.dtype, device=t_mean.device)
            h = torch.zeros(*batch, d, dtype=t_mean.dtype, device=t_mean.device)
        else:
            a_mat = start[0].expand(*batch, d, d).clone()
            h = start[1].expand(*batch, d).clone()

        def objective(a_: Tensor, h_: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return _dv_objective(a_, h_, target, log_v, loc, root, slab, log_mass_q)

        j, mu, s = objective(a_mat, h)
        active = torch.isfinite(j) & t_ok
        for _ in range(iterations):
            s_chol, info = torch.linalg.cholesky_ex(s)
            good = (info == 0) & active
            s_chol = torch.where(good[..., None, None], s_chol, eye.expand_as(s_chol))
            s_prec = torch.cholesky_inverse(s_chol)
            da = torch.where(good[..., None, None], t_prec - s_prec, torch.zeros_like(s_prec))
            dh = (t_nat - (s_prec @ mu.unsqueeze(-1)).squeeze(-1)) * good.unsqueeze(-1)
            step = torch.ones_like(j)
            accepted = torch.zeros_like(good)
            for _ in range(6):
                a_try = a_mat + step[..., None, None] * da
                h_try = h + step[..., None] * dh
                j_try, mu_try, s_try = objective(a_try, h_try)
                better = good & ~accepted & (j_try > j + 1e-13 * (1.0 + j.abs()))
                a_mat = torch.where(better[..., None, None], a_try, a_mat)
                h = torch.where(better[..., None], h_try, h)
                j = torch.where(better, j_try, j)
                mu = torch.where(better[..., None], mu_try, mu)
                s = torch.where(better[..., None, None], s_try, s)
                accepted = accepted | better
                step = torch.where(accepted, step, 0.5 * step)
                if bool((accepted | ~good).all()):
                    break
            active = accepted
            if not bool(active.any()):
                break
    return a_mat, h


def dv_quadratic_lower_bound(
    target: tuple[Tensor, Tensor],
    log_v: Tensor,
    loc: Tensor,
    root: Tensor,
    *,
    slab: Slab | None = None,
    start: tuple[Tensor, Tensor] | None = None,
    iterations: int = 12,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    r"""`KL(f || q) >= sup_T E_f[T] - log E_q[e^T]` over quadratic `T` (Donsker-Varadhan).

    `f` enters through its mean and covariance `target` only (they fix $\mathbb E_f T$
    for quadratic T), so `f` may be a mixture or a truncated Gaussian. `q` is the mixture
    $\sum_b e^{\text{log\_v}_b} \mathcal N(\text{loc}_b, R_bR_b^\top)$, restricted to
    `slab` when one is given (then both sides are the slab-conditionals and `log_v` must be
    the unrestricted log-weights). For $T(x) = -\tfrac12 x^\top A x + h^\top x$ both
    expectations are closed forms, the objective is concave in $(A, h)$, and any `(A, h)`
    gives a valid bound; `_dv_maximise` chooses one. Exact when `f` and `q` are single
    Gaussians (no slab).

    Returns `(bound (*,), (A, h))`.

    Source: Donsker & Varadhan (1983), Comm. Pure Appl. Math. 36(2), 183-212 (variational
    formula, Theorem 2.1 / 3.2); with $T = \log f$ it is the lower bound of Durrieu, Thiran
    & Kelly (2012), ICASSP, eq. (8).
    """
    if slab is None:
        log_mass_q = torch.zeros_like(log_v[..., 0])
    else:
        u = slab.u.unsqueeze(-2).expand_as(loc)
        log_z0, _, _ = truncate(loc, root, u, slab.lo.unsqueeze(-1), slab.hi.unsqueeze(-1))
        log_mass_q = safe_logsumexp(log_v + log_z0, -1)
    a_mat, h = _dv_maximise(target, log_v, loc, root, slab, log_mass_q, start, iterations)
    j = _dv_objective(a_mat, h, target, log_v, loc, root, slab, log_mass_q, conservative=True)[0]
    return j, (a_mat, h)
