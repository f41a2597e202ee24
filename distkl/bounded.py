r"""Bounded divergences on distribution objects, for use as losses.

The Jensen-Shannon divergence is already bounded, with no squashing: $0 \le
\mathrm{JS}_\alpha(p, q) \le H(\alpha)$ ($\log 2$ at the default `skew=0.5`, reached
exactly for disjoint supports). This module adds

* [`js_divergence_normalized`][distkl.js_divergence_normalized] --
  $\mathrm{JS}_\alpha / H(\alpha) \in [0, 1]$; at `skew=0.5` this is the JSD in bits (base-2
  logarithm);
* [`js_distance`][distkl.js_distance] -- $\sqrt{\mathrm{JS}_\alpha}$, a metric at `skew=0.5`, with a
  finite gradient at `p = q`;
* [`bounded_kl`][distkl.bounded_kl] / [`saturate`][distkl.bounded.saturate] -- a KL squashed into
  `[0, bound)` for those who want the pattern of popular posts, done so that it is 0 at `p = q`,
  increasing, never above `bound` and free of NaN gradients.

What squashing costs. A saturating $f$ has $f'(\mathrm{KL}) \to 0$ as the KL grows:
far from the target the loss stops pulling (`tanh`: $f' = \operatorname{sech}^2
(\mathrm{KL}/b) \approx 4 e^{-2\mathrm{KL}/b}$, about `2e-4` at `KL = 5 b`). And $f$
is concave on $[0, \infty)$, so squashing a noisy unbiased estimate
$\widehat{\mathrm{KL}}$ is biased low: $\mathbb{E}[f(\widehat{\mathrm{KL}})] \le
f(\mathrm{KL})$ (Jensen's inequality), gradients included. If a bounded, symmetric
discrepancy is what is needed, the JSD is one without either cost at the source.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.distributions import Distribution, kl_divergence

from distkl._categorical import is_categorical_family, kl_categorical_mixture_pair
from distkl._checks import check_choice, check_finite, check_skew
from distkl._logspace import binary_entropy
from distkl.registry import js_divergence

__all__ = [
    "SATURATIONS",
    "js_divergence_normalized",
    "js_distance",
    "bounded_kl",
    "saturate",
]

#: Valid values of `saturation`.
SATURATIONS = ("tanh", "sigmoid", "entropy")


def js_divergence_normalized(p: Distribution, q: Distribution, *, skew: float = 0.5) -> Tensor:
    r"""Normalised Jensen-Shannon divergence JS_alpha(p, q) / H(alpha), unitless, in [0, 1].

    $$
    \frac{\mathrm{JS}_\alpha(p, q)}{H(\alpha)}, \qquad
    H(\alpha) = -\alpha\log\alpha - (1-\alpha)\log(1-\alpha)
    $$

    1 exactly for disjoint supports, 0 for `p = q`. At `skew=0.5`, $H = \log 2$ and this
    is the JSD in bits, `scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2`.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1), Theorem 4 (the bound).

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    alpha = check_skew(skew)
    js = js_divergence(p, q, skew=alpha)
    return (js / binary_entropy(alpha)).clamp(0.0, 1.0)


def _safe_sqrt(x: Tensor) -> Tensor:
    """`sqrt(x)` with gradient 0 (not inf or NaN) at `x = 0`; NaN stays NaN."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).sqrt(), torch.where(x.isnan(), x, 0.0))


def js_distance(
    p: Distribution, q: Distribution, *, skew: float = 0.5, normalized: bool = False
) -> Tensor:
    r"""Jensen-Shannon distance sqrt(JS_alpha(p, q)), in sqrt(nats) (or unitless if normalized).

    $$
    d_\alpha(p, q) = \sqrt{\mathrm{JS}_\alpha(p, q)}
    \quad\text{or, with } \texttt{normalized=True},\quad
    \sqrt{\mathrm{JS}_\alpha(p, q) / H(\alpha)} \in [0, 1]
    $$

    At `skew=0.5` this is a metric (triangle inequality; Endres & Schindelin 2003), equal to
    `scipy.spatial.distance.jensenshannon(p, q)` (`base=2` with `normalized=True`). The
    square root has an infinite slope at 0; here the gradient at `p = q` is 0 (a valid
    subgradient: the distance has a minimum there), never inf or NaN.

    Source: Endres & Schindelin (2003), "A new metric for probability distributions", IEEE
    Trans. Inf. Theory 49(7).

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    if normalized:
        return _safe_sqrt(js_divergence_normalized(p, q, skew=skew))
    return _safe_sqrt(js_divergence(p, q, skew=skew))


