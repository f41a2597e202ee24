"""sympy-derived closed forms: agreement with torch / distkl / mpmath, the cache, timeouts, and
the derive-and-register path for a user's own pair."""

from __future__ import annotations

import math
import time

import mpmath
import pytest
import sympy as sp
import torch
from torch.distributions import (
    Distribution,
    Exponential,
    Independent,
    Laplace,
    Normal,
    constraints,
    kl_divergence,
)

import distkl.rules.categorical  # noqa: F401  (distkl's categorical cross pairs, the reference)
from distkl.registry import lookup_kl, preserved_registries
from distkl.symbolic import (
    FAMILIES,
    DerivationError,
    DerivationTimeout,
    Family,
    cached_pairs,
    derive,
    derive_and_register,
    derive_expr,
    derived_kl,
    family,
    refresh_cache,
)
from distkl.symbolic.derive import _builtin_pairs, _outside_support, _request, _request_key

#: Pairs of built-in families sympy cannot integrate (an incomplete gamma function times log x):
#: derive() raises DerivationError for them, nothing is cached.
UNDERIVABLE = {"Gamma-Laplace"}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _instance(fam: Family, g: torch.Generator, shape=(3,)) -> Distribution:
    kw = {}
    for a in fam.params:
        if a == "loc":
            kw[a] = torch.randn(shape, generator=g, dtype=torch.float64)
        elif a == "probs":
            kw[a] = torch.softmax(2 * torch.randn(*shape, 5, generator=g, dtype=torch.float64), -1)
        else:
            kw[a] = 0.5 + 1.5 * torch.rand(shape, generator=g, dtype=torch.float64)
    return fam.cls(**kw)


def _mp_log_density(fam: Family, d: Distribution, i: int):
    """``log p(x)`` of element ``i`` as an mpmath function, from the family's sympy expression."""
    values = {sp.Symbol(a, **_assumptions(fam, a)): getattr(d, a)[i].item() for a in fam.params}
    expr = fam.log_prob.xreplace({s: sp.Float(values[s], 30) for s in values})
    return sp.lambdify(fam.x, expr, modules="mpmath")


def _assumptions(fam: Family, name: str) -> dict:
    (s,) = [s for s in fam.log_prob.free_symbols if getattr(s, "name", None) == name]
    return s.assumptions0


def _mpmath_kl(fp: Family, fq: Family, p: Distribution, q: Distribution) -> torch.Tensor:
    """KL(p || q) by mpmath quadrature (30 digits), split at the kinks of Laplace densities."""
    mpmath.mp.dps = 30
    out = []
    for i in range(p.batch_shape[0]):
        lp, lq = _mp_log_density(fp, p, i), _mp_log_density(fq, q, i)
        lo, hi = (
            mpmath.mpf(float(b)) if b.is_finite else (mpmath.inf if b > 0 else -mpmath.inf)
            for b in fp.bounds()
        )
        points = [lo]
        for d in (p, q):
            if isinstance(d, Laplace) and lo < d.loc[i].item() < hi:
                points.append(mpmath.mpf(d.loc[i].item()))
        points = sorted(points) + [hi]
        value = mpmath.quad(lambda x, lp=lp, lq=lq: mpmath.exp(lp(x)) * (lp(x) - lq(x)), points)
        out.append(float(value))
    return torch.tensor(out, dtype=torch.float64)


def test_cache_holds_every_derivable_builtin_pair():
    expected = set()
    for fp, fq in _builtin_pairs():
        name = f"{fp.name}-{fq.name}"
        if not _outside_support(fp, fq) and name not in UNDERIVABLE:
            expected.add(name)
    assert set(cached_pairs()) == expected


@pytest.mark.parametrize("name", cached_pairs())
def test_cache_entry_is_fresh(name):
    """The cached form was derived from today's log-densities (so derive() does not re-derive)."""
    from distkl.symbolic.derive import _load_cache

    a, b = name.split("-")
    request, _ = _request(FAMILIES[a], FAMILIES[b])
    assert _load_cache()[name]["request"] == _request_key(request)


