r"""The log-space kernel: KL and JS divergences of categoricals from log-probabilities, and the
safe logarithms, log-sum-exp, binary entropy and range clamp they (and the estimators) share.

Conventions, for every function here:

- `-inf` is a zero probability: $0 \log 0 = 0$ exactly, and $\mathrm{KL} = +\infty$ (never
  NaN) where $q_k = 0 < p_k$;
- NaN in gives NaN out: a NaN anywhere in a distribution's log-probabilities makes its
  divergence NaN, never 0 or a finite number;
- every input to a non-linear function is masked first, so gradients are finite wherever the
  value is (and zero, not NaN, for masked entries).

The user surface on raw logits/probabilities is `distkl.functional`; the categorical rules
(`distkl.rules.categorical`) and the estimators import from here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from distkl._checks import check_same_num_categories, check_skew

__all__ = [
    "binary_entropy",
    "check_category_dim",
    "clamp_to_js_range",
    "js_from_log_probs",
    "kl_from_log_probs",
    "log_ratio_to_mix",
    "safe_log",
    "safe_logsumexp",
]

_NEG_INF = -math.inf


def binary_entropy(alpha: float) -> float:
    r"""Binary entropy $H(\alpha) = -\alpha\log\alpha - (1-\alpha)\log(1-\alpha)$ in nats.

    The upper bound of $\mathrm{JS}_\alpha$ (reached exactly for disjoint supports).

    Args:
        alpha: a probability in (0, 1).

    Returns:
        A Python float.
    """
    return -(alpha * math.log(alpha) + (1.0 - alpha) * math.log1p(-alpha))


def _largest_at_most(value: float, dtype: torch.dtype) -> float:
    """The largest number representable in `dtype` that is `<= value` (`value >= 0`).

    Pure Python on `torch.finfo` (no tensor, no `.item()`): `value` rounded down to the
    dtype's significand, or to a multiple of its smallest subnormal below the normal range.
    `torch.compile` folds it into a constant.
    """
    info = torch.finfo(dtype)
    if value >= info.max:
        return info.max
    if value < info.tiny:  # subnormal range: multiples of the smallest subnormal
        step = info.tiny * info.eps
        return math.floor(value / step) * step
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= mantissa < 1
    digits = 2.0 / info.eps  # 2**(significand bits)
    return math.ldexp(math.floor(mantissa * digits), exponent) / digits


def clamp_to_js_range(js: Tensor, alpha: float) -> Tensor:
    r"""`js` clamped into $[0, H(\alpha)]$, the range where $\mathrm{JS}_\alpha$ lies.

    Removes rounding excursions only; the upper end is the largest number of `js.dtype` that
    does not exceed $H(\alpha)$. NaN stays NaN.

    Returns:
        Tensor of `js`'s shape and dtype.
    """
    return js.clamp(0.0, _largest_at_most(binary_entropy(alpha), js.dtype))


def safe_log(x: Tensor) -> Tensor:
    """`log(x)` with `-inf` (and a zero, not NaN, gradient) where `x == 0`; NaN stays NaN.

    Returns:
        Tensor of `x`'s shape.
    """
    zero = x == 0
    return torch.where(zero, _NEG_INF, torch.where(zero, 1.0, x).log())


def safe_logsumexp(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """`logsumexp` over `dim`; `-inf` with a zero (not NaN) gradient where all terms are.

    `torch.logsumexp` gives the right value there but a NaN gradient. A NaN term gives NaN.

    Returns:
        Tensor of `x`'s shape without `dim` (kept as size 1 with `keepdim=True`).
    """
    empty = (x == _NEG_INF).all(dim, keepdim=True)
    out = torch.logsumexp(torch.where(empty, 0.0, x), dim, keepdim=True)
    out = torch.where(empty, _NEG_INF, out)
    return out if keepdim else out.squeeze(dim)


def check_category_dim(log_p: Tensor, log_q: Tensor, dim: int) -> None:
    """Raise unless `dim` indexes both tensors and they have the same number of categories.

    Raises:
        IndexError: `dim` is outside `[-ndim, ndim)` of `log_p` or `log_q`.
        ValueError: the numbers of categories differ.
    """
    for name, t in (("p", log_p), ("q", log_q)):
        if not -t.dim() <= dim < t.dim():
            raise IndexError(
                f"dim={dim} is out of range for {name} with shape {tuple(t.shape)} (expected a "
                f"dim in [{-t.dim()}, {t.dim() - 1}]); the category dimension must exist in "
                "both p and q."
            )
    check_same_num_categories(log_p.shape[dim], log_q.shape[dim])


def kl_from_log_probs(log_p: Tensor, log_q: Tensor, dim: int = -1) -> Tensor:
    r"""KL(p || q) in nats of categorical distributions given as normalised log-probabilities.

    $$
    \mathrm{KL}(p \| q) = \sum_k p_k \left(\log p_k - \log q_k\right),
    \qquad 0 \log \tfrac{0}{q_k} = 0, \quad p_k \log \tfrac{p_k}{0} = +\infty
    $$

    Entries equal to `-inf` are zero probabilities. Terms with $p_k = 0$ are exactly 0; a
    category with $p_k > 0 = q_k$ makes the divergence `+inf` (never NaN). A NaN entry in
    either input makes that divergence NaN. Inputs are masked before the arithmetic, so
    gradients are finite wherever the value is (and zero for the masked entries where it is
    infinite). The result is clamped at 0 from below to remove negative rounding.

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26) and
    the conventions that follow it.

    Args:
        log_p: normalised log-probabilities of `p` (`logsumexp` over `dim` is 0).
        log_q: normalised log-probabilities of `q`; broadcasts with `log_p`.
        dim: the category dimension (same size in both).

    Returns:
        Tensor of the broadcast shape of `log_p` and `log_q` without `dim`.

    Raises:
        IndexError: `dim` does not index both inputs.
        ValueError: the numbers of categories differ.

    Example:
        >>> kl_from_log_probs(torch.tensor([0.0, -math.inf]), torch.tensor([-0.5, -1.0]))
        tensor(0.5000)
    """
    check_category_dim(log_p, log_q, dim)
    # NaN is neither "zero" nor masked away: it reaches the sum (p side) or the explicit check
    # below (q side, where p_k = 0 would otherwise hide it).
    p_zero = log_p == _NEG_INF
    q_zero = log_q == _NEG_INF
    safe_log_p = torch.where(p_zero, 0.0, log_p)
    safe_log_q = torch.where(q_zero, 0.0, log_q)
    terms = torch.where(p_zero, 0.0, safe_log_p.exp() * (safe_log_p - safe_log_q))
    kl = terms.sum(dim).clamp_min(0.0)
    infinite = (~p_zero & q_zero).any(dim)
    undefined = log_q.isnan().any(dim) | kl.isnan()
    return torch.where(undefined, math.nan, torch.where(infinite, math.inf, kl))


def log_ratio_to_mix(d: Tensor, beta: float) -> Tensor:
    r"""$-\log(1 + \beta(e^d - 1))$ for finite `d`: $\log(p/m)$ with $d = \log q - \log p$.

    With $m = (1-\beta) p + \beta q$ this is $\log(p/m)$. Computed as
    $-\operatorname{log1p}(\beta \operatorname{expm1}(d))$ up to $d = 1$ (exactly 0 at $d = 0$,
    no cancellation near it) and $-\operatorname{logaddexp}(\log(1-\beta), \log\beta + d)$ above
    (no overflow). NaN stays NaN.

    Returns:
        Tensor of `d`'s shape.
    """
    small = ~(d > 1.0)  # NaN takes the first branch, which keeps it
    r_small = -torch.log1p(beta * torch.expm1(torch.where(small, d, 0.0)))
    d_big = torch.where(small, 1.0, d)
    # beta = 1 - alpha rounds to 1 (or 0) for a skew below 1.1e-16: log(0) is -inf, not an error.
    log_1m_beta = math.log1p(-beta) if beta < 1.0 else -math.inf
    log_beta = math.log(beta) if beta > 0.0 else -math.inf
    r_big = -torch.logaddexp(torch.full_like(d_big, log_1m_beta), log_beta + d_big)
    return torch.where(small, r_small, r_big)


def _p_log_p_over_m(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    r"""$p_k \log(p_k / m_k)$ per category, $m = \alpha p + (1-\alpha) q$, exact at zeros.

    It is $-\log\alpha$ times $p_k$ where $q_k = 0 < p_k$, and 0 where $p_k = 0$. NaN in either
    input gives NaN (it is not a zero).
    """
    p_zero = log_p == _NEG_INF
    q_zero = log_q == _NEG_INF
    both = ~p_zero & ~q_zero
    d = torch.where(both, log_q - log_p, 0.0)
    r = torch.where(q_zero, -math.log(alpha), log_ratio_to_mix(d, 1.0 - alpha))
    return torch.where(p_zero, 0.0, torch.where(p_zero, 0.0, log_p).exp() * r)


def js_from_log_probs(log_p: Tensor, log_q: Tensor, *, skew: float = 0.5, dim: int = -1) -> Tensor:
    r"""JS_alpha(p, q) in nats of categoricals given as normalised log-probabilities.

    $$
    \mathrm{JS}_\alpha(p, q) = \sum_k \Big[\alpha\, p_k \log\frac{p_k}{m_k}
    + (1-\alpha)\, q_k \log\frac{q_k}{m_k}\Big], \qquad m_k = \alpha p_k + (1-\alpha) q_k
    $$

    Each $\log(p_k/m_k)$ is `log_ratio_to_mix` of $\log q_k - \log p_k$, so the value keeps its
    relative precision when `p` and `q` nearly agree; `-inf` entries (zero
    probabilities) are exact, with finite gradients; NaN in either input gives NaN. The result
    is clamped into $[0, H(\alpha)]$.

    Source: Lin (1991), "Divergence measures based on the Shannon entropy", IEEE Trans. Inf.
    Theory 37(1), eq. (4.1) with weights `(alpha, 1 - alpha)`.

    Args:
        log_p: normalised log-probabilities of `p`.
        log_q: normalised log-probabilities of `q`; broadcasts with `log_p`.
        skew: $\alpha$ in (0, 1), the weight of `p` in `m`.
        dim: the category dimension (same size in both).

    Returns:
        Tensor of the broadcast shape of `log_p` and `log_q` without `dim`.

    Raises:
        IndexError: `dim` does not index both inputs.
        ValueError: the numbers of categories differ, or `skew` is not in (0, 1).
        TypeError: `skew` is not a Python number.
    """
    alpha = check_skew(skew)
    check_category_dim(log_p, log_q, dim)
    t_p = _p_log_p_over_m(log_p, log_q, alpha)
    t_q = _p_log_p_over_m(log_q, log_p, 1.0 - alpha)
    return clamp_to_js_range((alpha * t_p + (1.0 - alpha) * t_q).sum(dim), alpha)
