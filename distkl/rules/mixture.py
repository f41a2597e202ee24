r"""KL and JSD rules for Gaussian families and mixtures, computed by the method in force.

No closed form exists for the KL divergence between Gaussian mixtures, nor for the JSD of even
two Gaussians, so **every rule here returns an estimate**, not an exact value. One method table
serves KL and JSD; what `kl_divergence(p, q)` and `js_divergence(p, q)` compute is chosen by
[`distkl.options`][distkl.options] (`distkl.get_options().method`):

| method | KL | JSD |
|---|---|---|
| `"auto"` (default) | `"quadrature"` for 1-D events (event shape `()`), else `"mc"` | the same |
| `"mc"` | `distkl.kl_mc`'s value (unbiased, random; see below) | `distkl.jsd_mc` |
| `"quadrature"` | `distkl.kl_quadrature` (deterministic, 1-D events) | `distkl.jsd_quadrature` |
| `"variational"` | `distkl.kl_variational` (Hershey & Olsen 2007; biased) | none: `ValueError` |
| `"unscented"` | `distkl.kl_unscented` (deterministic, biased) | none: `ValueError` |

The `"mc"` rule needs no standard error, so for a mixture of diagonal components against one
Normal-family distribution (the prior-against-posterior direction of a VAE) it computes
$\sum_k w_k [\mathrm{KL}(p_k \| q) + \mathbb{E}_{p_k}[\log p - \log p_k]]$ (`distkl._reverse`):
the cross term exact, the mixture's own entropy from draws of the components shared by the
batch. It is unbiased like `kl_mc` (which keeps the stratified engine, whose standard error is
honest), with an exact gradient in q's parameters.

Monte Carlo takes `num_samples`, `generator` and `chunk_size` from the options,
quadrature `quadrature_nodes`. A method with no JSD counterpart raises instead of silently
running another.

Registered KL pairs (both directions of each cross pair): (MixtureSameFamily, MixtureSameFamily),
and MixtureSameFamily against Normal, Independent, MultivariateNormal and
LowRankMultivariateNormal. JSD pairs: the same, plus every pair of single Normal-family
distributions whose event shapes can agree. Components may be Normal, Independent(Normal, 1),
MultivariateNormal or LowRankMultivariateNormal (or subclasses). Two mixtures of Categorical /
OneHotCategorical components, and a categorical mixture against a categorical, are exact and
handed to `distkl._categorical`. The mixture-vs-mixture rules' kind is decided per call
(`registry.PerCallKind`): exact for categorical components, an estimate otherwise.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

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

from distkl._categorical import (
    is_categorical_family,
    js_categorical_family,
    kl_categorical_mixture_pair,
)
from distkl._checks import batch_shape_of, check_same_event_shape, describe, unsupported
from distkl._gaussian import SUPPORTED_COMPONENTS, is_gaussian_family
from distkl._options import Options, get_options
from distkl.approx import kl_unscented, kl_variational
from distkl.montecarlo import jsd_mc, kl_mc_value
from distkl.quadrature import jsd_quadrature, kl_quadrature
from distkl.registry import PerCallKind, register_jsd, register_kl

__all__: list[str] = []

_GAUSSIAN = [*SUPPORTED_COMPONENTS, *(f"MixtureSameFamily({c})" for c in SUPPORTED_COMPONENTS)]
_CATEGORICAL = ["MixtureSameFamily(Categorical)", "MixtureSameFamily(OneHotCategorical)"]

#: Families with a JSD rule, as named in error messages.
JSD_SUPPORTED = (
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
_MULTIVARIATE_TYPES = (Independent, MultivariateNormal, LowRankMultivariateNormal)


# ---- the method table --------------------------------------------------------------------------


def _kl_by_mc(p: Distribution, q: Distribution, opts: Options) -> Tensor:
    return kl_mc_value(
        p, q, num_samples=opts.num_samples, generator=opts.generator, chunk_size=opts.chunk_size
    )


def _jsd_by_mc(p: Distribution, q: Distribution, alpha: float, opts: Options) -> Tensor:
    return jsd_mc(
        p,
        q,
        skew=alpha,
        num_samples=opts.num_samples,
        generator=opts.generator,
        chunk_size=opts.chunk_size,
    ).value


def _kl_by_quadrature(p: Distribution, q: Distribution, opts: Options) -> Tensor:
    return kl_quadrature(p, q, nodes=opts.quadrature_nodes)


def _jsd_by_quadrature(p: Distribution, q: Distribution, alpha: float, opts: Options) -> Tensor:
    return jsd_quadrature(p, q, skew=alpha, nodes=opts.quadrature_nodes)


def _kl_by_variational(p: Distribution, q: Distribution, opts: Options) -> Tensor:
    return kl_variational(p, q)


def _kl_by_unscented(p: Distribution, q: Distribution, opts: Options) -> Tensor:
    return kl_unscented(p, q)


class Method(NamedTuple):
    """How one `options(method=...)` value computes KL and (if it can) JSD."""

    kl: Callable[[Distribution, Distribution, Options], Tensor]
    jsd: Optional[Callable[[Distribution, Distribution, float, Options], Tensor]]
    scalar_events_only: bool


#: `"auto"` resolves to one of these (see `resolve_method`).
METHODS: dict[str, Method] = {
    "mc": Method(_kl_by_mc, _jsd_by_mc, scalar_events_only=False),
    "quadrature": Method(_kl_by_quadrature, _jsd_by_quadrature, scalar_events_only=True),
    "variational": Method(_kl_by_variational, None, scalar_events_only=False),
    "unscented": Method(_kl_by_unscented, None, scalar_events_only=False),
}


def resolve_method(method: str, p: Distribution, divergence: str) -> Method:
    """The table entry for `method` (`"auto"` resolved by `p`'s event), checked.

    Raises:
        ValueError: `"quadrature"` with a non-scalar event, or a method without a
            `divergence` (`"KL"` or `"JSD"`) counterpart.
    """
    scalar = len(p.event_shape) == 0
    if method == "auto":
        method = "quadrature" if scalar else "mc"
    entry = METHODS[method]
    if entry.scalar_events_only and not scalar:
        raise ValueError(
            f"method='{method}' needs a 1-D event (event shape ()), got event shape "
            f"{tuple(p.event_shape)}; use method='auto' or 'mc'"
            + (", 'variational' or 'unscented'." if divergence == "KL" else ".")
        )
    if divergence == "JSD" and entry.jsd is None:
        raise ValueError(
            f"method='{method}' approximates KL only and has no JSD counterpart; for "
            "js_divergence use method='auto', 'mc' or 'quadrature' (1-D events)."
        )
    return entry


def _check_gaussian_pair(p: Distribution, q: Distribution, what: str) -> None:
    for role, d in (("p", p), ("q", q)):
        if not is_gaussian_family(d):
            supported = _GAUSSIAN if what == "KL" else JSD_SUPPORTED
            raise unsupported(f"{what} with {role}" if what != "KL" else role, d, supported)
    check_same_event_shape(p, q)
    batch_shape_of(p, q)


# ---- KL ----------------------------------------------------------------------------------------


def kl_gaussian_mixture(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats for Gaussian-family distributions and mixtures: an **estimate**.

    $$
    \mathrm{KL}(p \| q) = \int p(x) \log \frac{p(x)}{q(x)}\, dx,
    \quad p = \sum_k w_k\, \mathcal{N}(\mu_k, \Sigma_k),\ q = \sum_j v_j\, \mathcal{N}(m_j, S_j)
    $$

    has no closed form; the value is computed by the method in force (see the module
    docstring's table).

    Source: Hershey & Olsen (2007), "Approximating the Kullback Leibler divergence between
    Gaussian mixture models", ICASSP, eq. (4) (Monte Carlo) and the methods cited there.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        NotImplementedError: for component families other than the Gaussian ones.
        ValueError: for different event shapes, non-broadcasting batch shapes, or
            `method="quadrature"` with a multivariate event.
    """
    _check_gaussian_pair(p, q, "KL")
    opts = get_options()
    return resolve_method(opts.method, p, "KL").kl(p, q, opts)


def _is_categorical_mixture(d: Distribution) -> bool:
    return isinstance(d, MixtureSameFamily) and isinstance(
        d.component_distribution, (Categorical, OneHotCategorical)
    )


def _mixture_pair_kind(p: Distribution, q: Distribution) -> str:
    """Exact (closed form) for two categorical mixtures, else an estimate by the method in force."""
    return "exact" if _is_categorical_mixture(p) and _is_categorical_mixture(q) else "estimate"


_MIXTURE_KIND = PerCallKind(
    _mixture_pair_kind, "exact for categorical components, estimate otherwise"
)


@register_kl(MixtureSameFamily, MixtureSameFamily, kind=_MIXTURE_KIND, on_conflict="skip")
def _kl_mixture_mixture(p: MixtureSameFamily, q: MixtureSameFamily) -> Tensor:
    r"""KL(p || q) in nats between two mixtures: an estimate by the method in force.

    Gaussian-family components: `kl_gaussian_mixture`. Categorical / OneHotCategorical
    components on both sides (exact): `distkl.rules.categorical.kl_categorical_mixture_pair`.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    if _is_categorical_mixture(p) and _is_categorical_mixture(q):
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
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    return kl_gaussian_mixture(p, q)


# ---- JSD ---------------------------------------------------------------------------------------


def jsd_gaussian(p: Distribution, q: Distribution, alpha: float) -> Tensor:
    r"""JS_alpha(p, q) in nats of Normal-family distributions or Gaussian mixtures: an estimate.

    $$
    \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m),
    \quad m = \alpha p + (1-\alpha) q
    $$

    has no closed form (not even for two Normals): computed by the method in force (the module
    docstring's table); `"variational"` and `"unscented"` have no JSD counterpart and raise.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1), eq. (4.1).

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`, in
        $[0, H(\alpha)]$.

    Raises:
        NotImplementedError: for a family other than the Normal ones.
        ValueError: different event shapes; `method="quadrature"` with a non-scalar event;
            `method="variational"` or `"unscented"`.
    """
    _check_gaussian_pair(p, q, "JSD")
    opts = get_options()
    jsd = resolve_method(opts.method, p, "JSD").jsd
    assert jsd is not None  # resolve_method raised otherwise
    return jsd(p, q, alpha, opts)


# Only type pairs whose event shapes can agree: Normal (event ()) pairs with Normal alone.
register_jsd(Normal, Normal, kind="estimate")(jsd_gaussian)
for _tp in _MULTIVARIATE_TYPES:
    for _tq in _MULTIVARIATE_TYPES:
        register_jsd(_tp, _tq, kind="estimate")(jsd_gaussian)
del _tp, _tq


@register_jsd(MixtureSameFamily, Categorical, kind="exact")
@register_jsd(Categorical, MixtureSameFamily, kind="exact")
@register_jsd(MixtureSameFamily, OneHotCategorical, kind="exact")
@register_jsd(OneHotCategorical, MixtureSameFamily, kind="exact")
@register_jsd(MixtureSameFamily, MixtureSameFamily, kind=_MIXTURE_KIND)
@register_jsd(MixtureSameFamily, Normal, kind="estimate")
@register_jsd(Normal, MixtureSameFamily, kind="estimate")
@register_jsd(MixtureSameFamily, Independent, kind="estimate")
@register_jsd(Independent, MixtureSameFamily, kind="estimate")
@register_jsd(MixtureSameFamily, MultivariateNormal, kind="estimate")
@register_jsd(MultivariateNormal, MixtureSameFamily, kind="estimate")
@register_jsd(MixtureSameFamily, LowRankMultivariateNormal, kind="estimate")
@register_jsd(LowRankMultivariateNormal, MixtureSameFamily, kind="estimate")
def _jsd_mixture(p: Distribution, q: Distribution, alpha: float) -> Tensor:
    r"""JS_alpha(p, q) in nats where p or q is a `MixtureSameFamily`: dispatch on the components.

    Mixtures of categoricals collapse to one categorical each,
    $\log p(k) = \operatorname{logsumexp}_j(\log w_j + \log p_j(k))$, and the JSD against a
    categorical or another such mixture is exact (`distkl._categorical.js_categorical_family`);
    Gaussian families are estimated by `jsd_gaussian`.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1), eq. (4.1).

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        NotImplementedError: for other component families or a categorical/Gaussian mix.
    """
    if is_categorical_family(p) and is_categorical_family(q):
        return js_categorical_family(p, q, alpha)
    if is_gaussian_family(p) and is_gaussian_family(q):
        return jsd_gaussian(p, q, alpha)
    for role, d in (("p", p), ("q", q)):
        if not (is_categorical_family(d) or is_gaussian_family(d)):
            raise unsupported(f"JSD with {role}", d, JSD_SUPPORTED)
    raise NotImplementedError(
        f"distkl has no JSD rule between p of type {describe(p)} and q of type {describe(q)}: "
        "both must be categorical-family or both Gaussian-family. Supported: "
        f"{', '.join(JSD_SUPPORTED)}."
    )
