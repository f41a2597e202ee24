r"""Kullback-Leibler and Jensen-Shannon divergences of categorical distributions held as tensors.

For people who hold logits or probabilities rather than :class:`~torch.distributions.Distribution`
objects. Every argument is keyword-only and named after the distribution it belongs to, so the
direction cannot be swapped by accident::

    kl_divergence(p_logits=student, q_logits=teacher)   # KL(p || q), p = softmax(student)

This differs from :func:`torch.nn.functional.kl_div`, which takes ``input = log q`` first and
``target = p`` second, computes ``KL(p || q)`` elementwise, and whose ``reduction="mean"`` divides
by every element (batch size times number of categories) rather than by the number of
distributions. Here ``reduction`` names what it does to the per-distribution divergences:

- ``"none"``: one value per distribution, the input shape without ``dim``;
- ``"sum"``: the sum over distributions;
- ``"mean"``: the mean over distributions (not over elements);
- ``"batchmean"``: the sum divided by the size of the first batch dimension (1 if there is
  none); for ``(N, K)`` inputs with ``dim=-1`` this equals
  ``F.kl_div(log_q, p, reduction="batchmean")``.

The building blocks :func:`kl_from_log_probs` and :func:`js_from_log_probs` take normalised
log-probabilities and are what :mod:`distkl.rules.categorical` and the JSD rules use: zero
probabilities give exact values (``0 log 0 = 0``), ``KL = +inf`` (never NaN) where ``q = 0 < p``,
and gradients are finite wherever the value is.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from distkl._checks import check_same_num_categories, check_skew
from distkl.registry import binary_entropy

__all__ = [
    "REDUCTIONS",
    "kl_divergence",
    "js_divergence",
    "kl_from_log_probs",
    "js_from_log_probs",
    "log_probs",
]

#: Valid values of ``reduction``.
REDUCTIONS = ("none", "sum", "mean", "batchmean")

_NEG_INF = -math.inf


# --------------------------------------------------------------------------------------------
# Building blocks on normalised log-probabilities.


def _check_categories(log_p: Tensor, log_q: Tensor, dim: int) -> None:
    for name, t in (("p", log_p), ("q", log_q)):
        if not -t.dim() <= dim < t.dim():
            raise ValueError(
                f"dim={dim} is out of range for {name} with shape {tuple(t.shape)}; the "
                "category dimension must exist in both p and q."
            )
    check_same_num_categories(log_p.shape[dim], log_q.shape[dim])


def kl_from_log_probs(log_p: Tensor, log_q: Tensor, dim: int = -1) -> Tensor:
    r"""KL(p || q) in nats of categorical distributions given as normalised log-probabilities.

    .. math::
        \mathrm{KL}(p \| q) = \sum_k p_k \left(\log p_k - \log q_k\right),
        \qquad 0 \log \tfrac{0}{q_k} = 0, \quad p_k \log \tfrac{p_k}{0} = +\infty

    Entries equal to ``-inf`` are zero probabilities. Terms with ``p_k = 0`` are exactly 0; a
    category with ``p_k > 0 = q_k`` makes the divergence ``+inf`` (never NaN). Inputs are masked
    before the arithmetic, so gradients are finite wherever the value is (and where it is
    infinite, too: zero for the masked entries). The result is clamped at 0 from below to
    remove negative rounding.

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26) and
    the conventions that follow it.

    Args:
        log_p: normalised log-probabilities of ``p`` (``logsumexp`` over ``dim`` is 0).
        log_q: normalised log-probabilities of ``q``; broadcasts with ``log_p``.
        dim: the category dimension (same size in both).

    Returns:
        Tensor of the broadcast shape of ``log_p`` and ``log_q`` without ``dim``.

    Raises:
        ValueError: if the number of categories differs.
    """
    _check_categories(log_p, log_q, dim)
    p_pos = log_p > _NEG_INF
    q_zero = log_q == _NEG_INF
    safe_log_p = torch.where(p_pos, log_p, 0.0)
    safe_log_q = torch.where(q_zero, 0.0, log_q)
    p = safe_log_p.exp()
    terms = torch.where(p_pos, p * (safe_log_p - safe_log_q), 0.0)
    kl = terms.sum(dim).clamp_min(0.0)
    infinite = (p_pos & q_zero).any(dim)
    return torch.where(infinite, math.inf, kl)


def _upper(alpha: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` that is <= H(alpha)."""
    h = binary_entropy(alpha)
    t = torch.tensor(h, dtype=dtype)
    if t.item() > h:
        t = torch.nextafter(t, torch.zeros((), dtype=dtype))
    return float(t.item())


