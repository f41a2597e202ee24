"""Streaming sample statistics shared by the estimators and the verifier."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["MIN_FIT_UNITS", "RIDGE", "StreamingMoments", "loo_coefficients", "loo_one", "t_stderr"]

#: Fewest units left for a leave-one-out fit of the coefficients (else the naive weights).
MIN_FIT_UNITS = 16
#: Relative ridge on the diagonal of the normal equations (bounds the coefficients of nearly
#: collinear controls; shrinks a coefficient by about this fraction otherwise).
RIDGE = 1e-2


class StreamingMoments:
    """Running mean and sum of squared deviations over dim 0, merged chunk by chunk in float64.

    The pairwise merge of Chan, Golub and LeVeque (1979), "Updating formulae and a pairwise
    algorithm for computing sample variances", so that no chunk's values need be kept.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def add(self, values: Tensor) -> None:
        """Merge the rows of `values` (shape `(m, *shape)`)."""
        v = values.to(torch.float64)
        m = v.shape[0]
        if m == 0:
            return
        mean = v.mean(0)
        m2 = (v - mean).square().sum(0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = m, mean, m2
            return
        n = self.n + m
        delta = mean - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * m / n)
        self.n = n

    def result(self) -> tuple[Tensor, Tensor]:
        """`(mean, standard error of the mean)`; the error is 0 where the mean is infinite."""
        if self.mean is None or self.m2 is None:
            raise ValueError("StreamingMoments.result() called before any values were added.")
        var = self.m2 / max(self.n - 1, 1)
        stderr = torch.sqrt(var / self.n)
        stderr = torch.where(torch.isinf(self.mean), torch.zeros_like(stderr), stderr)
        return self.mean, stderr


def loo_coefficients(units: Tensor, batch_p: torch.Size, pad: tuple[int, ...]) -> Optional[Tensor]:
    r"""Leave-one-draw-out least-squares coefficients `(m, *batch, k)` of target on controls.

    `units` is `(m, *batch, 1 + k)`, `k` 1 or 2: the centred target, then the controls.
    The statistics of output elements sharing one draw of p are summed (they are not
    independent); each draw's coefficients come from all the other draws (a 1x1 or 2x2 normal
    equation, solved in closed form with a small ridge). None when too few draws are left.
    """
    m = units.shape[0]
    if m * max(1, batch_p.numel()) - 1 < MIN_FIT_UNITS:
        return None
    k = units.shape[-1] - 1
    if k == 1:
        return loo_one(units[..., 0], units[..., 1], batch_p, pad)
    # A NaN (or infinite) entry, e.g. from a NaN parameter in one batch element, is left out of
    # the pooled statistics (one op; the value of an entry set to 0 comes from other draws, so
    # the coefficients stay independent of the draw they are used for): it makes its own element
    # NaN, not every element's coefficients.
    units = torch.nan_to_num(units, nan=0.0, posinf=0.0, neginf=0.0)
    outer = (units.unsqueeze(-1) * units[..., 1:].unsqueeze(-2)).sum_to_size(
        m, *pad, *batch_p, k + 1, k
    )  # (m, *pad, *bp, 1 + k, k): rows t, c_1[, c_2] times columns c_1[, c_2]
    loo = outer.sum(tuple(range(outer.dim() - 2))) - outer
    tiny = torch.finfo(units.dtype).tiny
    g11, r1 = loo[..., 1, 0] * (1 + RIDGE), loo[..., 0, 0]
    if k == 1:
        coef = (r1 / g11.clamp_min(tiny)).unsqueeze(-1)
    else:
        # The ridge keeps the determinant >= (2 RIDGE) g11 g22 > 0: nearly collinear controls
        # (the quadratic part of c_2 is c_1 when p is narrow) share a bounded coefficient
        # instead of opposite huge ones, which would blow up c_2's gradient.
        g12, g22, r2 = loo[..., 1, 1], loo[..., 2, 1] * (1 + RIDGE), loo[..., 0, 1]
        det = (g11 * g22 - g12 * g12).clamp_min(tiny)
        coef = torch.stack([g22 * r1 - g12 * r2, g11 * r2 - g12 * r1], -1) / det.unsqueeze(-1)
    return coef.expand(*units.shape[:-1], k)


def loo_one(t: Tensor, c: Tensor, batch_p: torch.Size, pad: tuple[int, ...]) -> Tensor:
    """Leave-one-draw-out least-squares coefficient `(m, *batch, 1)` of target `t` on one control
    `c` (both `(m, *batch)`), in the fewest operations.

    The statistics of elements sharing one draw of p (`c` broadcast along `pad`) are summed;
    each draw's coefficient comes from all the other draws, with a small ridge. A NaN or
    infinite target (a NaN parameter in one batch element) is left out of the pooled sums, so
    it makes its own element NaN, not every element's coefficient. `c` must be finite (the
    controls are functions of the standard noise).
    """
    m = t.shape[0]
    tc = torch.nan_to_num(t * c, nan=0.0, posinf=0.0, neginf=0.0)  # non-finite entries left out
    cc = c * c
    if tc.shape[1:] != (*pad, *batch_p):  # draws of p shared along broadcast dimensions
        tc, cc = tc.sum_to_size(m, *pad, *batch_p), cc.sum_to_size(m, *pad, *batch_p)
    g = (cc.sum() - cc) * (1 + RIDGE)
    coef = (tc.sum() - tc) / g.clamp_min(torch.finfo(g.dtype).tiny)
    return coef.expand(t.shape).unsqueeze(-1)


def t_stderr(per_unit: Tensor, m: int) -> Tensor:
    r"""Standard error of the mean of `m` units, NaN with one unit (no spread to measure).

    The sample standard deviation over $\sqrt{m}$, scaled by $t_{m-1}(0.975) / z(0.975)$ so that
    `value +- 1.96 * stderr` keeps its 95% coverage when there are few units (Student's t
    interval; measured coverage without it: 67% at 2 units, 88% at 16).
    """
    if m < 2:
        return torch.full_like(per_unit[0], math.nan)
    return (per_unit.var(0) / m).sqrt() * (_t975(m - 1) / _t975(math.inf))


def _t975(df: float) -> float:
    """0.975 quantile of Student's t with `df` degrees of freedom (Hill 1970, Algorithm 396)."""
    if df == math.inf:
        return 1.959963984540054
    if df == 1:
        return 12.706204736174705
    if df == 2:
        return 4.302652729749464
    # Cornish-Fisher expansion around the normal quantile: < 0.2% relative for df >= 3.
    z = 1.959963984540054
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4
