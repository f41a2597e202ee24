r"""`torch.nn.Module` losses on distribution objects: [`JSDLoss`][distkl.JSDLoss] and
[`KLLoss`][distkl.KLLoss].

Both are called as `loss(p, q)` with two `Distribution` objects and
compute one divergence per batch element (`broadcast_shapes(p.batch_shape, q.batch_shape)`),
then reduce it. `reduction` means what it says:

=============== ==================================================================
`"none"`      the per-element divergences, shape `broadcast_shapes(...)`
`"sum"`       their sum
`"mean"`      their mean over all batch elements
`"batchmean"` their sum divided by the size of the first batch dimension
                (1 for a scalar batch): the mean over dim 0 of per-row totals
=============== ==================================================================

The event dimensions are always summed inside the divergence, so `"mean"` never divides by the
number of categories. That is the `torch.nn.functional.kl_div` pitfall: on `(B, K)`
tensors its `reduction="mean"` divides the total by `B * K` (and warns), giving `KL / K`;
only its `"batchmean"` is the mean KL. Here, with batch shape `(B,)`, `"mean"` and
`"batchmean"` agree; with `(B, T)` (e.g. a sequence), `"mean"` divides by `B * T` and
`"batchmean"` by `B`.

Argument order: `KLLoss()(p, q)` is `KL(p || q)`, in torch.distributions' order, unlike
`nn.KLDivLoss()(input, target)`, which takes `input = log q` first and computes
`KL(target || input)`.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.distributions import Distribution, kl_divergence

from distkl._checks import check_choice, check_finite, check_skew
from distkl.bounded import SATURATIONS, bounded_kl, js_divergence_normalized
from distkl.functional import REDUCTIONS, apply_reduction
from distkl.registry import js_divergence

__all__ = ["JSDLoss", "KLLoss", "REDUCTIONS"]


class JSDLoss(nn.Module):
    r"""Jensen-Shannon loss JS_alpha(p, q) in nats (or in [0, 1] with `normalized=True`).

    $$
    \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m),
    \quad m = \alpha p + (1-\alpha) q, \qquad 0 \le \mathrm{JS}_\alpha \le H(\alpha)
    $$

    Bounded by construction (`log 2` at `skew=0.5`), no squashing needed. Uses
    [`distkl.js_divergence`][distkl.js_divergence]: exact for categorical families, an estimate by
    the method in force ([`distkl.options`][distkl.options]) for Gaussian ones.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1).

    Args:
        skew: `alpha` in (0, 1), the weight of `p` in `m`.
        reduction: `"none"`, `"sum"`, `"mean"` (default) or `"batchmean"`; see
            `distkl.losses`.
        normalized: divide by $H(\alpha)$ (bits at `skew=0.5`), giving values in [0, 1].

    Shape:
        `forward(p, q)` returns `broadcast_shapes(p.batch_shape, q.batch_shape)` for
        `"none"`, a scalar otherwise.
    """

    def __init__(
        self, *, skew: float = 0.5, reduction: str = "mean", normalized: bool = False
    ) -> None:
        super().__init__()
        self.skew = check_skew(skew)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.normalized = bool(normalized)

    def forward(self, p: Distribution, q: Distribution) -> Tensor:
        if self.normalized:
            values = js_divergence_normalized(p, q, skew=self.skew)
        else:
            values = js_divergence(p, q, skew=self.skew)
        return apply_reduction(values, self.reduction)

    def extra_repr(self) -> str:
        return f"skew={self.skew}, reduction={self.reduction!r}, normalized={self.normalized}"


class KLLoss(nn.Module):
    r"""KL(p || q) loss in nats, optionally saturated into [0, bound).

    $$
    \mathrm{KL}(p \| q) = \mathbb{E}_{x \sim p}[\log p(x) - \log q(x)]
    $$

    `KLLoss()(p, q)` is `torch.distributions.kl_divergence(p, q)` (distkl's rules
    included), reduced. With `bound` it is [`distkl.bounded.bounded_kl`][distkl.bounded_kl] instead
    (0 at `p = q`, increasing, below `bound`; gradients vanish far away).

    Args:
        reduction: `"none"`, `"sum"`, `"mean"` (default) or `"batchmean"`; see
            `distkl.losses`.
        bound: if given, saturate each KL into `[0, bound)`.
        saturation: `"tanh"` (default), `"sigmoid"` or `"entropy"`, used with `bound`.

    Shape:
        `forward(p, q)` returns `broadcast_shapes(p.batch_shape, q.batch_shape)` for
        `"none"`, a scalar otherwise.
    """

    def __init__(
        self, *, reduction: str = "mean", bound: Optional[float] = None, saturation: str = "tanh"
    ) -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        if bound is not None:
            bound = check_finite("bound", bound, minimum=0.0, strict=True)
        self.bound = bound
        self.saturation = check_choice("saturation", saturation, SATURATIONS)

    def forward(self, p: Distribution, q: Distribution) -> Tensor:
        if self.bound is None:
            values = kl_divergence(p, q)
        else:
            values = bounded_kl(p, q, bound=self.bound, saturation=self.saturation)
        return apply_reduction(values, self.reduction)

    def extra_repr(self) -> str:
        if self.bound is None:
            return f"reduction={self.reduction!r}"
        return f"reduction={self.reduction!r}, bound={self.bound}, saturation={self.saturation!r}"
