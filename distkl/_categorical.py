r"""Categorical families as normalised log-probabilities, and their exact KL and JS divergences.

A `Categorical`, a `OneHotCategorical` (subclasses included, e.g.
`OneHotCategoricalStraightThrough`) and a `MixtureSameFamily` of either are all categorical
over `K` categories; a mixture collapses to one categorical,

$$
\log p(k) = \operatorname{logsumexp}_j \big(\log w_j + \log p_j(k)\big).
$$

Log-probabilities come from the parameter each distribution was built with: normalised
`logits` as they are, and `log(probs)` without torch's `eps` clamping, so zero and tiny
probabilities stay exact (`distkl._torch_compat.exact_log_probs`). The divergences are the
kernel's (`distkl._logspace`): $0 \log 0 = 0$, `+inf` (never NaN) where $q = 0 < p$, NaN in
gives NaN out, finite gradients.

The registered rules are in `distkl.rules.categorical`; this module holds what the rest of the
package needs (`distkl.rules.mixture`, `distkl.bounded`, the JSD mixture router).
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Categorical, Distribution, MixtureSameFamily, OneHotCategorical

from distkl._checks import batch_shape_of, unsupported
from distkl._logspace import js_from_log_probs, kl_from_log_probs, safe_logsumexp
from distkl._torch_compat import exact_log_probs

__all__ = [
    "SUPPORTED",
    "categorical_log_probs",
    "is_categorical_family",
    "js_categorical_family",
    "kl_categorical_mixture_pair",
]

#: The categorical families, as named in error messages.
SUPPORTED = (
    "Categorical",
    "OneHotCategorical",
    "MixtureSameFamily(Categorical)",
    "MixtureSameFamily(OneHotCategorical)",
)

_BASE = (Categorical, OneHotCategorical)


def is_categorical_family(d: Distribution) -> bool:
    """True for `Categorical`, `OneHotCategorical` (and subclasses) and mixtures of those."""
    if isinstance(d, _BASE):
        return True
    return isinstance(d, MixtureSameFamily) and isinstance(d.component_distribution, _BASE)


def _base_log_probs(d: Categorical | OneHotCategorical) -> Tensor:
    """Normalised log-probabilities `(*batch, K)` from the parameter `d` was built with."""
    cat = d._categorical if isinstance(d, OneHotCategorical) else d
    return exact_log_probs(cat)


def categorical_log_probs(d: Distribution) -> Tensor:
    r"""Normalised log-probabilities `(*batch, K)` of a categorical-family distribution.

    For a mixture with weights $w_j$ and categorical components $p_j$,

    $$
    \log p(k) = \operatorname{logsumexp}_j \big(\log w_j + \log p_j(k)\big).
    $$

    Zero probabilities are `-inf` exactly, with zero (not NaN) gradients; NaN stays NaN.

    Args:
        d: a distribution in `SUPPORTED`.

    Returns:
        Tensor of shape `(*batch, K)`; for a mixture, `batch` broadcasts the mixing and
        component batch shapes.

    Raises:
        NotImplementedError: for any other family, listing `SUPPORTED`.
    """
    if isinstance(d, _BASE):
        return _base_log_probs(d)
    if isinstance(d, MixtureSameFamily):
        comp = d.component_distribution
        if isinstance(comp, _BASE):
            log_w = _base_log_probs(d.mixture_distribution)  # (*b, J)
            log_c = _base_log_probs(comp)  # (*b, J, K)
            return safe_logsumexp(log_w.unsqueeze(-1) + log_c, dim=-2)
    raise unsupported("a categorical divergence", d, SUPPORTED)


def kl_categorical_mixture_pair(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats, exact, for any two categorical-family distributions (mixtures included).

    $$
    \mathrm{KL}(p \| q) = \sum_k p(k) \big(\log p(k) - \log q(k)\big)
    $$

    on the collapsed log-probabilities (`categorical_log_probs`), with $0 \log 0 = 0$ and
    `+inf` where $q(k) = 0 < p(k)$.

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26);
    a finite mixture of categoricals is categorical with $p(k) = \sum_j w_j p_j(k)$.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        NotImplementedError: if either side is not in `SUPPORTED`.
        ValueError: batch shapes that do not broadcast, or different numbers of categories.
    """
    batch_shape_of(p, q)
    return kl_from_log_probs(categorical_log_probs(p), categorical_log_probs(q), dim=-1)


def js_categorical_family(p: Distribution, q: Distribution, alpha: float) -> Tensor:
    r"""JS_alpha(p, q) in nats, exact, for any two categorical-family distributions.

    $$
    \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m),
    \quad m = \alpha p + (1-\alpha) q
    $$

    on the collapsed log-probabilities (`categorical_log_probs`), in $[0, H(\alpha)]$.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1), eq. (4.1).

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        NotImplementedError: if either side is not in `SUPPORTED`.
        ValueError: batch shapes that do not broadcast, or different numbers of categories.
    """
    batch_shape_of(p, q)
    return js_from_log_probs(categorical_log_probs(p), categorical_log_probs(q), skew=alpha)