def _clamp_range(js: Tensor, alpha: float) -> Tensor:
    """Clamp rounding excursions into ``[0, H(alpha)]``; the truth lies there."""
    return js.clamp(0.0, _upper(alpha, js.dtype))


def _log_ratio_to_mix(d: Tensor, beta: float) -> Tensor:
    r"""``-log(1 + beta (e^d - 1))`` for finite ``d``: ``-log1p(beta expm1(d))`` up to ``d = 1``
    (exactly 0 at ``d = 0``, no cancellation near it), ``-logaddexp(log(1-beta), log(beta) + d)``
    above (no overflow)."""
    small = d <= 1.0
    r_small = -torch.log1p(beta * torch.expm1(torch.where(small, d, 0.0)))
    d_big = torch.where(small, 1.0, d)
    # beta = 1 - alpha rounds to 1 (or 0) for a skew below 1.1e-16: log(0) is -inf, not an error.
    log_1m_beta = math.log1p(-beta) if beta < 1.0 else -math.inf
    log_beta = math.log(beta) if beta > 0.0 else -math.inf
    r_big = -torch.logaddexp(torch.full_like(d_big, log_1m_beta), log_beta + d_big)
    return torch.where(small, r_small, r_big)


def _log_p_over_m(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    r"""``p_k log(p_k / m_k)`` per category, exact at zeros, accurate when ``p ~ q``.

    With :math:`d = \log q_k - \log p_k`, :math:`\log(p_k / m_k) = -\log(1 + (1-\alpha)(e^d - 1))`
    (:func:`_log_ratio_to_mix`); it is ``-log(alpha)`` where ``q_k = 0 < p_k``, and the term is 0
    where ``p_k = 0``. Every input to a non-linear function is masked first, so gradients are
    finite everywhere.
    """
    p_pos = log_p > _NEG_INF
    both = p_pos & (log_q > _NEG_INF)
    d = torch.where(both, log_q - log_p, 0.0)
    r = torch.where(both, _log_ratio_to_mix(d, 1.0 - alpha), -math.log(alpha))
    return torch.where(p_pos, torch.where(p_pos, log_p, 0.0).exp() * r, 0.0)


def js_from_log_probs(log_p: Tensor, log_q: Tensor, *, skew: float = 0.5, dim: int = -1) -> Tensor:
    r"""JS_alpha(p, q) in nats of categoricals given as normalised log-probabilities.

    .. math::
        \mathrm{JS}_\alpha(p, q) = \sum_k \Big[\alpha\, p_k \log\frac{p_k}{m_k}
        + (1-\alpha)\, q_k \log\frac{q_k}{m_k}\Big], \qquad m_k = \alpha p_k + (1-\alpha) q_k

    Each :math:`\log(p_k/m_k) = -\log(1 + (1-\alpha)(e^{\log q_k - \log p_k} - 1))` is computed
    with ``log1p``/``expm1``, so the value keeps its relative precision when ``p`` and ``q``
    nearly agree (where ``log p - log m`` would cancel); ``-inf`` entries (zero probabilities)
    are exact, with finite gradients. The result is clamped into :math:`[0, H(\alpha)]`.

    Source: Lin (1991), "Divergence measures based on the Shannon entropy", IEEE Trans. Inf.
    Theory 37(1), eq. (4.1) with weights ``(alpha, 1 - alpha)``.

    Returns:
        Tensor of the broadcast shape of ``log_p`` and ``log_q`` without ``dim``.

    Raises:
        ValueError: if the numbers of categories differ, or ``skew`` is not in (0, 1).
    """
    alpha = check_skew(skew)
    _check_categories(log_p, log_q, dim)
    t_p = _log_p_over_m(log_p, log_q, alpha)
    t_q = _log_p_over_m(log_q, log_p, 1.0 - alpha)
    return _clamp_range((alpha * t_p + (1.0 - alpha) * t_q).sum(dim), alpha)


# --------------------------------------------------------------------------------------------
# Tensor front end: logits or probabilities in, validated.


def _safe_log(probs: Tensor) -> Tensor:
    """``log(probs)`` with ``-inf`` at zeros and a zero (not NaN) gradient there."""
    pos = probs > 0
    return torch.where(pos, torch.where(pos, probs, 1.0).log(), _NEG_INF)


def log_probs(
    *,
    logits: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
    dim: int = -1,
    name: str = "p",
) -> Tensor:
    r"""Normalised log-probabilities along ``dim`` from exactly one of ``logits`` or ``probs``.

    ``logits`` are unnormalised log-probabilities (``-inf`` allowed for impossible categories);
    ``probs`` are non-negative weights, divided by their sum along ``dim`` (zeros give ``-inf``
    exactly, unlike :class:`~torch.distributions.Categorical`, which clamps them to ``eps``).

    Returns:
        Tensor of the input's shape.

    Raises:
        ValueError: if both or neither are given, if ``probs`` has negative, NaN or infinite
            entries or a row summing to zero, or if ``logits`` has NaN or ``+inf`` entries or a
            row of all ``-inf``. The message names ``name``.
    """
    if (logits is None) == (probs is None):
        raise ValueError(
            f"Give exactly one of {name}_logits or {name}_probs, got "
            f"{'both' if logits is not None else 'neither'}."
        )
    if logits is not None:
        x = _as_float(logits, f"{name}_logits")
        _check_dim(x, dim, f"{name}_logits")
        if torch.isnan(x).any():
            raise ValueError(f"{name}_logits contains NaN.")
        if (x == math.inf).any():
            raise ValueError(f"{name}_logits contains +inf; use finite values or -inf.")
        if (x == _NEG_INF).all(dim).any():
            raise ValueError(
                f"{name}_logits has a distribution whose entries along dim={dim} are all -inf."
            )
        return torch.log_softmax(x, dim)
    assert probs is not None
    x = _as_float(probs, f"{name}_probs")
    _check_dim(x, dim, f"{name}_probs")
    if torch.isnan(x).any():
        raise ValueError(f"{name}_probs contains NaN.")
    if torch.isinf(x).any():
        raise ValueError(f"{name}_probs contains infinite entries.")
    if (x < 0).any():
        raise ValueError(
            f"{name}_probs must be non-negative, got a minimum of {x.min().item():.6g}."
        )
    total = x.sum(dim, keepdim=True)
    if (total == 0).any():
        raise ValueError(
            f"{name}_probs has a distribution whose entries along dim={dim} are all zero."
        )
    return _safe_log(x) - total.log()


def _as_float(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}.")
    if x.is_complex():
        raise TypeError(f"{what} must be real, got dtype {x.dtype}.")
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_dim(x: Tensor, dim: int, what: str) -> None:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(
            f"dim={dim} is out of range for {what} with shape {tuple(x.shape)}; the category "
            "dimension must exist."
        )


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}; got {reduction!r}.")


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    batch = values.shape[0] if values.dim() > 0 else 1
    return values.sum() / batch


