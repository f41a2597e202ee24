r"""The composite Gauss-Legendre rule of `distkl.quadrature` and the log-densities it needs.

Every function here is traceable by `torch.compile(fullgraph=True)`: the Gauss-Legendre
nodes are Python constants computed at import, shapes depend only on the number of components,
and no value is read back to Python.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution

from distkl._checks import batch_shape_of, check_same_event_shape
from distkl._gaussian import GaussianMixture, as_gaussian_mixture, loc_scale_1d, to_float64

__all__ = [
    "MAX_NODES_PER_INTERVAL",
    "OFFSETS",
    "legendre",
    "scalar_mixture",
    "float64_pair",
    "loc_scale",
    "crossing_points",
    "composite_rule",
    "component_log_density",
    "log_densities",
]

#: Breakpoints of one component, in units of its standard deviation.
OFFSETS = (0.0, 0.75, 1.5, 2.25, 3.0, 4.0, 5.0, 6.5, 8.5, 12.0)
INTERVALS_PER_COMPONENT = 2 * (len(OFFSETS) - 1)
#: Breakpoints around a crossing of two components' weighted densities, in units of the
#: crossing's width `1 / |slope difference of the two log-densities|`.
CROSSING_OFFSETS = (-10.0, -3.0, -1.0, 0.0, 1.0, 3.0, 10.0)
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
#: Gauss-Legendre rules with up to this many nodes per interval are tabulated at import, so
#: that a compiled graph reads constants (`nodes` up to 18 * 64 = 1152 per component).
MAX_NODES_PER_INTERVAL = 64
_LEGENDRE: dict[int, tuple[tuple[float, ...], tuple[float, ...]]] = {}


def _tabulate(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    t, w = np.polynomial.legendre.leggauss(n)
    return tuple(float(v) for v in t), tuple(float(v) for v in w)


_LEGENDRE.update({n: _tabulate(n) for n in range(1, MAX_NODES_PER_INTERVAL + 1)})


def legendre(n: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Gauss-Legendre nodes and weights on `[-1, 1]` as Python floats (tabulated up to 64)."""
    if n not in _LEGENDRE:  # eager only: a compiled graph uses the table
        _LEGENDRE[n] = _tabulate(n)
    return _LEGENDRE[n]


def scalar_mixture(d: Distribution, role: str) -> GaussianMixture:
    """The canonical mixture of `d`; `ValueError` unless its event has one element."""
    mix = as_gaussian_mixture(d, role=role)
    if mix.dim != 1:
        raise ValueError(
            f"quadrature needs a scalar (1-D) event, got event shape {tuple(d.event_shape)} for "
            f"{role} ({type(d).__name__}); use distkl.options(method='mc'), 'variational' or "
            "'unscented' for multivariate events."
        )
    return mix


def float64_pair(
    p: Distribution, q: Distribution
) -> tuple[GaussianMixture, GaussianMixture, torch.dtype]:
    """Canonical 1-D mixtures of `p` and `q` in float64, expanded to the broadcast batch,
    and the dtype the result is returned in (torch's promotion of the two)."""
    check_same_event_shape(p, q)
    mp, mq = scalar_mixture(p, "p"), scalar_mixture(q, "q")
    shape = batch_shape_of(p, q)
    dtype = torch.promote_types(mp.loc.dtype, mq.loc.dtype)
    return to_float64(mp).expand(shape), to_float64(mq).expand(shape), dtype


def loc_scale(m: GaussianMixture) -> tuple[Tensor, Tensor]:
    """`(loc, scale)` of every component of a scalar mixture, each `(*batch, K)`: the scale as
    given (a negative scale, accepted with validation off, gives NaN, not `|scale|`)."""
    return loc_scale_1d(m)


