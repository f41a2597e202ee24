r"""Kullback-Leibler and Jensen-Shannon divergences of categorical distributions held as tensors.

For people who hold logits or probabilities rather than `Distribution`
objects. Every argument is keyword-only and named after the distribution it belongs to, so the
direction cannot be swapped by accident:

```python
kl_divergence(p_logits=student, q_logits=teacher)   # KL(p || q), p = softmax(student)
```

This differs from `torch.nn.functional.kl_div`, which takes `input = log q` first and
`target = p` second, computes `KL(p || q)` elementwise, and whose `reduction="mean"` divides
by every element (batch size times number of categories) rather than by the number of
distributions. Here `reduction` names what it does to the per-distribution divergences:

- `"none"`: one value per distribution, the input shape without `dim`;
- `"sum"`: the sum over distributions;
- `"mean"`: the mean over distributions (not over elements);
- `"batchmean"`: the sum divided by the size of the first batch dimension (1 if there is
  none); for `(N, K)` inputs with `dim=-1` this equals
  `F.kl_div(log_q, p, reduction="batchmean")`.

The building blocks [`kl_from_log_probs`][distkl.functional.kl_from_log_probs] and
[`js_from_log_probs`][distkl.functional.js_from_log_probs] (re-exported from the kernel
`distkl._logspace`, which the rules use too) take normalised log-probabilities: zero probabilities
give exact values (`0 log 0 = 0`), `KL = +inf` (never NaN) where `q = 0 < p`, NaN in gives NaN out,
and gradients are finite wherever the value is.

Value checks (NaN, infinities, negative weights) follow torch's `validate_args`: on by default,
off with `validate_args=False` or `Distribution.set_default_validate_args(False)`, which saves
their host-device synchronisations. Shape checks are always on.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from distkl._checks import broadcast_shape, check_choice, check_same_num_categories, check_skew
from distkl._logspace import js_from_log_probs, kl_from_log_probs, safe_log
from distkl._torch_compat import default_validate_args

__all__ = [
    "REDUCTIONS",
    "kl_divergence",
    "js_divergence",
    "kl_from_log_probs",
    "js_from_log_probs",
    "log_probs",
]

#: Valid values of `reduction`.
REDUCTIONS = ("none", "sum", "mean", "batchmean")


# --------------------------------------------------------------------------------------------
# Tensor front end: logits or probabilities in, validated.


def _validate(validate_args: Optional[bool]) -> bool:
    """`validate_args`, or torch's default (`set_default_validate_args`) when None."""
    return default_validate_args() if validate_args is None else bool(validate_args)


def log_probs(
    *,
    logits: Optional[Tensor] = None,
    probs: Optional[Tensor] = None,
    dim: int = -1,
    name: str = "p",
    validate_args: Optional[bool] = None,
) -> Tensor:
    r"""Normalised log-probabilities along `dim` from exactly one of `logits` or `probs`.

    `logits` are unnormalised log-probabilities (`-inf` allowed for impossible categories);
    `probs` are non-negative weights, divided by their sum along `dim` (zeros give `-inf`
    exactly, unlike `torch.distributions.Categorical`, which clamps them to `eps`).

    Args:
        logits: unnormalised log-probabilities.
        probs: non-negative weights.
        dim: the category dimension.
        name: the distribution's name in error messages (`p` gives `p_logits`/`p_probs`).
        validate_args: check the values (NaN, infinities, negative weights, rows without
            mass), which costs host-device synchronisations; default: torch's
            `Distribution` default (`torch.distributions.Distribution.set_default_validate_args`).
            Without the checks, invalid values give NaN. Shapes are always checked.

    Returns:
        Tensor of the input's shape.

    Raises:
        ValueError: if both or neither are given, if the category dimension is empty, or (with
            validation) if `probs` has negative, NaN or infinite entries or a row summing to
            zero, or `logits` has NaN or `+inf` entries or a row of all `-inf`. The
            message names `name`.
        IndexError: `dim` is out of range.
        TypeError: the input is not a real tensor.
    """
    if (logits is None) == (probs is None):
        raise ValueError(
            f"Give exactly one of {name}_logits or {name}_probs, got "
            f"{'both' if logits is not None else 'neither'}."
        )
    what = f"{name}_logits" if logits is not None else f"{name}_probs"
    given = logits if logits is not None else probs
    assert given is not None
    x = _as_float(given, what)
    _check_dim(x, dim, what)
    if x.shape[dim] == 0:
        raise ValueError(
            f"{what} must have at least one category along dim={dim}, got shape {tuple(x.shape)}."
        )
    check_values = _validate(validate_args) and x.device.type != "meta"
    if logits is not None:
        if check_values:
            _check_logits(x, dim, what)
        return torch.log_softmax(x, dim)
    if check_values:
        _check_probs(x, dim, what)
    return safe_log(x) - x.sum(dim, keepdim=True).log()


