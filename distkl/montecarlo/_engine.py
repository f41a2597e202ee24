"""The engine: validate, plan the chunks, draw, assemble the columns, stream, combine.

`run(sampler, integrand, ...)` estimates $\\mathbb{E}_p[f]$ stratified over `p`'s mixture
components: each chunk of rows is assigned to components (`Strata`), drawn
(`Sampler`), scored (the integrand returns `f` and optional extra controls), assembled
into columns `[f, controls...]` and merged into per-stratum moments; `combine` turns the
moments into the estimate.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from distkl._checks import broadcast_shape, check_positive_int
from distkl.montecarlo._estimate import Estimate
from distkl.montecarlo._fit import combine
from distkl.montecarlo._moments import StratumMoments
from distkl.montecarlo._samplers import Draw, Sampler
from distkl.montecarlo._strata import IntervalStrata, allocate

__all__ = [
    "Integrand",
    "MEMORY_BUDGET",
    "check_generator",
    "collapsed_pair_variance",
    "plan_chunks",
    "run",
]

#: Bytes the working set of one chunk may take when `chunk_size` is not given.
MEMORY_BUDGET = 192 * 2**20

#: `integrand(draw, idx, controls)` returns `f` of shape `(c, *batch_out)` and optional
#: extra controls `(c, *batch_out, m)` with zero mean within every stratum (only needed when
#: `controls` is true).
Integrand = Callable[[Draw, Tensor, bool], "tuple[Tensor, Optional[Tensor]]"]


def check_generator(generator: Optional[torch.Generator], device: torch.device) -> None:
    """Raise unless `generator` is `None` or a `torch.Generator` on `device`'s type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}."
        )
    if generator.device.type != device.type:
        raise ValueError(
            f"generator must live on p's device ({device.type}), got a generator on "
            f"{generator.device.type}."
        )


