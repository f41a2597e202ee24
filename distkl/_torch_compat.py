"""Every use of a private torch name, in one place.

distkl is a plugin to `torch.distributions`: it reads torch's KL table and reuses a few private
helpers that torch's own `kl.py` uses (the Cholesky factors of MVN and LowRank MVN before
broadcasting, the capacitance of a LowRank MVN, the batched Mahalanobis distance). Each access goes
through a function here, and `tests/test_torch_compat.py` asserts the assumption each one
makes, so a torch release that moves one fails loudly in CI instead of silently changing a value.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor
from torch.distributions import (
    Categorical,
    Distribution,
    LowRankMultivariateNormal,
    MultivariateNormal,
)
from torch.distributions import kl as _torch_kl
from torch.distributions.multivariate_normal import _batch_mahalanobis

__all__ = [
    "batch_mahalanobis",
    "built_from_probs",
    "capacitance_tril",
    "clear_kl_cache",
    "default_validate_args",
    "validated",
    "first_order_backward",
    "exact_log_probs",
    "kl_memo",
    "kl_table",
    "lowrank_factors",
    "scale_tril",
]

Pair = tuple[type, type]


def kl_table() -> dict[Pair, Callable[..., Tensor]]:
    """torch's live `(type_p, type_q) -> rule` table (`torch.distributions.kl._KL_REGISTRY`).

    The dict itself, not a copy: `torch.distributions.kl.register_kl` writes into it.
    """
    return _torch_kl._KL_REGISTRY


def clear_kl_cache() -> None:
    """Forget torch's memoised dispatch, as `register_kl` does after every registration."""
    _torch_kl._KL_MEMOIZE.clear()


def batch_mahalanobis(tril: Tensor, diff: Tensor) -> Tensor:
    r"""`diff^T (L L^T)^{-1} diff` over broadcast batches; one solve per unique `L`."""
    if diff.numel() == 0 or tril.numel() == 0:  # torch's helper divides by the batch size
        return diff.new_zeros(torch.broadcast_shapes(tril.shape[:-2], diff.shape[:-1]))
    return _batch_mahalanobis(tril, diff)


def scale_tril(d: MultivariateNormal) -> Tensor:
    """The Cholesky factor of `d`'s covariance at its own (unbroadcast) batch shape."""
    return d._unbroadcasted_scale_tril


def lowrank_factors(d: LowRankMultivariateNormal) -> tuple[Tensor, Tensor]:
    """`(W, D)` with covariance `W W^T + diag(D)`, at their own (unbroadcast) batch shapes."""
    return d._unbroadcasted_cov_factor, d._unbroadcasted_cov_diag


def capacitance_tril(d: LowRankMultivariateNormal) -> Tensor:
    """Cholesky factor of the capacitance `I + W^T D^{-1} W` that torch caches on `d`."""
    return d._capacitance_tril


def built_from_probs(d: Categorical) -> bool:
    """True if `d` was constructed with `probs=` rather than `logits=`.

    torch keeps the constructor argument as `d._param` and stores `probs` in the instance
    dict when it was given (a lazily computed `probs` is cached there only after first use).
    """
    return d._param is d.__dict__.get("probs")


def default_validate_args() -> bool:
    """torch's default for `validate_args=None` (`Distribution.set_default_validate_args`)."""
    return bool(Distribution._validate_args)


def validated(d: Distribution) -> bool:
    """True when `d` checked its parameters at construction (`validate_args` in force).

    A validated `Normal` cannot hold a negative scale, so callers can skip re-checking it.
    """
    return bool(d._validate_args)


def first_order_backward(backward: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an `autograd.Function.backward` whose gradients are constants saved by forward.

    A backward run with `create_graph=True` raises a `RuntimeError` saying so, instead of
    returning first derivatives that a second `grad` would silently treat as constants
    (`torch.autograd.function.once_differentiable` raises only when the incoming gradient itself
    requires grad, and otherwise drops this function's part of a Hessian without a word).
    """

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Any) -> Any:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "distkl: this rule computes first derivatives only, and create_graph=True asks "
                "for more (second derivatives). Compute this KL with "
                "distkl.options(method='mc') inside such a graph."
            )
        return backward(ctx, *grads)

    return wrapper


def exact_log_probs(d: Categorical) -> Tensor:
    """Normalised log-probabilities `(*batch, K)`, exact even for zero or tiny probabilities.

    torch's `logits` for a Categorical built from `probs` clamps them to `eps` (so a weight of
    0 reads as about 1e-7 in float32); this takes the exact logarithm instead: `-inf` where a
    probability is 0, with a zero (not NaN) gradient there. NaN probabilities stay NaN.
    """
    if not built_from_probs(d):
        return d.logits
    probs = d.probs
    keep = (probs > 0) | probs.isnan()
    log = torch.where(keep, probs, torch.ones_like(probs)).log()
    return torch.where(keep, log, torch.full_like(probs, -torch.inf))


def kl_memo() -> dict[Pair, Callable[..., Tensor]]:
    """torch's live dispatch memo (`torch.distributions.kl._KL_MEMOIZE`), the dict itself.

    For code that must restore it exactly (`distkl.registry.preserved_registries`).
    """
    return _torch_kl._KL_MEMOIZE
