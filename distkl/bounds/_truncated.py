"""Truncated normal statistics: interval masses in log space and the moments of a Gaussian
restricted to a slab."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distkl._gaussian import (
    LOG_2PI,
)

_HALF_LOG_2PI = 0.5 * LOG_2PI


# ---- truncated normal statistics -----------------------------------------------------------------


def log_interval_mass(lo: Tensor, hi: Tensor) -> Tensor:
    r"""`log(Phi(hi) - Phi(lo))` for standardised `lo <= hi` (infinite ends allowed).

    Accurate in both tails (mirror image when both ends are positive, `log_ndtr` for the
    rest); `-inf` for an empty interval. Every branch sees finite inputs, so gradients are
    finite.
    """
    lo_inf, hi_inf = lo == -math.inf, hi == math.inf
    lo0 = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
    hi0 = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    empty = ~lo_inf & ~hi_inf & (hi0 <= lo0)
    hi1 = torch.where(empty, lo0 + 1.0, hi0)
    flip = lo0 > 0  # both in the upper tail: use the mirror image
    a = torch.where(flip, -hi1, lo0)
    b = torch.where(flip, -lo0, hi1)
    # b > a and a <= 0: mass = Phi(b) - Phi(a)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    diff = (log_a - log_b).clamp(max=-1e-300)
    finite_both = log_b + torch.log(-torch.expm1(diff))
    upper_tail = torch.special.log_ndtr(-lo0)  # hi = +inf
    lower_tail = torch.special.log_ndtr(hi0)  # lo = -inf
    out = torch.where(hi_inf, upper_tail, torch.where(lo_inf, lower_tail, finite_both))
    out = torch.where(lo_inf & hi_inf, torch.zeros_like(out), out)
    return torch.where(empty, torch.full_like(out, -math.inf), out)


def standardize(edge: Tensor, centre: Tensor, sd: Tensor) -> Tensor:
    """`(edge - centre) / sd` keeping infinite edges infinite (and their gradients finite)."""
    finite = torch.isfinite(edge)
    z = (torch.where(finite, edge, torch.zeros_like(edge)) - centre) / sd
    return torch.where(finite, z, edge.expand_as(z))


def truncated_normal(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""Standard normal truncated to `[lo, hi]` (infinite ends allowed).

    Returns `(log Z, M1, M2)`: the log-mass and the first two raw moments,
    $M_1 = (\varphi(lo) - \varphi(hi))/Z$,
    $M_2 = 1 + (lo\,\varphi(lo) - hi\,\varphi(hi))/Z$. Where `Z` underflows the moments
    are set to 0 (such cells carry no weight).
    """
    log_z = log_interval_mass(lo, hi)
    fin = torch.isfinite(log_z)
    safe_z = torch.where(fin, log_z, torch.zeros_like(log_z))

    def ratio(x: Tensor) -> tuple[Tensor, Tensor]:
        finite = torch.isfinite(x)
        keep = finite & fin
        x0 = torch.where(finite, x, torch.zeros_like(x))
        # Masked before exp: an overflowing masked entry would give 0 * inf = NaN gradients.
        log_r = torch.where(keep, -0.5 * x0.square() - _HALF_LOG_2PI - safe_z, -math.inf)
        r = torch.exp(log_r)
        return r, x0 * r

    r_lo, xr_lo = ratio(lo)
    r_hi, xr_hi = ratio(hi)
    m1 = r_lo - r_hi
    m2 = torch.where(fin, 1.0 + xr_lo - xr_hi, torch.zeros_like(m1))
    return log_z, m1, m2


def truncate(
    loc: Tensor, root: Tensor, u: Tensor, lo: Tensor, hi: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    r"""A Gaussian $\mathcal N(\mu, RR^\top)$ restricted to the slab `lo <= u'x <= hi`.

    Shapes: `loc (*, D)`, `root (*, D, D)`, `u (*, D)` (unit), `lo, hi (*)`. Returns
    `(log mass, mean, covariance)` of the restriction (normalised).
    """
    su = (root @ (root.transpose(-1, -2) @ u.unsqueeze(-1))).squeeze(-1)  # S u
    sd = (su * u).sum(-1).clamp(min=0.0).sqrt()
    centre = (loc * u).sum(-1)
    log_z, m1, m2 = truncated_normal(standardize(lo, centre, sd), standardize(hi, centre, sd))
    v = su / sd.unsqueeze(-1)
    mean = loc + v * m1.unsqueeze(-1)
    extra = (m2 - m1.square() - 1.0)[..., None, None] * (v.unsqueeze(-1) * v.unsqueeze(-2))
    cov = root @ root.transpose(-1, -2) + extra
    return log_z, mean, cov