@pytest.mark.parametrize("name", cached_pairs())
def test_cached_form_agrees_with_the_reference(name):
    """float64, random parameters: torch's built-in or distkl's rule, else mpmath quadrature."""
    a, b = name.split("-")
    fp, fq = FAMILIES[a], FAMILIES[b]
    g = _gen(sum(map(ord, name)))
    p, q = _instance(fp, g), _instance(fq, g)
    d = derive(a, b)
    value = d(p, q)
    assert value.dtype == torch.float64 and value.shape == (3,)
    try:
        reference = kl_divergence(p, q)
        source = "torch / distkl rule"
    except NotImplementedError:
        reference = _mpmath_kl(fp, fq, p, q)
        source = "mpmath quadrature"
    torch.testing.assert_close(
        value, reference, rtol=1e-10, atol=1e-10, msg=lambda m: f"{name} vs {source}: {m}"
    )


@pytest.mark.parametrize("name", [n for n in FAMILIES if not FAMILIES[n].discrete])
def test_family_log_density_matches_torch(name):
    fam = FAMILIES[name]
    d = _instance(fam, _gen(1))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        x = d.sample((4,))
    for i in range(3):
        f = _mp_log_density(fam, d, i)
        for j in range(4):
            ours = float(f(mpmath.mpf(x[j, i].item())))
            assert ours == pytest.approx(d.log_prob(x)[j, i].item(), rel=1e-12, abs=1e-12)


def test_independent_products_sum_over_the_event():
    g = _gen(2)
    p = Independent(Laplace(torch.randn(4, 3, generator=g, dtype=torch.float64), 1.3), 1)
    q = Independent(Normal(torch.randn(4, 3, generator=g, dtype=torch.float64), 0.8), 1)
    value = derived_kl(p, q)
    assert value.shape == (4,)
    torch.testing.assert_close(value, kl_divergence(p, q), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="Independent"):
        derive("Laplace", "Normal")(p, q.base_dist)


def test_support_not_nested_gives_infinity_like_torch():
    d = derive("Normal", "Exponential")
    assert d.expr == sp.oo
    p, q = Normal(torch.zeros(2, dtype=torch.float64), 1.0), Exponential(torch.ones(2))
    assert torch.equal(d(p, q), kl_divergence(p, q))  # both +inf


def test_derivation_carries_latex_and_pretty_form():
    d = derive("Normal", "Laplace")
    assert "erf" in d.latex and "scale_{q}" in d.latex
    assert "erf" in d.pretty()
    assert d.name == "Normal-Laplace"
    assert "x" not in {s.name for s in d.expr.free_symbols}


def test_unknown_family_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="supported: Normal, Laplace"):
        family("Foo")
    with pytest.raises(NotImplementedError, match="same kind"):
        derive("Categorical", "Normal")


def test_wrong_call_types_are_refused():
    with pytest.raises(NotImplementedError, match="KL\\(Normal-Laplace\\)"):
        derive("Normal", "Laplace")(Laplace(0.0, 1.0), Laplace(0.0, 1.0))


def test_rederive_matches_the_cache():
    assert refresh_cache(["Exponential-Exponential"]) == {"Exponential-Exponential": "same"}


def test_timeout_is_a_clear_error_not_a_hang():
    """sympy finds no closed form for a Normal against a Gaussian mixture; it is stopped."""
    x = sp.Symbol("x", real=True)
    loc, scale = sp.Symbol("loc", real=True), sp.Symbol("scale", positive=True)

    def pdf(m, s):
        return sp.exp(-((x - m) ** 2) / (2 * s**2)) / (s * sp.sqrt(2 * sp.pi))

    log_q = sp.log(sp.Rational(3, 10) * pdf(-1, 1) + sp.Rational(7, 10) * pdf(2, sp.S.Half))
    start = time.perf_counter()
    with pytest.raises(DerivationTimeout, match="within 2 s"):
        derive_expr(sp.log(pdf(loc, scale)), log_q, x, timeout=2)
    assert time.perf_counter() - start < 10


def test_unnormalised_density_is_a_clear_error():
    x = sp.Symbol("x", real=True)
    with pytest.raises(DerivationError, match="integrates to sqrt\\(pi\\)"):
        derive_expr(-(x**2), -(x**2) / 2, x, timeout=30)


# ---- derive-and-register: a user's own distribution class ----------------------------------