def _pair(
    p_logits: Optional[Tensor],
    p_probs: Optional[Tensor],
    q_logits: Optional[Tensor],
    q_probs: Optional[Tensor],
    dim: int,
    reduction: str,
) -> tuple[Tensor, Tensor, int]:
    _check_reduction(reduction)
    if dim >= 0:
        # A non-negative dim indexes the broadcast shape; count from the end so that p and q
        # of different ndim line up.
        raw = [t for t in (p_logits, p_probs, q_logits, q_probs) if isinstance(t, Tensor)]
        dim = dim - max((t.dim() for t in raw), default=0)
    log_p = log_probs(logits=p_logits, probs=p_probs, dim=dim, name="p")
    log_q = log_probs(logits=q_logits, probs=q_probs, dim=dim, name="q")
    check_same_num_categories(log_p.shape[dim], log_q.shape[dim])
    try:
        torch.broadcast_shapes(log_p.shape, log_q.shape)
    except RuntimeError:
        raise ValueError(
            f"p and q shapes must broadcast, got {tuple(log_p.shape)} and {tuple(log_q.shape)}."
        ) from None
    return log_p, log_q, dim


def kl_divergence(
    *,
    p_logits: Optional[Tensor] = None,
    p_probs: Optional[Tensor] = None,
    q_logits: Optional[Tensor] = None,
    q_probs: Optional[Tensor] = None,
    dim: int = -1,
    reduction: str = "none",
) -> Tensor:
    r"""KL(p || q) in nats of categorical distributions given by logits or probabilities.

    .. math::
        \mathrm{KL}(p \| q) = \sum_k p_k \log \frac{p_k}{q_k}

    Give one of ``p_logits`` / ``p_probs`` and one of ``q_logits`` / ``q_probs``; they are
    normalised along ``dim`` (softmax for logits, division by the sum for probabilities) and
    broadcast against each other. Zero probabilities are exact: ``0 log 0 = 0``, and ``+inf``
    where ``q_k = 0 < p_k``. Same numbers as ``torch.distributions.kl_divergence`` on
    ``Categorical`` objects, without its ``eps`` clamping of probabilities and its NaN gradients.

    Compared with :func:`torch.nn.functional.kl_div`: ``F.kl_div(input, target)`` takes
    ``input = log q`` and ``target = p`` (reversed order) and its ``"mean"`` divides by the
    number of elements; here ``"mean"`` is the mean over distributions.

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26).

    Args:
        p_logits: unnormalised log-probabilities of ``p`` (``-inf`` for impossible categories).
        p_probs: non-negative weights of ``p``, normalised along ``dim``. Give exactly one of
            ``p_logits`` and ``p_probs``.
        q_logits: unnormalised log-probabilities of ``q``.
        q_probs: non-negative weights of ``q``. Give exactly one of ``q_logits`` and ``q_probs``.
        dim: the category dimension.
        reduction: ``"none"`` (default), ``"sum"``, ``"mean"`` or ``"batchmean"``; see
            :mod:`distkl.functional`.

    Returns:
        With ``reduction="none"``, a Tensor of the broadcast input shape without ``dim``;
        otherwise a scalar Tensor.

    Raises:
        ValueError: invalid probabilities or logits, different numbers of categories, shapes
            that do not broadcast, or an unknown ``reduction``.
    """
    log_p, log_q, dim = _pair(p_logits, p_probs, q_logits, q_probs, dim, reduction)
    return _reduce(kl_from_log_probs(log_p, log_q, dim), reduction)