def _check_logits(x: Tensor, dim: int, what: str) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{what} contains NaN.")
    if (x == math.inf).any():
        raise ValueError(f"{what} contains +inf; use finite values or -inf.")
    if (x == -math.inf).all(dim).any():
        raise ValueError(f"{what} has a distribution whose entries along dim={dim} are all -inf.")


def _check_probs(x: Tensor, dim: int, what: str) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{what} contains NaN.")
    if torch.isinf(x).any():
        raise ValueError(f"{what} contains infinite entries.")
    if (x < 0).any():
        raise ValueError(f"{what} must be non-negative, got a minimum of {x.min().item():.6g}.")
    if (x.sum(dim) == 0).any():
        raise ValueError(f"{what} has a distribution whose entries along dim={dim} are all zero.")


def _as_float(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}.")
    if x.is_complex():
        raise TypeError(f"{what} must be real, got dtype {x.dtype}.")
    return x if x.is_floating_point() else x.to(torch.get_default_dtype())


def _check_dim(x: Tensor, dim: int, what: str) -> None:
    if not -x.dim() <= dim < x.dim():
        raise IndexError(
            f"dim={dim} is out of range for {what} with shape {tuple(x.shape)} (expected a dim "
            f"in [{-x.dim()}, {x.dim() - 1}]); the category dimension must exist."
        )