class Rayleigh(Distribution):
    """A user's class: p(x) = x / s^2 exp(-x^2 / (2 s^2)), x > 0."""

    arg_constraints = {"scale": constraints.positive}
    support = constraints.positive
    has_rsample = True

    def __init__(self, scale, validate_args=None):
        self.scale = torch.as_tensor(scale)
        super().__init__(self.scale.shape, validate_args=validate_args)

    def rsample(self, sample_shape=()):
        u = torch.rand(self._extended_shape(torch.Size(sample_shape)), dtype=self.scale.dtype)
        return self.scale * torch.sqrt(-2 * torch.log1p(-u))

    def log_prob(self, value):
        return torch.log(value) - 2 * torch.log(self.scale) - value**2 / (2 * self.scale**2)


class Rayleigh2(Rayleigh):
    pass


_x = sp.Symbol("x", positive=True)
_s = sp.Symbol("scale", positive=True)
RAYLEIGH = sp.log(_x) - 2 * sp.log(_s) - _x**2 / (2 * _s**2)


def _example():
    return (
        Rayleigh(torch.tensor([1.0, 2.0], dtype=torch.float64)),
        Rayleigh(torch.tensor([1.5, 0.7], dtype=torch.float64)),
    )


def test_derive_and_register_a_user_pair():
    fam = Family(Rayleigh, RAYLEIGH, _x, (0, sp.oo))
    with preserved_registries():
        d = derive_and_register(fam, fam, example=_example(), generator=_gen(3))
        _, info = lookup_kl(Rayleigh, Rayleigh)
        assert info is not None and info.kind == "exact"
        p, q = Rayleigh(torch.tensor([0.8, 3.0])), Rayleigh(torch.tensor([1.1, 1.0]))
        sp_, sq = p.scale, q.scale
        known = 2 * torch.log(sq / sp_) + (sp_ / sq) ** 2 - 1  # textbook closed form
        torch.testing.assert_close(kl_divergence(p, q), known)
        assert "scale_{p}" in d.latex
        with pytest.raises(ValueError, match="already registered"):
            derive_and_register(fam, fam, example=_example())
    assert lookup_kl(Rayleigh, Rayleigh) == (None, None)


def test_derive_and_register_refuses_a_pair_torch_has():
    with pytest.raises(ValueError, match="already registered with torch"):
        derive_and_register(
            FAMILIES["Normal"], FAMILIES["Normal"], example=(Normal(0.0, 1.0), Normal(1.0, 2.0))
        )


def test_derive_and_register_refuses_a_formula_that_disagrees_with_sampling():
    # the class samples a Rayleigh, but the user gave a half-normal's log-density
    half_normal = sp.log(2) / 2 - sp.log(sp.pi) / 2 - sp.log(_s) - _x**2 / (2 * _s**2)
    wrong = Family(Rayleigh2, half_normal, _x, (0, sp.oo))
    p, q = _example()
    example = (Rayleigh2(p.scale), Rayleigh2(q.scale))
    with preserved_registries():
        with pytest.raises(ValueError, match="disagrees with sampling"):
            derive_and_register(wrong, wrong, example=example, generator=_gen(4))
        assert lookup_kl(Rayleigh2, Rayleigh2) == (None, None)


@pytest.mark.parametrize("name", ["Normal-Laplace", "Gamma-Gamma", "Categorical-Categorical"])
def test_compiled_forms_run_on_every_device_and_dtype(name, device, dtype):
    """Constants (pi, sqrt(2), EulerGamma) never meet torch as Python ints; dtype is kept."""
    a, b = name.split("-")
    g = _gen(5)
    p, q = _instance(FAMILIES[a], g), _instance(FAMILIES[b], g)
    for d in (p, q):
        for attr in FAMILIES[d.__class__.__name__].params:
            setattr(d, attr, getattr(d, attr).to(device=device, dtype=dtype))
    value = derive(a, b)(p, q)
    assert value.dtype == dtype and value.device.type == device.type
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(value, kl_divergence(p, q), rtol=tol, atol=tol)
    assert not math.isnan(value.sum().item())


def test_categorical_sum_uses_zero_log_zero_and_gives_inf():
    d = derive("Categorical", "Categorical")
    p = torch.distributions.Categorical(probs=torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    q = torch.distributions.Categorical(probs=torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    torch.testing.assert_close(d(p, q), kl_divergence(p, q), rtol=1e-12, atol=1e-12)
    assert d(q, p).item() == math.inf == kl_divergence(q, p).item()