def crossing_points(log_w: Tensor, loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    r"""Where two weighted components of one mixture are equal, and how sharp the switch is.

    For every pair $i < j$, the roots of
    $\ell_i(x) = \ell_j(x)$, $\ell_k = \log w_k + \log\mathcal N(x; \mu_k, \sigma_k^2)$
    (a quadratic), and the width $1 / |\ell_i'(r) - \ell_j'(r)|$ of the near-kink that
    $\log\sum_k e^{\ell_k}$ has there when the pair dominates. A pair without a real root
    gives NaN (callers drop it). Computed without gradient: the points only place nodes.

    Returns:
        `(roots, widths)`, each `(*batch, K (K - 1))`.
    """
    k = log_w.shape[-1]
    i, j = torch.triu_indices(k, k, 1, device=loc.device)
    lw, m, s = log_w.detach(), loc.detach(), scale.detach()
    inv_i, inv_j = s[..., i].square().reciprocal(), s[..., j].square().reciprocal()
    a = 0.5 * (inv_j - inv_i)
    b = m[..., i] * inv_i - m[..., j] * inv_j
    c = (
        lw[..., i]
        - lw[..., j]
        - s[..., i].log()
        + s[..., j].log()
        - 0.5 * m[..., i].square() * inv_i
        + 0.5 * m[..., j].square() * inv_j
    )
    disc = b.square() - 4.0 * a * c
    root_disc = torch.where(disc >= 0, disc, torch.full_like(disc, math.nan)).sqrt()
    half = -0.5 * (b + torch.where(b >= 0, root_disc, -root_disc))
    roots = torch.cat([half / a, c / half], -1)  # a = 0 (equal scales): the first is +-inf
    slope = (2.0 * torch.cat([a, a], -1) * roots + torch.cat([b, b], -1)).abs()
    ok = torch.isfinite(roots) & (slope > 0)
    nan = torch.full_like(roots, math.nan)
    return torch.where(ok, roots, nan), torch.where(ok, slope.reciprocal(), nan)


def _breakpoints(loc: Tensor, scale: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Breakpoints `(*batch, 19 K)` of the components `(*batch, K)`, their min and max."""
    dtype, device = loc.dtype, loc.device
    c = torch.tensor(OFFSETS[1:], dtype=dtype, device=device)
    c = torch.cat([-c.flip(0), torch.zeros(1, dtype=dtype, device=device), c])
    pts = (loc.unsqueeze(-1) + scale.unsqueeze(-1) * c).flatten(-2)
    lo, hi = pts.amin(-1, keepdim=True), pts.amax(-1, keepdim=True)
    return pts, lo, hi


def composite_rule(nodes: int, *mixtures: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Nodes `x` and weights `(*batch, N)` over the breakpoints of every component of every
    mixture `(log_w, loc, scale)` and of the crossings within each mixture.

    A near-kink of `log q` where the dominant component switches (`log q` turns from one
    parabola to another over a width `1 / |slope difference|`) gets breakpoints at
    `CROSSING_OFFSETS` widths around it, clamped into the span of the component breakpoints.
    """
    comp = [_breakpoints(loc, scale) for _, loc, scale in mixtures]
    lo = torch.cat([c[1] for c in comp], -1).amin(-1, keepdim=True)
    hi = torch.cat([c[2] for c in comp], -1).amax(-1, keepdim=True)
    pts = [c[0] for c in comp]
    off = torch.tensor(CROSSING_OFFSETS, dtype=lo.dtype, device=lo.device)
    for log_w, loc, scale in mixtures:
        if log_w.shape[-1] < 2:
            continue
        roots, widths = crossing_points(log_w, loc, scale)
        near = roots.unsqueeze(-1) + widths.unsqueeze(-1) * off  # NaN for a missing root
        near = torch.where(
            torch.isnan(near), lo.unsqueeze(-1), near.clamp(lo.unsqueeze(-1), hi.unsqueeze(-1))
        )
        pts.append(near.flatten(-2))
    return _gauss_legendre(torch.cat(pts, -1).sort(dim=-1).values, nodes)


def _gauss_legendre(pts: Tensor, nodes: int) -> tuple[Tensor, Tensor]:
    """`ceil(nodes / 18)` Gauss-Legendre nodes on every interval between sorted `pts`."""
    n = max(2, -(-nodes // INTERVALS_PER_COMPONENT))
    t_list, w_list = legendre(n)
    t = torch.tensor(t_list, dtype=pts.dtype, device=pts.device)
    w = torch.tensor(w_list, dtype=pts.dtype, device=pts.device)
    lo, hi = pts[..., :-1], pts[..., 1:]
    half = 0.5 * (hi - lo)
    x = (0.5 * (hi + lo)).unsqueeze(-1) + half.unsqueeze(-1) * t
    return x.flatten(-2), (half.unsqueeze(-1) * w).flatten(-2)


def component_log_density(x: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """`log N(x; loc_k, scale_k^2)`: `(*batch, N, K)` for `x` of shape `(*batch, N)`."""
    z = (x.unsqueeze(-1) - loc.unsqueeze(-2)) / scale.unsqueeze(-2)
    return -0.5 * z.square() - scale.log().unsqueeze(-2) - HALF_LOG_2PI


def log_densities(
    x: Tensor, mp: GaussianMixture, mq: GaussianMixture
) -> tuple[Tensor, Tensor, Tensor]:
    r"""`(log p(x), log q(x), log p(x) - log q(x))`, each of shape `(*batch, N)`.

    The log-ratio is computed from paired component differences where they are all small:

    $$
    \log\frac{p}{q} = \log \sum_k r_k\, e^{d_k}
    = \operatorname{log1p}\Bigl(\sum_k r_k \operatorname{expm1}(d_k)\Bigr),
    $$

    with $d_k = \log(w_k p_k) - \log(v_k q_k)$ and $r_k = v_k q_k / q$ when both mixtures have
    K components, $d_k = \log p_k - \log q_1$, $r_k = w_k$ when `q` has one, and the mirror
    image when `p` has one. Elsewhere it is `log p - log q`.
    """
    lp_loc, lp_scale = loc_scale(mp)
    lq_loc, lq_scale = loc_scale(mq)
    b = mq.log_weights.unsqueeze(-2) + component_log_density(x, lq_loc, lq_scale)
    a = mp.log_weights.unsqueeze(-2) + component_log_density(x, lp_loc, lp_scale)
    log_p, log_q = a.logsumexp(-1), b.logsumexp(-1)
    naive = log_p - log_q
    kp, kq = mp.num_components, mq.num_components
    if kp != kq and kp != 1 and kq != 1:
        return log_p, log_q, naive
    sign = 1.0
    if kp == kq:
        dw = mp.log_weights - mq.log_weights
        dw = torch.where(mp.log_weights == mq.log_weights, torch.zeros_like(dw), dw)
        d = _paired_difference(x, lp_loc, lp_scale, lq_loc, lq_scale) + dw.unsqueeze(-2)
        log_r = b - log_q.unsqueeze(-1)
    elif kq == 1:
        d = _paired_difference(x, lp_loc, lp_scale, lq_loc, lq_scale)
        log_r = mp.log_weights.unsqueeze(-2).expand_as(d)
    else:  # kp == 1: log(p/q) = -log(sum_j v_j q_j / p)
        d = _paired_difference(x, lq_loc, lq_scale, lp_loc, lp_scale)
        log_r = mq.log_weights.unsqueeze(-2).expand_as(d)
        sign = -1.0
    ok = (d.abs() <= 1.0).all(-1, keepdim=True)
    d_safe = torch.where(ok, d, torch.zeros_like(d))
    paired = sign * torch.log1p((log_r.exp() * torch.expm1(d_safe)).sum(-1))
    return log_p, log_q, torch.where(ok.squeeze(-1), paired, naive)


def _paired_difference(
    x: Tensor, loc1: Tensor, scale1: Tensor, loc2: Tensor, scale2: Tensor
) -> Tensor:
    """`log N(x; loc1_k, scale1_k^2) - log N(x; loc2_k, scale2_k^2)` without cancellation.

    Shapes broadcast over the last (component) dimension: `(*batch, N, K)`. Identical
    parameters give exactly 0.
    """
    z1 = (x.unsqueeze(-1) - loc1.unsqueeze(-2)) / scale1.unsqueeze(-2)
    z2 = (x.unsqueeze(-1) - loc2.unsqueeze(-2)) / scale2.unsqueeze(-2)
    log_scale = torch.where(scale1 == scale2, torch.zeros_like(scale1), scale1.log() - scale2.log())
    return -0.5 * (z1 - z2) * (z1 + z2) - log_scale.unsqueeze(-2)
