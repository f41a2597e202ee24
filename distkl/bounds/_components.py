"""Per-component refinements of `KL(p_a || q)` in the whitened frame of `p_a`: boxes (upper)
and slabs (lower)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distkl._gaussian import (
    LOG_2PI,
    GaussianMixture,
)
from distkl._logspace import safe_logsumexp
from distkl.bounds._dv import ROUNDING, Slab, dv_quadratic_lower_bound
from distkl.bounds._truncated import truncate, truncated_normal
from distkl.quadrature import kl_integrand

# ---- per-component refinements (in the whitened frame of p_a) ------------------------------------


def whitened_q(loc: Tensor, tril: Tensor, mq: GaussianMixture) -> tuple[Tensor, Tensor]:
    r"""`q` in the coordinates $z = L^{-1}(x - \mu)$ of every Gaussian `(loc, tril)`.

    `loc (*b, Ka, D)`, `tril (*b, Ka, D, D)`: returns means `(*b, Ka, Kb, D)` and
    lower-triangular factors `(*b, Ka, Kb, D, D)` of q's components.
    """
    lq = mq.tril().unsqueeze(-4)
    l_a = tril.unsqueeze(-3)
    l_a, lq = torch.broadcast_tensors(l_a, lq)
    r = torch.linalg.solve_triangular(l_a, lq, upper=False)
    diff = mq.loc.unsqueeze(-3) - loc.unsqueeze(-2)
    m = torch.linalg.solve_triangular(l_a, diff.unsqueeze(-1), upper=False).squeeze(-1)
    return m, r


def _posterior_directions(m: Tensor, r: Tensor, rho: Tensor, k: int) -> Tensor:
    r"""`k` orthonormal directions along which q's component posterior changes most.

    Weighted PCA of $\bar P (m_b - m_{b'})$ with weights $\rho_b \rho_{b'}$
    ($\bar P$ the $\rho$-averaged precision): the normals of the boundaries between
    q's components near the origin. `m (*, Kb, D)`, `r (*, Kb, D, D)`, `rho (*, Kb)`.
    Returns `(*, D, k)`. Any choice keeps the bounds valid; this one makes them tight.
    """
    with torch.no_grad():
        eye = torch.eye(m.shape[-1], dtype=m.dtype, device=m.device).expand_as(r)
        rinv = torch.linalg.solve_triangular(r, eye, upper=False)
        prec = rinv.transpose(-1, -2) @ rinv
        pbar = (rho[..., None, None] * prec).sum(-3)
        dm = m.unsqueeze(-2) - m.unsqueeze(-3)
        dd = (pbar[..., None, None, :, :] @ dm.unsqueeze(-1)).squeeze(-1)
        wt = rho.unsqueeze(-1) * rho.unsqueeze(-2)
        scatter = (wt[..., None, None] * dd.unsqueeze(-1) * dd.unsqueeze(-2)).sum((-3, -4))
        scatter = scatter + 1e-12 * eye[..., 0, :, :]
        _, vecs = torch.linalg.eigh(scatter)
        return vecs[..., -k:].flip(-1)


_BOX_GRIDS = {
    1: (-3.0, -2.0, -1.4, -1.0, -0.6, -0.3, 0.0, 0.3, 0.6, 1.0, 1.4, 2.0, 3.0),
    2: (-2.5, -1.5, -0.9, -0.45, 0.0, 0.45, 0.9, 1.5, 2.5),
    3: (-1.5, -0.5, 0.0, 0.5, 1.5),
}
_SLAB_GRID = (-3.0, -2.0, -1.4, -0.9, -0.45, 0.0, 0.45, 0.9, 1.4, 2.0, 3.0)


def grid_cells(grid: tuple[float, ...], like: Tensor) -> tuple[Tensor, Tensor]:
    g = torch.tensor(grid, dtype=like.dtype, device=like.device)
    inf = torch.full((1,), math.inf, dtype=like.dtype, device=like.device)
    edges = torch.cat([-inf, g, inf])
    return edges[:-1], edges[1:]


def box_component_upper_bound(
    m: Tensor, r: Tensor, log_v: Tensor, kl_ab: Tensor, *, k: int = 2
) -> Tensor:
    r"""Upper bound on `KL(p_a || q)` from a posterior that is constant on boxes.

    In the whitened frame of $p_a$ ($z \sim \mathcal N(0, I)$), for any partition
    into cells $B$ and any distributions $\phi_B$ over q's components, Jensen's
    inequality gives
    $\log q(z) \ge \sum_b \phi_B(b)\,[\log v_b q_b(z) - \log\phi_B(b)]$ on $B$, hence

    $$
    \mathrm{KL}(p_a \| q) \le -H(p_a) - \sum_B p_a(B)\,
    \log \sum_b v_b \exp \mathbb E_{p_a}[\log q_b \mid B].
    $$

    Cells are boxes in an orthonormal frame of `k` directions (the boundaries between q's
    components, `_posterior_directions`) times the rest of the space, so
    $p_a(B)$ is a product of 1-D normal masses and $\mathbb E[\log q_b \mid B]$
    (a quadratic) needs only truncated-normal moments. One cell recovers
    [`component_upper_bound`][distkl.bounds.component_upper_bound].

    `m`, `r`: q in p_a's frame, `(*, Ka, Kb, D)` and `(*, Ka, Kb, D, D)`; `log_v`
    `(*, Kb)`; `kl_ab` `(*, Ka, Kb)`. Returns `(*, Ka)`.

    Source: the variational bound of Hershey & Olsen (2007), ICASSP, eq. (17), with a
    posterior that depends on the cell of z (piecewise-constant variational posterior).
    """
    d = m.shape[-1]
    k = min(k, d)
    rho = torch.softmax(log_v.unsqueeze(-2) - kl_ab, -1).detach()
    frame = _posterior_directions(m, r, rho, k)  # (*, Ka, D, k)
    eye = torch.eye(d, dtype=m.dtype, device=m.device).expand_as(r)
    rinv = torch.linalg.solve_triangular(r, eye, upper=False)  # (*, Ka, Kb, D, D)
    ru = rinv @ frame.unsqueeze(-3)  # (*, Ka, Kb, D, k)
    rm = (rinv @ m.unsqueeze(-1)).squeeze(-1)
    tr_p = rinv.square().sum((-2, -1))
    gram = ru.transpose(-1, -2) @ ru  # (*, Ka, Kb, k, k)
    e = (ru.transpose(-1, -2) @ rm.unsqueeze(-1)).squeeze(-1)  # (*, Ka, Kb, k)
    c = rm.square().sum(-1)
    half_ld = r.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)
    lo, hi = grid_cells(_BOX_GRIDS[k], m)
    log_z, m1, m2 = truncated_normal(lo, hi)
    var = m2 - m1.square()
    n = lo.shape[0]
    idx = torch.cartesian_prod(*[torch.arange(n, device=m.device)] * k).reshape(-1, k)
    cell_log_mass = log_z[idx].sum(-1)  # (nc,)
    cm1, cvar = m1[idx], var[idx]  # (nc, k)
    gd = gram.diagonal(dim1=-2, dim2=-1)  # (*, Ka, Kb, k)
    quad = (
        tr_p.unsqueeze(-1)
        + ((cvar - 1.0) * gd.unsqueeze(-2)).sum(-1)
        + torch.einsum("ck,...kl,cl->...c", cm1, gram, cm1)
        - 2.0 * (e.unsqueeze(-2) * cm1).sum(-1)
        + c.unsqueeze(-1)
    )  # (*, Ka, Kb, nc)
    e_log_q = -0.5 * quad - half_ld.unsqueeze(-1) - 0.5 * d * LOG_2PI
    lse = (log_v[..., None, :, None] + e_log_q).logsumexp(-2)  # (*, Ka, nc)
    entropy = 0.5 * d * (1.0 + LOG_2PI)
    weighted = cell_log_mass.exp() * lse
    rounding = ROUNDING * (entropy + weighted.abs().sum(-1) + 1.0)
    return -entropy - weighted.sum(-1) + rounding


def slab_component_lower_bound(
    m: Tensor,
    r: Tensor,
    log_v: Tensor,
    kl_ab: Tensor,
    start: tuple[Tensor, Tensor],
    *,
    iterations: int = 8,
) -> Tensor:
    r"""Lower bound on `KL(p_a || q)`: chain rule over slabs, Donsker-Varadhan in each slab.

    For slabs $S_j$ (a partition along one direction u in p_a's whitened frame), the
    chain rule is exact,
    $\mathrm{KL}(p_a\|q) = \mathrm{KL}(p_a(S)\|q(S)) + \sum_j p_a(S_j)\,
    \mathrm{KL}(p_a|_{S_j} \| q|_{S_j})$, and each conditional term is bounded below by
    [`dv_quadratic_lower_bound`][distkl.bounds.dv_quadratic_lower_bound] with its own quadratic T
    (slab masses and the moments of truncated Gaussians are closed forms). Started from the global
    optimum `start`, which alone already gives at least the unsliced bound (Jensen over the slabs).

    Shapes as in [`box_component_upper_bound`][distkl.bounds.box_component_upper_bound]; `start` is
    `(A (*, Ka, D, D), h (*, Ka, D))`. Returns `(*, Ka)`.

    Source: chain rule, Cover & Thomas (2006), eq. (2.67); Donsker & Varadhan (1983).
    """
    d = m.shape[-1]
    rho = torch.softmax(log_v.unsqueeze(-2) - kl_ab, -1).detach()
    u = _posterior_directions(m, r, rho, 1)[..., 0]  # (*, Ka, D)
    lo, hi = grid_cells(_SLAB_GRID, m)  # (S,)
    ns = lo.shape[0]
    log_fz, m1, m2 = truncated_normal(lo, hi)
    # broadcast to (*, Ka, S, ...)
    u_s = u.unsqueeze(-2).expand(*u.shape[:-1], ns, d)
    lo_s = lo.expand(u_s.shape[:-1])
    hi_s = hi.expand(u_s.shape[:-1])
    eye = torch.eye(d, dtype=m.dtype, device=m.device)
    t_mean = u_s * m1.unsqueeze(-1)
    t_cov = eye + (m2 - m1.square() - 1.0)[..., None, None] * (
        u_s.unsqueeze(-1) * u_s.unsqueeze(-2)
    )
    loc = m.unsqueeze(-3).expand(*m.shape[:-2], ns, *m.shape[-2:])
    root = r.unsqueeze(-4).expand(*r.shape[:-3], ns, *r.shape[-3:])
    lv = log_v.unsqueeze(-2).unsqueeze(-2).expand(loc.shape[:-1])
    slab = Slab(u_s, lo_s, hi_s)
    start_s = (start[0].unsqueeze(-3), start[1].unsqueeze(-2))
    j, _ = dv_quadratic_lower_bound(
        (t_mean, t_cov), lv, loc, root, slab=slab, start=start_s, iterations=iterations
    )
    # q's slab masses, for the KL between the slab distributions
    log_zq, _, _ = truncate(
        loc, root, u_s.unsqueeze(-2).expand_as(loc), lo_s.unsqueeze(-1), hi_s.unsqueeze(-1)
    )
    log_q_s = safe_logsumexp(lv + log_zq, -1)  # (*, Ka, S)

    log_f_s = log_fz.expand_as(log_q_s)
    between = kl_integrand(log_f_s - log_q_s, log_f_s, log_q_s).sum(-1)
    # each conditional KL is >= 0, so max(J, 0) is as valid a lower bound as J
    within = (
        log_f_s.exp() * torch.where(torch.isfinite(j), j, torch.zeros_like(j)).clamp(min=0.0)
    ).sum(-1)
    return between + within
