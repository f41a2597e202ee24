r"""Exact KL and JSD rules for Categorical, OneHotCategorical and mixtures of categoricals.

torch has KL `Categorical-Categorical` and `OneHotCategorical-OneHotCategorical` and distkl
leaves them alone. This module registers the KL pairs torch lacks:

* `Categorical <-> OneHotCategorical` (subclasses such as `OneHotCategoricalStraightThrough`
  reach these by dispatch);
* `MixtureSameFamily <-> Categorical` and `MixtureSameFamily <-> OneHotCategorical` for
  mixtures whose components are `Categorical` or `OneHotCategorical`;

and the JSD of every pair of `Categorical` and `OneHotCategorical`. A mixture of categoricals
over `K` categories is itself categorical,

$$
\log p(k) = \operatorname{logsumexp}_j \big(\log w_j + \log p_j(k)\big),
$$

so every pair here is an exact closed form. `(MixtureSameFamily, MixtureSameFamily)` and the
JSD pairs with a mixture are registered in `distkl.rules.mixture`, which calls the same functions
(`distkl._categorical`) when both sides are categorical.

Values and gradients follow the kernel `distkl._logspace`: $0 \log 0 = 0$, `+inf` (never
NaN) where $q = 0 < p$, NaN in gives NaN out, finite gradients. Note that torch's own
`Categorical-Categorical` rule, which distkl does not replace, backpropagates NaN where
$q = 0 < p$; `distkl.functional.kl_divergence` and `distkl.bounded_kl` do not.
"""

from __future__ import annotations

from torch import Tensor
from torch.distributions import Categorical, Distribution, MixtureSameFamily, OneHotCategorical

from distkl._categorical import js_categorical_family, kl_categorical_mixture_pair
from distkl.registry import register_jsd, register_kl

__all__: list[str] = []


@register_kl(Categorical, OneHotCategorical, kind="exact", on_conflict="skip")
@register_kl(OneHotCategorical, Categorical, kind="exact", on_conflict="skip")
def _kl_categorical_onehotcategorical(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats of a Categorical and a OneHotCategorical (either order), exact.

    $$
    \mathrm{KL}(p \| q) = \sum_{k=1}^K p_k \log \frac{p_k}{q_k}
    $$

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26).

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        ValueError: batch shapes that do not broadcast, or different numbers of categories.
    """
    return kl_categorical_mixture_pair(p, q)


@register_kl(MixtureSameFamily, Categorical, kind="exact", on_conflict="skip")
@register_kl(Categorical, MixtureSameFamily, kind="exact", on_conflict="skip")
@register_kl(MixtureSameFamily, OneHotCategorical, kind="exact", on_conflict="skip")
@register_kl(OneHotCategorical, MixtureSameFamily, kind="exact", on_conflict="skip")
def _kl_categorical_mixture(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats, a mixture of categoricals against a categorical or back, exact.

    $$
    \mathrm{KL}(p \| q) = \sum_k p(k) \log \frac{p(k)}{q(k)}, \qquad
    p(k) = \sum_j w_j p_j(k) \text{ for a mixture (likewise } q\text{)}
    $$

    Dispatch is by type only: every `MixtureSameFamily` lands here, and only categorical
    components are handled.

    Source: Cover & Thomas (2006), *Elements of Information Theory*, 2nd ed., eq. (2.26).

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        NotImplementedError: if the mixture's components are not Categorical/OneHotCategorical.
        ValueError: batch shapes that do not broadcast, or different numbers of categories.
    """
    return kl_categorical_mixture_pair(p, q)


@register_jsd(Categorical, Categorical, kind="exact")
@register_jsd(OneHotCategorical, OneHotCategorical, kind="exact")
@register_jsd(Categorical, OneHotCategorical, kind="exact")
@register_jsd(OneHotCategorical, Categorical, kind="exact")
def _jsd_categorical(p: Distribution, q: Distribution, alpha: float) -> Tensor:
    r"""JS_alpha(p, q) in nats of two categoricals (indices or one-hot), exact.

    $$
    \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m),
    \quad m = \alpha p + (1-\alpha) q
    $$

    From the parameter each was built with (zeros exact), in $[0, H(\alpha)]$.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1), eq. (4.1).

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        ValueError: batch shapes that do not broadcast, or different numbers of categories.
    """
    return js_categorical_family(p, q, alpha)