def js_divergence(
    *,
    p_logits: Optional[Tensor] = None,
    p_probs: Optional[Tensor] = None,
    q_logits: Optional[Tensor] = None,
    q_probs: Optional[Tensor] = None,
    skew: float = 0.5,
    dim: int = -1,
    reduction: str = "none",
) -> Tensor:
    r"""JS_alpha(p, q) in nats of categorical distributions given by logits or probabilities.

    .. math::
        \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m),
        \qquad m = \alpha p + (1-\alpha) q

    ``skew=0.5`` is the usual symmetric JSD, bounded by :math:`\log 2` (exactly that for
    disjoint supports); in general :math:`0 \le \mathrm{JS}_\alpha \le H(\alpha)`. Equals
    ``scipy.spatial.distance.jensenshannon(p, q) ** 2`` at ``skew=0.5``.

    Source: Lin (1991), "Divergence measures based on the Shannon entropy", IEEE Trans. Inf.
    Theory 37(1).

    Args:
        p_logits: unnormalised log-probabilities of ``p`` (``-inf`` for impossible categories).
        p_probs: non-negative weights of ``p``, normalised along ``dim``. Give exactly one of
            ``p_logits`` and ``p_probs``.
        q_logits: unnormalised log-probabilities of ``q``.
        q_probs: non-negative weights of ``q``. Give exactly one of ``q_logits`` and ``q_probs``.
        skew: ``alpha`` in (0, 1), the weight of ``p`` in the mixture ``m``.
        dim: the category dimension.
        reduction: ``"none"`` (default), ``"sum"``, ``"mean"`` or ``"batchmean"``.

    Returns:
        With ``reduction="none"``, a Tensor of the broadcast input shape without ``dim``;
        otherwise a scalar Tensor.
    """
    check_skew(skew)
    log_p, log_q, dim = _pair(p_logits, p_probs, q_logits, q_probs, dim, reduction)
    return _reduce(js_from_log_probs(log_p, log_q, skew=skew, dim=dim), reduction)
