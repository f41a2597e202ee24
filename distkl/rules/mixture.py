r"""KL rules for Gaussian mixtures (``MixtureSameFamily``), computed by the method in force.

No closed form exists for the KL divergence between Gaussian mixtures, so **every rule here
returns an estimate**, not an exact value. What ``kl_divergence(p, q)`` computes is chosen by
:func:`distkl.options` (``distkl.get_options().method``):

* ``"mc"``: :func:`distkl.montecarlo.kl_mc` with ``num_samples``, ``generator`` and
  ``chunk_size`` from the options; unbiased, differentiable, random (returns ``.value``);
* ``"auto"`` (default): ``"quadrature"`` when the event is 1-D (event shape ``()``), else ``"mc"``;
* ``"quadrature"``: :func:`distkl.quadrature.kl_quadrature` with ``quadrature_nodes`` nodes per
  component; deterministic, 1-D events only;
* ``"variational"``: :func:`distkl.approx.kl_variational` (Hershey & Olsen 2007); deterministic,
  biased;
* ``"unscented"``: :func:`distkl.approx.kl_unscented`; deterministic, biased.

Registered pairs (both directions of each cross pair): (MixtureSameFamily, MixtureSameFamily),
and MixtureSameFamily against Normal, Independent, MultivariateNormal and
LowRankMultivariateNormal. Components may be Normal, Independent(Normal, 1), MultivariateNormal or
LowRankMultivariateNormal. Two mixtures of Categorical / OneHotCategorical components are handed
to :func:`distkl.rules.categorical.kl_categorical_mixture_pair`.
"""

from __future__ import annotations

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

from distkl._checks import batch_shape_of, check_same_event_shape, unsupported
from distkl._gaussian import SUPPORTED_COMPONENTS, is_gaussian_family
from distkl._options import get_options
from distkl.registry import PerCallKind, register_kl

__all__ = ["kl_gaussian_mixture"]

_GAUSSIAN = [*SUPPORTED_COMPONENTS, *(f"MixtureSameFamily({c})" for c in SUPPORTED_COMPONENTS)]
_CATEGORICAL = ["MixtureSameFamily(Categorical)", "MixtureSameFamily(OneHotCategorical)"]


def _is_categorical_mixture(d: Distribution) -> bool:
    return isinstance(d, MixtureSameFamily) and isinstance(
        d.component_distribution, (Categorical, OneHotCategorical)
    )


def kl_gaussian_mixture(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats for Gaussian-family distributions and mixtures: an **estimate**.

    .. math::
        \mathrm{KL}(p \| q) = \int p(x) \log \frac{p(x)}{q(x)}\, dx,
        \quad p = \sum_k w_k\, \mathcal{N}(\mu_k, \Sigma_k),\ q = \sum_j v_j\, \mathcal{N}(m_j, S_j)

    has no closed form; the value is computed by the method in force (see the module docstring):
    stratified Monte Carlo (``"mc"``), composite Gauss-Legendre quadrature (``"quadrature"``,
    1-D events), or a deterministic approximation (``"variational"``, ``"unscented"``).

    Source: Hershey & Olsen (2007), "Approximating the Kullback Leibler divergence between
    Gaussian mixture models", ICASSP, eq. (4) (Monte Carlo) and the methods cited there.

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.

    Raises:
        NotImplementedError: for component families other than the Gaussian ones.
        ValueError: for different event shapes, non-broadcasting batch shapes, or
            ``method="quadrature"`` with a multivariate event.
    """
    for role, d in (("p", p), ("q", q)):
        if not is_gaussian_family(d):
            raise unsupported(role, d, _GAUSSIAN)
    check_same_event_shape(p, q)
    batch_shape_of(p, q)
    opts = get_options()
    method = opts.method
    if method == "auto":
        method = "quadrature" if len(p.event_shape) == 0 else "mc"
    if method == "mc":
        from distkl.montecarlo import kl_mc

        return kl_mc(
            p,
            q,
            num_samples=opts.num_samples,
            generator=opts.generator,
            chunk_size=opts.chunk_size,
        ).value
    if method == "quadrature":
        if len(p.event_shape) != 0:
            raise ValueError(
                f"method='quadrature' needs a 1-D event (event shape ()), got event shape "
                f"{tuple(p.event_shape)}; use method='mc', 'variational' or 'unscented'."
            )
        from distkl.quadrature import kl_quadrature

        return kl_quadrature(p, q, nodes=opts.quadrature_nodes)
    if method == "variational":
        from distkl.approx import kl_variational

        return kl_variational(p, q)
    if method == "unscented":
        from distkl.approx import kl_unscented

        return kl_unscented(p, q)
    raise ValueError(f"Unknown method {method!r}.")  # unreachable: Options validates it


def _mixture_pair_kind(p: Distribution, q: Distribution) -> str:
    """Exact (closed form) for two categorical mixtures, else an estimate by the method in force."""
    return "exact" if _is_categorical_mixture(p) and _is_categorical_mixture(q) else "estimate"


_MIXTURE_KIND = PerCallKind(
    _mixture_pair_kind, "exact for categorical components, estimate otherwise"
)


@register_kl(MixtureSameFamily, MixtureSameFamily, kind=_MIXTURE_KIND, on_conflict="skip")
def _kl_mixture_mixture(p: MixtureSameFamily, q: MixtureSameFamily) -> Tensor:
    r"""KL(p || q) in nats between two mixtures: an estimate by the method in force.

    Gaussian-family components: :func:`kl_gaussian_mixture`. Categorical / OneHotCategorical
    components on both sides: :func:`distkl.rules.categorical.kl_categorical_mixture_pair`.

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.
    """
    if _is_categorical_mixture(p) and _is_categorical_mixture(q):
        from distkl._categorical import kl_categorical_mixture_pair

        return kl_categorical_mixture_pair(p, q)
    supported = [*_GAUSSIAN, *_CATEGORICAL]
    for role, d in (("p", p), ("q", q)):
        if not (is_gaussian_family(d) or _is_categorical_mixture(d)):
            raise unsupported(role, d, supported)
    if not (is_gaussian_family(p) and is_gaussian_family(q)):
        raise NotImplementedError(
            "KL(p || q) between a Gaussian mixture and a categorical mixture is not defined "
            f"(different supports); supported pairs: both sides from {', '.join(_GAUSSIAN)}, or "
            f"both from {', '.join(_CATEGORICAL)}."
        )
    return kl_gaussian_mixture(p, q)


@register_kl(MixtureSameFamily, Normal, kind="estimate", on_conflict="skip")
@register_kl(Normal, MixtureSameFamily, kind="estimate", on_conflict="skip")
@register_kl(MixtureSameFamily, Independent, kind="estimate", on_conflict="skip")
@register_kl(Independent, MixtureSameFamily, kind="estimate", on_conflict="skip")
@register_kl(MixtureSameFamily, MultivariateNormal, kind="estimate", on_conflict="skip")
@register_kl(MultivariateNormal, MixtureSameFamily, kind="estimate", on_conflict="skip")
@register_kl(MixtureSameFamily, LowRankMultivariateNormal, kind="estimate", on_conflict="skip")
@register_kl(LowRankMultivariateNormal, MixtureSameFamily, kind="estimate", on_conflict="skip")
def _kl_mixture_single(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats, a Gaussian mixture against one Normal-family distribution or back:
    an estimate by the method in force (see the module docstring).

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.
    """
    return kl_gaussian_mixture(p, q)
