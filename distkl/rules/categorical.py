r"""Exact KL rules for Categorical, OneHotCategorical and mixtures of categoricals.

torch has ``Categorical-Categorical`` and ``OneHotCategorical-OneHotCategorical`` and distkl leaves
them alone. This module registers the cross pairs torch lacks:

* ``Categorical <-> OneHotCategorical`` (subclasses such as ``OneHotCategoricalStraightThrough``
  reach these by dispatch);
* ``MixtureSameFamily <-> Categorical`` and ``MixtureSameFamily <-> OneHotCategorical`` for
  mixtures whose components are ``Categorical`` or ``OneHotCategorical``.

A mixture of categoricals over ``K`` categories is itself categorical,

.. math::
    \log p(k) = \operatorname{logsumexp}_j \big(\log w_j + \log p_j(k)\big),

so every pair here is an exact closed form. ``(MixtureSameFamily, MixtureSameFamily)`` is
registered in :mod:`distkl.rules.mixture`, which calls :func:`kl_categorical_mixture_pair` when
both mixtures are categorical.

Log-probabilities are taken from the parameter the distribution was built with: normalised
``logits`` as they are, and ``log(probs)`` without torch's ``eps`` clamping of ``probs``, so zero
and tiny probabilities stay exact. Values and gradients follow
:func:`distkl.functional.kl_from_log_probs`: ``0 log 0 = 0``, ``+inf`` (never NaN) where
``q = 0 < p``, finite gradients.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import (
    Categorical,
    Distribution,
    MixtureSameFamily,
    OneHotCategorical,
)

from distkl._checks import check_same_num_categories, unsupported
from distkl._torch_compat import exact_log_probs
from distkl.functional import kl_from_log_probs
from distkl.registry import register_kl

__all__ = [
    "SUPPORTED",
    "categorical_log_probs",
    "is_categorical_family",
    "kl_categorical_mixture_pair",
]

#: The families this module handles, as named in error messages.
SUPPORTED = (
    "Categorical",
    "OneHotCategorical",
    "MixtureSameFamily(Categorical)",
    "MixtureSameFamily(OneHotCategorical)",
)

_BASE = (Categorical, OneHotCategorical)


def is_categorical_family(d: Distribution) -> bool:
    """True for ``Categorical``, ``OneHotCategorical`` and ``MixtureSameFamily`` of those."""
    if isinstance(d, _BASE):
        return True
    return isinstance(d, MixtureSameFamily) and isinstance(d.component_distribution, _BASE)


def _base_log_probs(d: Categorical | OneHotCategorical) -> Tensor:
    """Normalised log-probabilities ``(*batch, K)`` from the parameter ``d`` was built with."""
    cat = d._categorical if isinstance(d, OneHotCategorical) else d
    return exact_log_probs(cat)


def _logsumexp(x: Tensor, dim: int) -> Tensor:
    """``logsumexp``, but ``-inf`` with a zero (not NaN) gradient where all terms are ``-inf``."""
    empty = (x == -math.inf).all(dim, keepdim=True)
    out = torch.logsumexp(torch.where(empty, 0.0, x), dim)
    return torch.where(empty.squeeze(dim), -math.inf, out)


def categorical_log_probs(d: Distribution) -> Tensor:
    r"""Normalised log-probabilities ``(*batch, K)`` of a categorical-family distribution.

    For a mixture with weights :math:`w_j` and categorical components :math:`p_j`,

    .. math::
        \log p(k) = \operatorname{logsumexp}_j \big(\log w_j + \log p_j(k)\big).

    Zero probabilities are ``-inf`` exactly, with zero (not NaN) gradients.

    Returns:
        Tensor of shape ``(*batch, K)``; for a mixture, ``batch`` broadcasts the mixing and
        component batch shapes.

    Raises:
        NotImplementedError: for any other family, listing :data:`SUPPORTED`.
    """
    if isinstance(d, _BASE):
        return _base_log_probs(d)
    if isinstance(d, MixtureSameFamily):
        comp = d.component_distribution
        if isinstance(comp, _BASE):
            log_w = _base_log_probs(d.mixture_distribution)  # (*b, J)
            log_c = _base_log_probs(comp)  # (*b, J, K)
            return _logsumexp(log_w.unsqueeze(-1) + log_c, dim=-2)
    raise unsupported("a categorical KL", d, SUPPORTED)


def kl_categorical_mixture_pair(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats, exact, for any two categorical-family distributions (mixtures included).

    Both sides are collapsed to one categorical (:func:`categorical_log_probs`), then

    .. math::
        \mathrm{KL}(p \| q) = \sum_k p(k) \big(\log p(k) - \log q(k)\big),

    with ``0 log 0 = 0`` and ``+inf`` where ``q(k) = 0 < p(k)``. This is the function
    :mod:`distkl.rules.mixture` calls for ``MixtureSameFamily`` pairs with categorical
    components.

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26);
    a finite mixture of categoricals is categorical with :math:`p(k) = \sum_j w_j p_j(k)`.

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.

    Raises:
        NotImplementedError: if either side is not in :data:`SUPPORTED`.
        ValueError: if the numbers of categories differ.
    """
    log_p = categorical_log_probs(p)
    log_q = categorical_log_probs(q)
    check_same_num_categories(log_p.shape[-1], log_q.shape[-1])
    return kl_from_log_probs(log_p, log_q, dim=-1)


@register_kl(Categorical, OneHotCategorical, kind="exact", on_conflict="skip")
def _kl_categorical_onehotcategorical(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats of a Categorical and a OneHotCategorical over the same K categories.

    .. math::
        \mathrm{KL}(p \| q) = \sum_{k=1}^K p_k \log \frac{p_k}{q_k}

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26).

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.
    """
    return kl_categorical_mixture_pair(p, q)


@register_kl(OneHotCategorical, Categorical, kind="exact", on_conflict="skip")
def _kl_onehotcategorical_categorical(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats of a OneHotCategorical and a Categorical over the same K categories.

    .. math::
        \mathrm{KL}(p \| q) = \sum_{k=1}^K p_k \log \frac{p_k}{q_k}

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26).

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.
    """
    return kl_categorical_mixture_pair(p, q)


@register_kl(MixtureSameFamily, Categorical, kind="exact", on_conflict="skip")
@register_kl(Categorical, MixtureSameFamily, kind="exact", on_conflict="skip")
@register_kl(MixtureSameFamily, OneHotCategorical, kind="exact", on_conflict="skip")
@register_kl(OneHotCategorical, MixtureSameFamily, kind="exact", on_conflict="skip")
def _kl_categorical_mixture(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats, a mixture of categoricals against a categorical or back, exact.

    .. math::
        \mathrm{KL}(p \| q) = \sum_k p(k) \log \frac{p(k)}{q(k)}, \qquad
        p(k) = \sum_j w_j p_j(k) \text{ for a mixture (likewise } q\text{)}

    Dispatch is by type only: every ``MixtureSameFamily`` lands here, and only categorical
    components are handled.

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26).

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.

    Raises:
        NotImplementedError: if the mixture's components are not Categorical/OneHotCategorical.
    """
    return kl_categorical_mixture_pair(p, q)