def apply_reduction(values: Tensor, reduction: str) -> Tensor:
    """Reduce per-distribution divergences as `reduction` says (see `distkl.functional`).

    Args:
        values: one divergence per distribution.
        reduction: `"none"`, `"sum"`, `"mean"` (over distributions) or `"batchmean"`
            (the sum divided by the size of the first dimension, 1 for a scalar).

    Returns:
        `values` for `"none"`, else a scalar Tensor.

    Raises:
        ValueError: an unknown `reduction`.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean()
    batch = values.shape[0] if values.dim() > 0 else 1
    return values.sum() / batch


def _log_prob_pair(
    p_logits: Optional[Tensor],
    p_probs: Optional[Tensor],
    q_logits: Optional[Tensor],
    q_probs: Optional[Tensor],
    dim: int,
    validate_args: Optional[bool],
) -> tuple[Tensor, Tensor, int]:
    """Normalised `(log_p, log_q, dim)`, `dim` counted from the end, shapes checked."""
    raw = [t for t in (p_logits, p_probs, q_logits, q_probs) if isinstance(t, Tensor)]
    ndim = max((t.dim() for t in raw), default=0)
    if raw and not -ndim <= dim < ndim:
        raise IndexError(
            f"dim={dim} is out of range for inputs of {ndim} dimensions (expected a dim in "
            f"[{-ndim}, {ndim - 1}])."
        )
    if dim >= 0:
        # A non-negative dim indexes the broadcast shape; count from the end so that p and q
        # of different ndim line up.
        dim = dim - ndim
    check = validate_args
    log_p = log_probs(logits=p_logits, probs=p_probs, dim=dim, name="p", validate_args=check)
    log_q = log_probs(logits=q_logits, probs=q_probs, dim=dim, name="q", validate_args=check)
    check_same_num_categories(log_p.shape[dim], log_q.shape[dim])
    try:
        broadcast_shape(log_p.shape, log_q.shape)
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
    validate_args: Optional[bool] = None,
) -> Tensor:
    r"""KL(p || q) in nats of categorical distributions given by logits or probabilities.

    $$
    \mathrm{KL}(p \| q) = \sum_k p_k \log \frac{p_k}{q_k}
    $$

    Give one of `p_logits` / `p_probs` and one of `q_logits` / `q_probs`; they are
    normalised along `dim` (softmax for logits, division by the sum for probabilities) and
    broadcast against each other. Zero probabilities are exact: `0 log 0 = 0`, and `+inf`
    where `q_k = 0 < p_k`. Same numbers as `torch.distributions.kl_divergence` on
    `Categorical` objects, without its `eps` clamping of probabilities and its NaN gradients.

    Compared with `torch.nn.functional.kl_div`: `F.kl_div(input, target)` takes
    `input = log q` and `target = p` (reversed order) and its `"mean"` divides by the
    number of elements; here `"mean"` is the mean over distributions.

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26).

    Args:
        p_logits: unnormalised log-probabilities of `p` (`-inf` for impossible categories).
        p_probs: non-negative weights of `p`, normalised along `dim`. Give exactly one of
            `p_logits` and `p_probs`.
        q_logits: unnormalised log-probabilities of `q`.
        q_probs: non-negative weights of `q`. Give exactly one of `q_logits` and `q_probs`.
        dim: the category dimension.
        reduction: `"none"` (default), `"sum"`, `"mean"` or `"batchmean"`; see
            `distkl.functional`.
        validate_args: check the input values (NaN, infinities, negative weights, rows without
            mass; each check is a host-device synchronisation). Default: torch's
            `Distribution` default, as for `Categorical(..., validate_args=None)`. Without
            the checks, invalid values give NaN. Shapes are always checked.

    Returns:
        With `reduction="none"`, a Tensor of the broadcast input shape without `dim`;
        otherwise a scalar Tensor.

    Raises:
        ValueError: invalid probabilities or logits (with validation), different numbers of
            categories, shapes that do not broadcast, or an unknown `reduction`.
        IndexError: `dim` is outside `[-ndim, ndim)`.
    """
    check_choice("reduction", reduction, REDUCTIONS)
    log_p, log_q, dim = _log_prob_pair(p_logits, p_probs, q_logits, q_probs, dim, validate_args)
    return apply_reduction(kl_from_log_probs(log_p, log_q, dim), reduction)


def js_divergence(
    *,
    p_logits: Optional[Tensor] = None,
    p_probs: Optional[Tensor] = None,
    q_logits: Optional[Tensor] = None,
    q_probs: Optional[Tensor] = None,
    skew: float = 0.5,
    dim: int = -1,
    reduction: str = "none",
    validate_args: Optional[bool] = None,
) -> Tensor:
    r"""JS_alpha(p, q) in nats of categorical distributions given by logits or probabilities.

    $$
    \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m),
    \qquad m = \alpha p + (1-\alpha) q
    $$

    `skew=0.5` is the usual symmetric JSD, bounded by $\log 2$ (exactly that for
    disjoint supports); in general $0 \le \mathrm{JS}_\alpha \le H(\alpha)$. Equals
    `scipy.spatial.distance.jensenshannon(p, q) ** 2` at `skew=0.5`.

    Source: Lin (1991), "Divergence measures based on the Shannon entropy", IEEE Trans. Inf.
    Theory 37(1).

    Args:
        p_logits: unnormalised log-probabilities of `p` (`-inf` for impossible categories).
        p_probs: non-negative weights of `p`, normalised along `dim`. Give exactly one of
            `p_logits` and `p_probs`.
        q_logits: unnormalised log-probabilities of `q`.
        q_probs: non-negative weights of `q`. Give exactly one of `q_logits` and `q_probs`.
        skew: `alpha` in (0, 1), the weight of `p` in the mixture `m`.
        dim: the category dimension.
        reduction: `"none"` (default), `"sum"`, `"mean"` or `"batchmean"`.
        validate_args: check the input values, as in
            [`kl_divergence`][distkl.functional.kl_divergence].

    Returns:
        With `reduction="none"`, a Tensor of the broadcast input shape without `dim`;
        otherwise a scalar Tensor.
    """
    check_skew(skew)
    check_choice("reduction", reduction, REDUCTIONS)
    log_p, log_q, dim = _log_prob_pair(p_logits, p_probs, q_logits, q_probs, dim, validate_args)
    return apply_reduction(js_from_log_probs(log_p, log_q, skew=skew, dim=dim), reduction)
