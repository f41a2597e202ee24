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
  counterpart: under them JSD rules behave as under ``"auto"``.

``(MixtureSameFamily, X)`` rules receive every mixture and dispatch on the component family;
others raise ``NotImplementedError`` listing the supported families.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    OneHotCategorical,
)

from distkl._categorical import is_categorical_family, js_categorical_family
from distkl._checks import (
    check_same_event_shape,
    describe,
    unsupported,
)
from distkl._gaussian import is_gaussian_family
from distkl._logspace import clamp_to_js_range, js_from_log_probs
from distkl._options import get_options
from distkl.montecarlo import jsd_mc
from distkl.quadrature import jsd_quadrature
from distkl.registry import register_jsd

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
# Quadrature for 1-D events: distkl.quadrature.jsd_quadrature (composite Gauss-Legendre).


def _quadrature(p: Distribution, q: Distribution, alpha: float, nodes: int) -> Tensor:
    return clamp_to_js_range(jsd_quadrature(p, q, skew=alpha, nodes=nodes), alpha)


# --------------------------------------------------------------------------------------------
# Registered rules.

_MULTIVARIATE_TYPES = (Independent, MultivariateNormal, LowRankMultivariateNormal)


def _jsd_gaussian(p: Distribution, q: Distribution, alpha: float) -> Tensor:
    r"""JS_alpha(p, q) in nats of Normal-family distributions or Gaussian mixtures: an estimate.

    No closed form exists (not even for two Normals). By the method in force
    (:func:`distkl.options`): composite Gauss-Legendre quadrature with about
    ``quadrature_nodes`` nodes per component for 1-D events under ``"auto"``/``"quadrature"``
    (``"variational"`` and ``"unscented"``, which have no JSD counterpart, act as ``"auto"``),
    Monte Carlo
    (:func:`jsd_mc`) otherwise.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1).

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``, in
        :math:`[0, H(\alpha)]`.

    Raises:
        NotImplementedError: for a family other than the Normal ones (e.g. ``Independent`` of
            a non-Normal), listing :data:`SUPPORTED`.
        ValueError: different event shapes; ``method="quadrature"`` with a non-scalar event.
    """
    for role, d in (("p", p), ("q", q)):
        if not is_gaussian_family(d):
            raise unsupported(f"JSD with {role}", d, SUPPORTED)
    check_same_event_shape(p, q)
    opts = get_options()
    one_d = p.event_shape == torch.Size()
    if opts.method == "quadrature" and not one_d:
        raise ValueError(
            "method='quadrature' needs 1-D events (event shape ()), got event shape "
            f"{tuple(p.event_shape)}; use method='auto' or 'mc'."
        )
    if one_d and opts.method != "mc":
        return _quadrature(p, q, alpha, opts.quadrature_nodes)
    return jsd_mc(p, q, skew=alpha, num_samples=opts.num_samples, generator=opts.generator).value


# Only type pairs whose event shapes can agree: Normal (event ()) pairs with Normal alone.
register_jsd(Normal, Normal, kind="estimate")(_jsd_gaussian)
for _tp in _MULTIVARIATE_TYPES:
    for _tq in _MULTIVARIATE_TYPES:
        register_jsd(_tp, _tq, kind="estimate")(_jsd_gaussian)
del _tp, _tq


@register_jsd(MixtureSameFamily, Categorical, kind="exact")
@register_jsd(Categorical, MixtureSameFamily, kind="exact")
@register_jsd(MixtureSameFamily, OneHotCategorical, kind="exact")
@register_jsd(OneHotCategorical, MixtureSameFamily, kind="exact")
@register_jsd(MixtureSameFamily, MixtureSameFamily, kind="estimate")
@register_jsd(MixtureSameFamily, Normal, kind="estimate")
@register_jsd(Normal, MixtureSameFamily, kind="estimate")
@register_jsd(MixtureSameFamily, Independent, kind="estimate")
@register_jsd(Independent, MixtureSameFamily, kind="estimate")
@register_jsd(MixtureSameFamily, MultivariateNormal, kind="estimate")
@register_jsd(MultivariateNormal, MixtureSameFamily, kind="estimate")
@register_jsd(MixtureSameFamily, LowRankMultivariateNormal, kind="estimate")
@register_jsd(LowRankMultivariateNormal, MixtureSameFamily, kind="estimate")
def _jsd_mixture(p: Distribution, q: Distribution, alpha: float) -> Tensor:
    r"""JS_alpha(p, q) in nats where p or q is a ``MixtureSameFamily``: dispatch on the components.

    Mixtures of categoricals collapse to one categorical,
    :math:`\log p(k) = \operatorname{logsumexp}_j(\log w_j + \log p_j(k))`, and the JSD is
    exact (:func:`distkl._categorical.js_categorical_family`); Gaussian mixtures are estimated
    by the method in force
    (:func:`_jsd_gaussian`).

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1).

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.

    Raises:
        NotImplementedError: for other component families or a categorical/Gaussian mix,
            listing :data:`SUPPORTED`.
    """
    if is_categorical_family(p) and is_categorical_family(q):
        return js_categorical_family(p, q, alpha)
    if is_gaussian_family(p) and is_gaussian_family(q):
        return _jsd_gaussian(p, q, alpha)
    for role, d in (("p", p), ("q", q)):
        if not (is_categorical_family(d) or is_gaussian_family(d)):
            raise unsupported(f"JSD with {role}", d, SUPPORTED)
    raise NotImplementedError(
        f"distkl has no JSD rule between p of type {describe(p)} and q of type {describe(q)}: "
        "both must be categorical-family or both Gaussian-family. Supported: "
        f"{', '.join(SUPPORTED)}."
    )