def plan_chunks(
    num_samples: int, chunk_size: Optional[int], row_elements: int, dtype: torch.dtype
) -> list[tuple[int, int]]:
    """Row ranges `[first, last)` of the chunks; their size comes from `MEMORY_BUDGET`
    and the tensor elements one row needs (`row_elements`) unless `chunk_size` is given."""
    if chunk_size is None:
        item = max(torch.finfo(dtype).bits // 8, 4)
        chunk_size = max(64, MEMORY_BUDGET // max(1, row_elements * item))
    step = min(chunk_size, num_samples)
    return [(first, min(num_samples, first + step)) for first in range(0, num_samples, step)]


def _stats_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    return dtype if device.type == "mps" else torch.float64


def _out_shape(f: Tensor, batch_p: torch.Size, draw: Draw) -> torch.Size:
    try:
        out = broadcast_shape(f.shape[1:], batch_p)
        f.expand(f.shape[0], *out)
    except RuntimeError:
        raise ValueError(
            f"f must return shape (n, *batch) broadcastable with p's batch shape "
            f"{tuple(batch_p)}, got {tuple(f.shape)} for x of shape {tuple(draw.x.shape)}."
        ) from None
    return out


def _columns(
    f: Tensor,
    draw: Draw,
    extra: Optional[Tensor],
    batch_p: torch.Size,
    out_shape: torch.Size,
    dtype: torch.dtype,
) -> Tensor:
    """`[f, controls...]` as `(c, G, v)` in `dtype`.

    Columns in order of priority (small strata fit only a prefix, see `_fit`): the first
    control of p, the first extra control, then the rest of each.
    """
    c, g = f.shape[0], out_shape.numel()
    # Per-row tensors of p's batch (c, *bp), left-padded to line up with out_shape.
    lead = (c,) + (1,) * (len(out_shape) - len(batch_p))
    own: list[Tensor] = []
    more: list[Tensor] = []
    if draw.self_control is not None:
        m = draw.self_control.shape[-1]
        ctrl = draw.self_control.reshape(*lead, *batch_p, m).expand(c, *out_shape, m)
        own = list(ctrl.unbind(-1))
    if extra is not None:
        more = list(extra.expand(c, *out_shape, extra.shape[-1]).unbind(-1))
    cols = [f, *own[:1], *more[:1], *own[1:], *more[1:]]
    if len(cols) == 1:
        return f.to(dtype).reshape(c, g, 1)
    return torch.stack([col.to(dtype) for col in cols], dim=-1).reshape(c, g, len(cols))


def add_score_term(z: Tensor, lp: Tensor, s: Tensor, ns: int) -> Tensor:
    """Score-function gradient term with a leave-one-out baseline; its value is exactly 0.

    `z` (c, G, v) columns, `lp` (c, G) `log p_k(x)` of each row, `s` (c, G) the rows'
    strata out of `ns`; the baseline of a row is the mean of `f` over the other rows of its
    stratum in the chunk (independent of the row, so the gradient stays unbiased).
    """
    if not (torch.is_grad_enabled() and lp.requires_grad):
        return z
    f = z[..., 0].detach()
    g = f.shape[1]
    total = torch.zeros(ns, g, dtype=f.dtype, device=f.device).scatter_add_(0, s, f)
    cnt = torch.zeros(ns, g, dtype=f.dtype, device=f.device).scatter_add_(0, s, torch.ones_like(f))
    n_s = cnt.gather(0, s)
    others = (total.gather(0, s) - f) / (n_s - 1).clamp_min(1)
    baseline = torch.where(n_s > 1, others, torch.zeros_like(f))
    lp = lp.to(z.dtype)
    term = (f - baseline) * (lp - lp.detach())
    return torch.cat([(z[..., 0] + term).unsqueeze(-1), z[..., 1:]], dim=-1)


class _Stream:
    """The running state of one estimate: moments, output shape, +inf elements."""

    def __init__(self, sampler: Sampler, out_batch: Optional[torch.Size], folded: bool) -> None:
        self.sampler = sampler
        self.out_shape = out_batch
        #: Two folds per component (strata `2k`, `2k+1`) when the controls are fitted,
        #: else one stratum per component.
        self.num_strata = (2 if folded else 1) * sampler.num_components
        self.mom: Optional[StratumMoments] = None
        self.inf_mask: Optional[Tensor] = None
        self.dtype = _stats_dtype(sampler.dtype, sampler.device)

    def add(self, draw: Draw, f: Tensor, extra: Optional[Tensor], strata: Tensor) -> None:
        """Merge one chunk: `f` (c, *batch_out), `strata` (c, bf) each row's stratum."""
        bp = self.sampler.batch_shape
        if self.out_shape is None:
            self.out_shape = _out_shape(f, bp, draw)
        out_shape = self.out_shape
        c, g = f.shape[0], out_shape.numel()
        f = f.expand(c, *out_shape)
        z = _columns(f, draw, extra, bp, out_shape, self.dtype)
        lead = (c,) + (1,) * (len(out_shape) - len(bp))
        s = strata.reshape(*lead, *bp).expand(c, *out_shape).reshape(c, g)
        # +inf integrands (q = 0 where p > 0): the expectation is +inf. Eager runs skip the
        # masking when no row is +inf; a compiled graph cannot branch on it and always masks.
        pos_inf = z[..., 0] == math.inf
        if torch.compiler.is_compiling() or bool(pos_inf.any()):
            hit = pos_inf.any(0)
            self.inf_mask = hit if self.inf_mask is None else self.inf_mask | hit
            z = torch.where(pos_inf.unsqueeze(-1), torch.zeros_like(z), z)
        ns = self.num_strata
        if draw.score_log_prob is not None:
            lp = draw.score_log_prob.reshape(*lead, *bp).expand(c, *out_shape).reshape(c, g)
            z = add_score_term(z, lp, s, ns)
        if self.mom is None:
            self.mom = StratumMoments(ns, g, z.shape[-1], self.dtype, self.sampler.device)
        self.mom.update(s, z)

    def result(
        self, use_controls: bool, num_samples: int, value_range: Optional[tuple[float, float]]
    ) -> Estimate:
        assert self.mom is not None and self.out_shape is not None
        sampler, out_shape = self.sampler, self.out_shape
        k = sampler.num_components
        log_w = sampler.log_weights.expand(*out_shape, k).reshape(-1, k).T.to(self.dtype)
        value, var = combine(self.mom, log_w, use_controls, value_range)
        value = value.reshape(out_shape).to(sampler.dtype)
        stderr = var.sqrt().reshape(out_shape).to(sampler.dtype)
        if self.inf_mask is not None:
            inf_mask = self.inf_mask.reshape(out_shape)
            value = torch.where(inf_mask, torch.full_like(value, math.inf), value)
            stderr = torch.where(inf_mask, torch.zeros_like(stderr), stderr)
        return Estimate(value, stderr.detach(), num_samples)


class _RowStream:
    r"""Rows kept one by one (fewer than two per component, `IntervalStrata`).

    The estimate is the row mean of $f(x_i)\, w_{k_i} / \operatorname{sg}(w_{k_i})$; its
    variance is estimated by collapsing the interval strata in adjacent pairs (a triple when
    `N` is odd): $\hat V = \frac{1}{N^2} \sum_g \frac{m_g}{m_g - 1} \sum_{i \in g}
    (y_i - \bar y_g)^2$, which overstates the variance by the spread of the pair's stratum
    means (conservative, never understated). With `N = 1` nothing estimates the variance: the
    standard error is NaN.
    """

    def __init__(self, sampler: Sampler, out_batch: Optional[torch.Size]) -> None:
        self.sampler = sampler
        self.out_shape = out_batch
        self.rows: list[Tensor] = []
        self.dtype = _stats_dtype(sampler.dtype, sampler.device)

    def add(self, draw: Draw, f: Tensor, extra: Optional[Tensor], idx: Tensor) -> None:
        """Keep one chunk's rows: `f` (c, *batch_out), `idx` (c, bf) their components."""
        bp, k = self.sampler.batch_shape, self.sampler.num_components
        if self.out_shape is None:
            self.out_shape = _out_shape(f, bp, draw)
        out_shape = self.out_shape
        c, g = f.shape[0], out_shape.numel()
        lead = (c,) + (1,) * (len(out_shape) - len(bp))
        lw = self.sampler.log_weights.reshape(-1, k).T.gather(0, idx)  # (c, bf)
        ratio = (lw - lw.detach()).exp().reshape(*lead, *bp).expand(c, *out_shape)
        y = (f.expand(c, *out_shape).to(self.dtype) * ratio.to(self.dtype)).reshape(c, g, 1)
        if draw.score_log_prob is not None:
            lp = draw.score_log_prob.reshape(*lead, *bp).expand(c, *out_shape).reshape(c, g)
            y = add_score_term(y, lp, torch.zeros_like(lp, dtype=torch.long), 1)
        self.rows.append(y[..., 0])

    def result(
        self, use_controls: bool, num_samples: int, value_range: Optional[tuple[float, float]]
    ) -> Estimate:
        assert self.out_shape is not None
        y = self.rows[0] if len(self.rows) == 1 else torch.cat(self.rows)  # (N, G), in order
        inf = y == math.inf
        pos_inf = inf.any(0)
        y = torch.where(inf, torch.zeros_like(y), y)
        value = y.mean(0)
        var = collapsed_pair_variance(y.detach())
        out, dt = self.out_shape, self.sampler.dtype
        value = torch.where(pos_inf, math.inf, value).reshape(out).to(dt)
        stderr = torch.where(pos_inf, 0.0, var.sqrt()).reshape(out).to(dt)
        return Estimate(value, stderr.detach(), num_samples)


def collapsed_pair_variance(y: Tensor) -> Tensor:
    r"""Variance of the mean of the rows `y` (N, G), one row per interval stratum, in order.

    The strata are collapsed in adjacent pairs (a triple at the end when `N` is odd):
    $\hat V = \frac{1}{N^2} \sum_g \frac{m_g}{m_g - 1} \sum_{i \in g} (y_i - \bar y_g)^2$,
    which is $(y_a - y_b)^2$ for a pair. NaN for `N = 1`.

    Source: Cochran (1977), "Sampling Techniques", 3rd ed., sec. 5A.12.
    """
    n = y.shape[0]
    if n == 1:
        return torch.full_like(y[0], math.nan)
    paired = n - 3 if n % 2 else n  # rows in pairs
    ss = (y[0:paired:2] - y[1:paired:2]).square().sum(0)
    if n % 2:
        last = y[paired:]
        ss = ss + 1.5 * (last - last.mean(0)).square().sum(0)
    return ss / n**2


def _shape_only(
    sampler: Sampler,
    integrand: Integrand,
    out_batch: Optional[torch.Size],
    num_samples: int,
    generator: Optional[torch.Generator],
) -> Estimate:
    """An empty batch (no element to estimate) or meta tensors (no values at all): the result's
    shape, dtype and device from one probe row, as torch's own functions return for them."""
    idx = torch.zeros((1, sampler.batch_shape.numel()), dtype=torch.long, device=sampler.device)
    draw = sampler.draw(idx, lambda k: (0, 1), generator, False)
    f, _ = integrand(draw, idx, False)
    out = _out_shape(f, sampler.batch_shape, draw) if out_batch is None else out_batch
    value = f.new_zeros(out, dtype=sampler.dtype)
    return Estimate(value, value.detach().clone(), num_samples)


def run(
    sampler: Sampler,
    integrand: Integrand,
    *,
    num_samples: int,
    generator: Optional[torch.Generator],
    chunk_size: Optional[int],
    use_controls: bool,
    out_batch: Optional[torch.Size],
    row_elements: int,
    value_range: Optional[tuple[float, float]] = None,
) -> Estimate:
    """Stratified, chunked estimate of `E_p[f]` (see the module docstring).

    Args:
        sampler: draws from `p`'s components.
        integrand: `f` and the extra controls of a chunk (see `Integrand`).
        num_samples: rows per batch element.
        generator: the user's generator, or `None` for the global one of `p`'s device.
        chunk_size: rows per chunk (default: from `MEMORY_BUDGET` and `row_elements`).
        use_controls: fit control variates where a stratum is large enough.
        out_batch: the output batch shape, or `None` to take it from the first `f`.
        row_elements: tensor elements one row needs, for the chunk size.
        value_range: bounds of `f` if known (see `_fit._unseen`).
    """
    check_positive_int("num_samples", num_samples)
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)
    check_generator(generator, sampler.device)
    if sampler.batch_shape.numel() == 0 or sampler.device.type == "meta":
        return _shape_only(sampler, integrand, out_batch, num_samples, generator)
    strata = allocate(sampler.log_weights, num_samples, sampler.single, generator)
    use_controls = use_controls and strata.can_fit_controls()
    stream: _Stream | _RowStream = (
        _RowStream(sampler, out_batch)
        if isinstance(strata, IntervalStrata)
        else _Stream(sampler, out_batch, folded=use_controls)
    )
    for first, last in plan_chunks(num_samples, chunk_size, row_elements, sampler.dtype):
        idx, fold = strata.assign(first, last, folds=use_controls)  # (c, bf)
        draw = sampler.draw(idx, strata.row_span(first, last), generator, use_controls)
        f, extra = integrand(draw, idx, use_controls)
        if isinstance(stream, _RowStream) or fold is None:  # one stratum per component
            stream.add(draw, f, None, idx)
        else:
            stream.add(draw, f, extra, 2 * idx + fold)
    return stream.result(use_controls, num_samples, value_range)
