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
from typing import Callable, Optional

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
    batch_shape_of,
    check_same_event_shape,
    check_skew,
    describe,
    unsupported,
)
from distkl._gaussian import as_gaussian_mixture, is_gaussian_family
from distkl._logspace import clamp_to_js_range, js_from_log_probs, log_ratio_to_mix
from distkl._options import get_options
from distkl.density import GaussianScorer
from distkl.montecarlo import Estimate, expectation
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
# Per-point bounded terms shared by Monte Carlo and quadrature.


def _bounded_terms(log_p: Tensor, log_q: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    r"""Per-point terms ``(u, v)`` in ``[0, -log alpha]`` and ``[0, -log(1-alpha)]``.

    With the posterior :math:`\pi(x) = \alpha p(x) / m(x)` that ``x`` came from ``p``,
    :math:`L(\pi) = -\pi\log\alpha - (1-\pi)\log(1-\alpha)` and
    :math:`\rho = \mathrm{kl}(\pi \| \alpha) / L(\pi) = 1 - H_b(\pi)/L(\pi) \in [0, 1]`,

    .. math::
        u = -\log\alpha\;\rho(\pi), \qquad v = -\log(1-\alpha)\;\rho(\pi),
        \qquad \alpha\,\mathbb{E}_p[u] + (1-\alpha)\,\mathbb{E}_q[v] = \mathrm{JS}_\alpha(p, q),

    because :math:`\pi u + (1-\pi) v = \mathrm{kl}(\pi \| \alpha)` and
    :math:`\mathbb{E}_m[\mathrm{kl}(\pi\|\alpha)] = \mathrm{JS}_\alpha`. At ``alpha = 1/2``,
    ``u = v = log 2 - H_b(pi)``. The Bernoulli KL is evaluated from
    :math:`\delta = \log p - \log q` as
    :math:`\pi \log\frac{\pi}{\alpha} + (1-\pi)\log\frac{1-\pi}{1-\alpha}` with
    :math:`\log\frac{\pi}{\alpha} = -\log(1 + (1-\alpha)(e^{-\delta} - 1))` and
    :math:`\log\frac{1-\pi}{1-\alpha} = -\log(1 + \alpha(e^{\delta} - 1))`, so it is exactly 0
    where ``p(x) = q(x)`` (``p = q`` gives exactly 0) and accurate near it.
    """
    # |delta| > 1e4 changes nothing visible (pi is 0 or 1 to any precision); +-inf (a point
    # outside one support) would give 0 * inf.
    delta = (log_p - log_q).clamp(-1e4, 1e4)
    pi = torch.sigmoid(math.log(alpha) - math.log1p(-alpha) + delta)
    kl = pi * log_ratio_to_mix(-delta, 1.0 - alpha) + (1.0 - pi) * log_ratio_to_mix(delta, alpha)
    cross = -(pi * math.log(alpha) + (1.0 - pi) * math.log1p(-alpha))  # L(pi) >= kl(pi || alpha)
    rho = (kl / cross).clamp(0.0, 1.0)
    return -math.log(alpha) * rho, -math.log1p(-alpha) * rho


# --------------------------------------------------------------------------------------------
# Monte Carlo.


def _log_density(d: Distribution) -> Callable[[Tensor], Tensor]:
    """``d``'s log-density as a function of ``x (n, *batch, *event)``; GEMM-based for Gaussians."""
    if is_gaussian_family(d):
        return GaussianScorer(as_gaussian_mixture(d)).log_prob
    return d.log_prob


def jsd_mc(
    p: Distribution,
    q: Distribution,
    *,
    skew: float = 0.5,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> Estimate:
    r"""Monte Carlo estimate of JS_alpha(p, q) in nats with its standard error, in [0, H(alpha)].

    Samples come from both ``p`` and ``q`` (``num_samples`` each), and each point's term depends
    only on :math:`\pi(x) = \alpha p(x) / m(x)`, the posterior probability that ``x`` came from
    ``p``:

    .. math::
        \widehat{\mathrm{JS}}_\alpha = \frac{\alpha}{n}\sum_{x_i \sim p} u(\pi(x_i))
        + \frac{1-\alpha}{n}\sum_{y_j \sim q} v(\pi(y_j)),\quad
        u = -\log\alpha\,\rho,\; v = -\log(1-\alpha)\,\rho,\;
        \rho = 1 - \frac{H_b(\pi)}{-\pi\log\alpha - (1-\pi)\log(1-\alpha)}

    It is unbiased (:math:`\pi u + (1-\pi) v = \mathrm{kl}(\pi \| \alpha)` and
    :math:`\mathbb{E}_m[\mathrm{kl}(\pi\|\alpha)] = \mathrm{JS}_\alpha`), and since
    :math:`\rho \in [0, 1]` every estimate, even from a handful of samples, lies in
    :math:`[0, \alpha(-\log\alpha) + (1-\alpha)(-\log(1-\alpha))] = [0, H(\alpha)]`, with no
    clamping; it is exactly 0 when ``p = q``. At ``alpha = 1/2`` the terms are
    :math:`\log 2 - H_b(\pi)`, the "discriminator" form of the JSD; against averaging
    :math:`\log(p/m)` and :math:`\log(q/m)` it cuts the variance several-fold
    (``benchmarks/bench_jsd_mc.py``).

    Both expectations run on :func:`distkl.montecarlo.expectation` without control variates
    (which could leave the range): stratified over mixture components with proportional
    allocation (at least 2 per component), chunked, reparameterized for Gaussian families
    (pathwise gradients, exact ones for the mixture weights) and any ``rsample`` family, with a
    score-function term otherwise. ``p`` and ``q`` need ``log_prob`` on each other's samples.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1) for the divergence; the posterior form
    :math:`\mathrm{JS}_{1/2} = \log 2 - \mathbb{E}_m[H_b(\pi)]` is that of Goodfellow et al.
    (2014), "Generative adversarial nets", Theorem 1.

    Args:
        p: the first distribution.
        q: the second distribution, with the same event shape and a batch shape that
            broadcasts with ``p``'s.
        skew: ``alpha`` in (0, 1), the weight of ``p`` in ``m``.
        num_samples: draws from each of ``p`` and ``q`` per batch element (default: the
            :func:`distkl.options` value).
        generator: :class:`torch.Generator` on the parameters' device, for reproducibility
            (default: the options' generator, else torch's global one).

    Returns:
        :class:`~distkl.montecarlo.Estimate` whose ``value`` and ``stderr`` (detached) have shape
        ``broadcast_shapes(p.batch_shape, q.batch_shape)``; its ``num_samples`` counts the draws
        from ``p`` and ``q`` together (``2 * num_samples``).

    Raises:
        ValueError: bad ``skew`` or ``num_samples`` (fewer than 2 per mixture component),
            different event shapes, batch shapes that do not broadcast.
        TypeError: ``generator`` is not a :class:`torch.Generator`.
    """
    alpha = check_skew(skew)
    opts = get_options()
    n = opts.num_samples if num_samples is None else num_samples
    gen = opts.generator if generator is None else generator
    check_same_event_shape(p, q)
    batch_shape = batch_shape_of(p, q)
    log_p, log_q = _log_density(p), _log_density(q)

    def u(x: Tensor) -> Tensor:
        return _bounded_terms(log_p(x), log_q(x), alpha)[0]

    def v(x: Tensor) -> Tensor:
        return _bounded_terms(log_p(x), log_q(x), alpha)[1]

    e_p, e_q = (
        expectation(
            d,
            f,
            num_samples=n,
            generator=gen,
            chunk_size=opts.chunk_size,
            batch_shape=batch_shape,
            control_variates=False,
        )
        for d, f in ((p, u), (q, v))
    )
    value = alpha * e_p.value + (1.0 - alpha) * e_q.value
    var = alpha**2 * e_p.stderr.square() + (1.0 - alpha) ** 2 * e_q.stderr.square()
    # The value is a convex combination of terms in [0, H(alpha)]: the clamp only removes
    # rounding excursions.
    return Estimate(clamp_to_js_range(value, alpha), var.sqrt(), e_p.num_samples + e_q.num_samples)


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