def saturate(
    kl: Tensor,
    *,
    bound: float,
    saturation: str = "tanh",
    entropy: Optional[Tensor] = None,
) -> Tensor:
    r"""Squash KL values (or estimates) `kl`, in nats, into `[0, bound)`: 0 at 0, increasing.

    With $b$ = `bound`:

    * `"tanh"`: $b \tanh(\mathrm{KL}/b)$; slope 1 at 0.
    * `"sigmoid"`: $b\,(2\sigma(\mathrm{KL}/b) - 1) = b \tanh(\mathrm{KL}/(2b))$; slope
      1/2 at 0. The popular $b\,\sigma(\mathrm{KL}/b)$ is $b/2$, not 0, at
      `p = q`; recentred, the sigmoid is `tanh` at twice the scale.
    * `"entropy"`: $b\,(1 - e^{-\mathrm{KL}/s})$ with the entropy-adaptive scale
      $s = b\,(1 + e^{-\max(H, 0)}) \in (b, 2b]$, $H$ = `entropy` (of `p`). A
      peaked `p` ($H \to 0$) gets $s = 2b$ and saturates half as fast; a broad one
      $s \to b$ (slope 1 at 0). `s` is detached: the gradient moves the KL only.

    Each is 0 at `KL = 0`, strictly increasing, below `bound` for finite `KL` and equal to it
    at `+inf`, where the gradient passed to `kl` is exactly 0 (not NaN). Negative inputs
    (noisy estimates) map to the odd extension, in `(-bound, 0)`. NaN stays NaN.

    Args:
        kl: KL values, any shape.
        bound: the supremum, a positive finite number.
        saturation: `"tanh"`, `"sigmoid"` or `"entropy"`.
        entropy: `H(p)`, broadcastable with `kl`; required by `"entropy"`.

    Returns:
        Tensor of the broadcast shape of `kl` (and `entropy`).
    """
    b = check_finite("bound", bound, minimum=0.0, strict=True)
    check_choice("saturation", saturation, SATURATIONS)
    infinite = kl.abs() == math.inf
    x = torch.where(infinite, 0.0, kl)
    if saturation == "tanh":
        y = b * torch.tanh(x / b)
    elif saturation == "sigmoid":
        y = b * torch.tanh(x / (2.0 * b))
    else:
        if entropy is None:
            raise ValueError('saturation="entropy" needs the entropy of p (entropy=...).')
        scale = b * (1.0 + torch.exp(-entropy.detach().clamp_min(0.0)))
        pos = x >= 0
        # odd extension; each branch sees only inputs where it is finite
        y = torch.where(
            pos,
            -b * torch.expm1(-torch.where(pos, x, 0.0) / scale),
            b * torch.expm1(torch.where(pos, 0.0, x) / scale),
        )
    return torch.where(infinite, torch.sign(kl) * b, y)


def _entropy(p: Distribution) -> Tensor:
    try:
        return p.entropy()
    except NotImplementedError:
        raise NotImplementedError(
            f'saturation="entropy" needs p.entropy(), which {type(p).__name__} does not '
            'implement; use saturation="tanh" or "sigmoid".'
        ) from None


def bounded_kl(
    p: Distribution, q: Distribution, *, bound: float, saturation: str = "tanh"
) -> Tensor:
    r"""Saturated KL(p || q) in nats: a squashed KL in [0, bound), 0 exactly at p = q.

    $$
    f(\mathrm{KL}(p \| q)),\qquad f \in \{\, b\tanh(\cdot/b),\;
    b\,(2\sigma(\cdot/b) - 1),\; b\,(1 - e^{-\cdot/s}),\ s = b(1 + e^{-\max(H(p), 0)}) \,\}
    $$

    See [`saturate`][distkl.bounded.saturate] for the three `saturation` choices. The KL comes from
    `torch.distributions.kl_divergence` (distkl's rules included), except for
    categorical families (Categorical, OneHotCategorical, their mixtures), whose exact KL is
    computed from masked log-probabilities so that a `+inf` KL (`q = 0 < p`) returns
    `bound` with zero, not NaN, gradients (torch's own Categorical rule backpropagates NaN
    there). For other families, an infinite KL gets gradient 0 from the squashing; a rule that
    turns that 0 into NaN inside its own backward is outside this function's reach.

    Squashing makes far-away gradients vanish and biases squashed estimates low
    ($\mathbb{E} f(\widehat{\mathrm{KL}}) \le f(\mathrm{KL})$); the JSD
    ([`js_divergence`][distkl.js_divergence]) is bounded without it.

    Source: the tanh/sigmoid saturation of popular "bounded JSD/KL" posts, recentred so that
    `f(0) = 0` and capped at `bound`.

    Args:
        p: the first distribution.
        q: the second distribution; `kl_divergence(p, q)` must have a rule.
        bound: the supremum of the result, a positive finite number.
        saturation: `"tanh"` (default), `"sigmoid"` or `"entropy"`.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        TypeError, ValueError: for an invalid `bound` or `saturation`.
        NotImplementedError: no KL rule for the pair; `"entropy"` with a `p` that has no
            `entropy()`.
    """
    b = check_finite("bound", bound, minimum=0.0, strict=True)
    check_choice("saturation", saturation, SATURATIONS)
    entropy = _entropy(p) if saturation == "entropy" else None
    if is_categorical_family(p) and is_categorical_family(q):
        kl = kl_categorical_mixture_pair(p, q)
    else:
        kl = kl_divergence(p, q)
    return saturate(kl, bound=b, saturation=saturation, entropy=entropy)
