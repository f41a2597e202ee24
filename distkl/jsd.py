r"""Jensen-Shannon rules for :func:`distkl.js_divergence`, and the estimator :func:`jsd_mc`.

Conventions. With skew :math:`\alpha \in (0, 1)` and :math:`m = \alpha p + (1-\alpha) q`,

.. math::
    \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m)
    \quad\text{(nats)},

:math:`0 \le \mathrm{JS}_\alpha \le H(\alpha) = -\alpha\log\alpha - (1-\alpha)\log(1-\alpha)`,
with equality on the right exactly for disjoint supports (:math:`\log 2` at
:math:`\alpha = 1/2`, the usual JSD), and :math:`\mathrm{JS}_\alpha(p, q) =
\mathrm{JS}_{1-\alpha}(q, p)`. TensorFlow Probability's ``jensen_shannon`` is twice this.

Registered rules (``register_jsd``; dispatch by type, most specific match):

* **exact** -- ``Categorical``, ``OneHotCategorical`` (and subclasses) and ``MixtureSameFamily``
  of those, in every combination. A categorical mixture collapses to one categorical,
  :math:`\log p(k) = \operatorname{logsumexp}_j(\log w_j + \log p_j(k))`.
* **estimate** -- ``Normal``, ``Independent(Normal, 1)``, ``MultivariateNormal``,
  ``LowRankMultivariateNormal`` and ``MixtureSameFamily`` of those. There is no closed form for
  the JSD of two Gaussians, so these compute by the method in force (:func:`distkl.options`):
  ``"auto"`` uses composite Gauss-Legendre quadrature for 1-D events (event shape ``()``,
  :func:`distkl.quadrature.jsd_quadrature`) and Monte Carlo
  (:func:`jsd_mc` with the options' ``num_samples`` and ``generator``) otherwise;
  ``"quadrature"`` forces quadrature (1-D events only, ``ValueError`` otherwise); ``"mc"`` forces
  Monte Carlo. ``"variational"`` and ``"unscented"`` are KL approximations with no JSD
  counterpart: under them the Gaussian JSD rules raise ``ValueError``. These rules live in
  :mod:`distkl.rules.mixture`.

``(MixtureSameFamily, X)`` rules receive every mixture and dispatch on the component family;
others raise ``NotImplementedError`` listing the supported families.
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.distributions import (
    Categorical,
    Distribution,
    MixtureSameFamily,
    OneHotCategorical,
)

from distkl._checks import (
    batch_shape_of,
    describe,
    unsupported,
)
from distkl._gaussian import is_gaussian_family
from distkl.functional import js_from_log_probs
from distkl.montecarlo import jsd_mc
from distkl.registry import register_jsd
from distkl.rules.categorical import categorical_log_probs, is_categorical_family

__all__ = ["jsd_mc", "js_from_log_probs", "SUPPORTED"]

#: Families with a JSD rule, as named in error messages.
SUPPORTED = (
    "Categorical",
    "OneHotCategorical",
    "MixtureSameFamily(Categorical)",
    "MixtureSameFamily(OneHotCategorical)",
    "Normal",
    "Independent(Normal, 1)",
    "MultivariateNormal",
    "LowRankMultivariateNormal",
    "MixtureSameFamily(Normal | Independent(Normal, 1) | MultivariateNormal | "
    "LowRankMultivariateNormal)",
)

_NEG_INF = -math.inf


# --------------------------------------------------------------------------------------------
# Range: every JSD value distkl returns lies in [0, H(alpha)].


# --------------------------------------------------------------------------------------------
# Categorical: exact, from normalised log-probabilities.


# --------------------------------------------------------------------------------------------
# Registered rules.


@register_jsd(Categorical, Categorical, kind="exact")
@register_jsd(OneHotCategorical, OneHotCategorical, kind="exact")
@register_jsd(Categorical, OneHotCategorical, kind="exact")
@register_jsd(OneHotCategorical, Categorical, kind="exact")
def _jsd_categorical(p: Distribution, q: Distribution, alpha: float) -> Tensor:
    r"""JS_alpha(p, q) in nats of two categoricals (indices or one-hot), exact.

    .. math::
        \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m),
        \quad m = \alpha p + (1-\alpha) q

    Computed by :func:`js_from_log_probs` from the parameter each was built with (zeros exact).

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1), eq. (4.1).

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.
    """
    batch_shape_of(p, q)
    return js_from_log_probs(categorical_log_probs(p), categorical_log_probs(q), skew=alpha)


@register_jsd(MixtureSameFamily, Categorical, kind="exact")
@register_jsd(Categorical, MixtureSameFamily, kind="exact")
@register_jsd(MixtureSameFamily, OneHotCategorical, kind="exact")
@register_jsd(OneHotCategorical, MixtureSameFamily, kind="exact")
def _jsd_mixture(p: Distribution, q: Distribution, alpha: float) -> Tensor:
    r"""JS_alpha(p, q) in nats of a ``MixtureSameFamily`` and a categorical: exact.

    Mixtures of categoricals collapse to one categorical,
    :math:`\log p(k) = \operatorname{logsumexp}_j(\log w_j + \log p_j(k))`, and the JSD is
    exact (:func:`_jsd_categorical`). Gaussian families and mixtures of them: see
    :mod:`distkl.rules.mixture`.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1).

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.

    Raises:
        NotImplementedError: for other component families or a categorical/Gaussian mix,
            listing :data:`SUPPORTED`.
    """
    if is_categorical_family(p) and is_categorical_family(q):
        return _jsd_categorical(p, q, alpha)
    for role, d in (("p", p), ("q", q)):
        if not (is_categorical_family(d) or is_gaussian_family(d)):
            raise unsupported(f"JSD with {role}", d, SUPPORTED)
    raise NotImplementedError(
        f"distkl has no JSD rule between p of type {describe(p)} and q of type {describe(q)}: "
        "both must be categorical-family or both Gaussian-family. Supported: "
        f"{', '.join(SUPPORTED)}."
    )
