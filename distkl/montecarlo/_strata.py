"""Allocation of the samples to mixture components (the strata), per batch element."""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor

from distkl._gaussian import allocation_log_weights

__all__ = ["Strata", "IntervalStrata", "allocate", "MIN_FOLD_FOR_CONTROLS", "MIN_FOLD_PER_CONTROL"]

#: A stratum's controls are fitted only when each of its two folds has at least
#: `MIN_FOLD_FOR_CONTROLS` samples, and then only as many controls (in order of priority) as
#: the fold has multiples of `MIN_FOLD_PER_CONTROL` samples. The residual of a
#: good fit is skewed (the overlap of mixture components leaves softplus-shaped tails), and below
#: about a hundred samples per fold its 95% intervals cover only 80-89% (measured with
#: `benchmarks/bench_mc_variance.py`); the plain stratified mean covers 94%.
MIN_FOLD_FOR_CONTROLS = 128
MIN_FOLD_PER_CONTROL = 16
#: Fewest samples a positive-weight stratum gets when the budget allows (at most 1/16 of the
#: samples go to such floors): with 64 normal samples a stratum's 95% interval covers 94.5%.
MIN_PER_STRATUM = 64


class Strata:
    """Proportional allocation of `N` samples to components, per batch element of `p`.

    Component `k` of batch element `b` owns the sample rows `[start[b, k], end[b, k])`;
    inside a stratum, rows alternate between fold 0 and fold 1. Every shape comes from Python
    ints (`N`, the number of components `K`, the batch size) and nothing is read back from the
    weights' values, so the allocation traces under `torch.compile(fullgraph=True)`; the two
    optional reads (`can_fit_controls`, `row_range`) only skip work, and are skipped when
    compiling.
    """

    few = False

    def __init__(self, log_weights: Tensor, num_samples: int, single: bool = False) -> None:
        k = log_weights.shape[-1]
        self.single = single
        self.num_samples = num_samples
        self._ranges: Optional[tuple[list[int], list[int]]] = None
        if single:
            # One component of weight exactly 1 (log-weight 0): all N rows, no arithmetic needed.
            bf = log_weights.numel()
            self.counts = torch.full(
                (bf, 1), num_samples, dtype=torch.long, device=log_weights.device
            )
            self.end = self.counts
            self.start = torch.zeros_like(self.counts)
            self._ranges = ([0], [num_samples])
            return
        if num_samples < 2 * k:
            raise ValueError(
                f"num_samples must be at least 2 per mixture component ({2 * k} for "
                f"{k} components), got {num_samples}."
            )
        w = log_weights.detach().reshape(-1, k).to(torch.float64).exp()
        # A NaN weight makes the whole row NaN: allocate it as uniform (valid rows), the NaN
        # reaches the estimate through the weights in `_fit.combine`.
        w = (w / w.sum(-1, keepdim=True)).nan_to_num(1.0 / k)
        positive = w > 0
        # Proportional allocation with a floor: a tiny-weight stratum whose f varies a lot
        # dominates the variance, and a variance from 2 samples (1 degree of freedom) makes
        # 95% intervals cover about 70% (issue 11.5). A zero weight gets no rows.
        m_min = min(MIN_PER_STRATUM, max(2, num_samples // (16 * k)))
        small = positive & (w * num_samples < m_min)
        base = torch.where(small, m_min, 2 * positive.long())
        rest = num_samples - base.sum(-1, keepdim=True)
        large = torch.where(small, torch.zeros_like(w), w)
        share = large / large.sum(-1, keepdim=True) * rest
        floor = share.floor()
        left = rest - floor.long().sum(-1, keepdim=True)
        order = torch.argsort(torch.argsort(share - floor, dim=-1, descending=True), dim=-1)
        self.counts = base + floor.long() + (order < left).long()  # (bf, K)
        self.end = self.counts.cumsum(-1)
        self.start = self.end - self.counts

    def assign(self, first: int, last: int, folds: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """Component `(c, bf)` and fold `(c, bf)` (None unless `folds`) of rows
        `first..last-1`."""
        bf = self.end.shape[0]
        device = self.end.device
        if self.single and not folds:
            return torch.zeros((last - first, bf), dtype=torch.long, device=device), None
        rows = torch.arange(first, last, device=device)
        if self.single:  # component 0 from row 0: the fold is the row's parity
            fold = (rows % 2).unsqueeze(-1).expand(last - first, bf).contiguous()
            return torch.zeros_like(fold), fold
        idx = torch.searchsorted(self.end, rows.expand(bf, -1).contiguous(), right=True).T
        if not folds:
            return idx.contiguous(), None
        fold = (rows.unsqueeze(-1) - self.start.T.gather(0, idx)) % 2  # (c, bf)
        return idx.contiguous(), fold

    def can_fit_controls(self) -> bool:
        """Whether some stratum may have both folds of `MIN_FOLD_FOR_CONTROLS` rows (`_fit`).

        When none has, `_fit.combine` returns the plain stratified mean and variance whatever
        the control columns hold (the moments of `f` do not depend on them), so the engine
        skips building, streaming and fitting the controls: the same value and standard error
        for less work. Under `torch.compile` the counts are not read back (a data-dependent
        branch): the bound from `N` alone decides, and `_fit` ignores the controls of the
        strata that are too small (the same value again).
        """
        if self.num_samples // 2 < MIN_FOLD_FOR_CONTROLS:
            return False
        if self.single or torch.compiler.is_compiling():
            return True
        return int(self.counts.max()) // 2 >= MIN_FOLD_FOR_CONTROLS

    def row_range(self, k: int, first: int, last: int) -> tuple[int, int]:
        """Rows in `[first, last)` where component `k` may be drawn for some batch element
        (all of them under `torch.compile`, which cannot read the allocation back)."""
        if torch.compiler.is_compiling():
            return first, last
        if self._ranges is None:  # read back once, on first use (full-covariance draws)
            self._ranges = (self.start.amin(0).tolist(), self.end.amax(0).tolist())
        start_min, end_max = self._ranges
        return max(first, int(start_min[k])), min(last, int(end_max[k]))

    def row_span(self, first: int, last: int) -> Callable[[int], tuple[int, int]]:
        """`k -> [lo, hi)`: the rows of chunk `[first, last)` (chunk-relative) that may hold
        component `k`."""

        def span(k: int) -> tuple[int, int]:
            lo, hi = self.row_range(k, first, last)
            return lo - first, hi - first

        return span


class IntervalStrata:
    r"""Fewer than two samples per component: stratify the weights' CDF as far as `N` allows.

    Row `i` of batch element `b` draws its component at $u_i = (i + U_i) / N$,
    $U_i \sim \mathcal{U}(0, 1)$ independent: the component whose interval of the cumulative
    weights holds $u_i$. Each row is its own stratum (an interval of width $1/N$); component
    `k` is drawn $N w_k$ times in expectation, so $\frac1N \sum_i f(x_i)$ is unbiased for
    $\sum_k w_k \mathbb{E}_{p_k}[f]$. The weights enter through the ratio
    $w_{k_i} / \operatorname{sg}(w_{k_i})$ (value 1), which keeps their gradient unbiased.

    Source: stratified sampling of the inverse CDF, Owen (2013), "Monte Carlo theory, methods and
    examples", ch. 10.1; the collapsed-strata variance estimator (see `_engine`): Cochran
    (1977), "Sampling Techniques", 3rd ed., sec. 5A.12.
    """

    few = True
    single = False

    def __init__(
        self, log_weights: Tensor, num_samples: int, generator: Optional[torch.Generator]
    ) -> None:
        k = log_weights.shape[-1]
        device = log_weights.device
        hi = torch.float32 if device.type == "mps" else torch.float64
        w = log_weights.detach().reshape(-1, k).to(hi).exp()
        bf = w.shape[0]
        cum = w.cumsum(-1)
        cum = cum / cum[:, -1:]
        u = torch.rand((bf, num_samples), generator=generator, dtype=hi, device=device)
        # u < 1 even after rounding: the normalised CDF reaches exactly 1 at the last positive
        # weight, so a zero-weight tail component is never picked.
        below_one = 1.0 - torch.finfo(hi).eps / 2
        u = ((torch.arange(num_samples, dtype=hi, device=device) + u) / num_samples).clamp_max(
            below_one
        )
        idx = torch.searchsorted(cum, u, right=True)
        # A NaN weight (NaN CDF) may give any index: keep it in range (the estimate is NaN).
        self.idx = idx.clamp_max(k - 1).T  # (N, bf)

    def assign(self, first: int, last: int, folds: bool = True) -> tuple[Tensor, Optional[Tensor]]:
        """Component `(c, bf)` of rows `first..last-1` (and fold 0 if `folds`: rows are not
        folded)."""
        idx = self.idx[first:last]
        return idx, torch.zeros_like(idx) if folds else None

    def can_fit_controls(self) -> bool:
        return False

    def row_span(self, first: int, last: int) -> Callable[[int], tuple[int, int]]:
        return lambda k: (0, last - first)


def allocate(
    log_weights: Tensor, num_samples: int, single: bool, generator: Optional[torch.Generator]
) -> Union[Strata, IntervalStrata]:
    """Proportional allocation when every component can get two samples (`N >= 2 K`),
    interval stratification (`IntervalStrata`) otherwise. The choice depends on the shapes
    only, never on the weights' values (a zero weight still counts), so it is static under
    `torch.compile`."""
    if single:
        return Strata(log_weights, num_samples, single=True)
    log_weights = allocation_log_weights(log_weights)  # a NaN row: planned as one component
    if num_samples < 2 * log_weights.shape[-1]:
        return IntervalStrata(log_weights, num_samples, generator)
    return Strata(log_weights, num_samples)
