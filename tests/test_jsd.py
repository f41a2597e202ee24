"""Jensen-Shannon: the registry, the registered rules (exact and estimated) and ``jsd_mc``.

References are independent: scipy's ``jensenshannon`` / ``entropy`` for categoricals, mpmath
for precision, ``scipy.integrate.quad`` for 1-D continuous pairs. Statistical checks use
|estimate - exact| < Z * stderr with Z = 4.5 (two-sided false-failure rate about 7e-6 per check).
"""

from __future__ import annotations

import math
import warnings

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy
from torch.distributions import (
    Categorical,
    Distribution,
    Gamma,
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    OneHotCategorical,
    OneHotCategoricalStraightThrough,
)

import distkl
import distkl.registry as registry
from distkl._logspace import binary_entropy, js_from_log_probs
from distkl.montecarlo import jsd_mc
from distkl.registry import js_divergence, jsd_rules, register_jsd
from distkl.rules.mixture import JSD_SUPPORTED as SUPPORTED
from tests.conftest import Z
from tests.examples import EDGE, INFINITE, by_family, params

LOG2 = math.log(2.0)
NEG_INF = -math.inf


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def probs_of(d: Distribution) -> torch.Tensor:
    """Probabilities (*batch, K) of a categorical-family distribution, the plain torch way."""
    if isinstance(d, MixtureSameFamily):
        w = d.mixture_distribution.probs.unsqueeze(-1)
        return (w * probs_of(d.component_distribution)).sum(-2)
    return d.probs


def scipy_js(p: np.ndarray, q: np.ndarray, alpha: float) -> np.ndarray:
    """JS_alpha from the definition with scipy.stats.entropy (natural log), row by row."""
    m = alpha * p + (1 - alpha) * q
    return alpha * entropy(p, m, axis=-1) + (1 - alpha) * entropy(q, m, axis=-1)


# ============================================================================================
# 1. The registry.


class _A(Normal):
    pass


class _B(_A):
    pass


@pytest.fixture
def scratch_registry():
    """Remove every registration a test adds, and the memoised lookups."""
    before = dict(registry._JSD_RULES)
    yield
    for key in [k for k in registry._JSD_RULES if k not in before]:
        del registry._JSD_RULES[key]
    registry._dispatch_jsd.cache_clear()


def _const(value: float):
    def rule(p, q, alpha):
        return torch.full(torch.broadcast_shapes(p.batch_shape, q.batch_shape), value)

    return rule


def test_most_specific_match(scratch_registry):
    register_jsd(_A, _A)(_const(1.0))
    register_jsd(_B, _A)(_const(2.0))
    a, b = _A(0.0, 1.0), _B(0.0, 1.0)
    assert js_divergence(a, a).item() == 1.0
    assert js_divergence(b, a).item() == 2.0
    assert js_divergence(a, b).item() == 1.0  # only (_A, _A) matches
    assert js_divergence(b, b).item() == 2.0  # (_B, _A) is more specific on the left


def test_ambiguity_warns(scratch_registry):
    register_jsd(_B, _A)(_const(1.0))
    register_jsd(_A, _B)(_const(2.0))
    b = _B(0.0, 1.0)
    with pytest.warns(RuntimeWarning, match="Ambiguous js_divergence"):
        js_divergence(b, b)


def _first_rule(p, q, alpha):
    return torch.ones(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


def _second_rule(p, q, alpha):
    return torch.zeros(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


def test_refuses_to_overwrite(scratch_registry):
    register_jsd(_A, _A)(_first_rule)
    register_jsd(_A, _A)(_first_rule)  # the same rule again is not an overwrite
    with pytest.raises(ValueError, match="refusing to overwrite"):
        register_jsd(_A, _A)(_second_rule)
    with pytest.raises(ValueError, match="already registered"):
        register_jsd(Categorical, Categorical)(_const(0.0))
    assert js_divergence(_A(0.0, 1.0), _A(0.0, 1.0)).item() == 1.0


def test_missing_pair_lists_registered_pairs():
    g = Gamma(torch.ones(2), torch.ones(2))
    with pytest.raises(NotImplementedError) as err:
        js_divergence(g, g)
    msg = str(err.value)
    assert "Gamma" in msg and "Categorical-Categorical" in msg and "Normal-Normal" in msg


@pytest.mark.parametrize("bad", [int, "Normal", Normal(0.0, 1.0), object])
def test_register_non_distribution_is_type_error(bad):
    with pytest.raises(TypeError, match="Distribution subclass"):
        register_jsd(bad, Normal)
    with pytest.raises(TypeError, match="Distribution subclass"):
        register_jsd(Normal, bad)


@pytest.mark.parametrize("skew", [0.0, 1.0, -0.1, 1.5, math.nan, math.inf])
def test_skew_out_of_range(skew):
    p = Categorical(logits=torch.zeros(3))
    with pytest.raises(ValueError, match="skew"):
        js_divergence(p, p, skew=skew)
    with pytest.raises(ValueError, match="skew"):
        jsd_mc(p, p, skew=skew, num_samples=8)


def test_skew_tensor_is_type_error():
    p = Categorical(logits=torch.zeros(3))
    with pytest.raises(TypeError, match="skew"):
        js_divergence(p, p, skew=torch.tensor(0.5))


def test_registered_pairs_and_kinds():
    rules = {(r.type_p, r.type_q): r for r in jsd_rules()}
    cats = (Categorical, OneHotCategorical)
    multivariate = (Independent, MultivariateNormal, LowRankMultivariateNormal)
    for tp in cats:
        for tq in (*cats, MixtureSameFamily):
            assert rules[tp, tq].kind == "exact"
            assert rules[tq, tp].kind == "exact"
    for tp in (Normal, *multivariate):
        assert rules[tp, MixtureSameFamily].kind == "estimate"
        assert rules[MixtureSameFamily, tp].kind == "estimate"
    assert rules[Normal, Normal].kind == "estimate"
    for tp in multivariate:
        assert (Normal, tp) not in rules and (tp, Normal) not in rules  # event shapes never agree
        for tq in multivariate:
            assert rules[tp, tq].kind == "estimate"
    assert rules[MixtureSameFamily, MixtureSameFamily].kind == "estimate"
    gaussian = {Normal, *multivariate}
    assert all(r.module.startswith("distkl.") for r in rules.values())
    assert {rules[tp, tq].module for tp in cats for tq in cats} == {"distkl.rules.categorical"}
    for (tp, tq), r in rules.items():
        # Gaussian families and every mixture pair live with the KL mixture rules.
        if MixtureSameFamily in (tp, tq) or (tp in gaussian and tq in gaussian):
            assert r.module == "distkl.rules.mixture", (tp, tq, r.module)


# ============================================================================================
# 2a. Categorical rules: exact.


@pytest.mark.parametrize("alpha", [0.5, 0.1, 0.73])
def test_categorical_against_scipy(alpha):
    g = torch.Generator().manual_seed(0)
    logits_p = torch.randn(2000, 7, generator=g, dtype=torch.float64) * 2
    logits_q = torch.randn(2000, 7, generator=g, dtype=torch.float64) * 2
    # sprinkle exact zeros (never a whole row)
    logits_p[torch.rand(2000, 7, generator=g) < 0.2] = NEG_INF
    logits_q[torch.rand(2000, 7, generator=g) < 0.2] = NEG_INF
    logits_p[:, 0] = logits_p[:, 0].clamp_min(0.0)
    logits_q[:, 1] = logits_q[:, 1].clamp_min(0.0)
    p, q = Categorical(logits=logits_p), Categorical(logits=logits_q)
    got = as_np(js_divergence(p, q, skew=alpha))
    pn, qn = as_np(p.probs), as_np(q.probs)
    np.testing.assert_allclose(got, scipy_js(pn, qn, alpha), rtol=1e-10, atol=1e-15)
    if alpha == 0.5:
        # scipy's jensenshannon is the *distance*, natural log by default: square it.
        ref = jensenshannon(pn, qn, axis=-1) ** 2
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("ex", params(by_family("categorical")))
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_categorical_family_rows(ex, alpha, device, dtype):
    p, q = ex.build(device, dtype)
    got = js_divergence(p, q, skew=alpha)
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert got.shape == batch and got.dtype == dtype and got.device.type == device.type
    pn = np.broadcast_to(as_np(probs_of(p)), (*batch, as_np(probs_of(p)).shape[-1]))
    qn = np.broadcast_to(as_np(probs_of(q)), pn.shape)
    rtol = 1e-10 if dtype == torch.float64 else 2e-4
    np.testing.assert_allclose(as_np(got), scipy_js(pn, qn, alpha), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("case", [*EDGE, *INFINITE], ids=[c[0] for c in [*EDGE, *INFINITE]])
def test_categorical_edges_and_infinite_kl_rows(case, device, dtype):
    """Where KL is infinite the JSD is finite; zeros and peaked rows stay exact."""
    _, make = case
    p, q = make(device, dtype)
    p_logits = torch.tensor(as_np(p.logits)).requires_grad_()
    q_logits = torch.tensor(as_np(q.logits)).requires_grad_()
    got = js_divergence(p, q)
    assert torch.isfinite(got).all()
    ref = scipy_js(as_np(p.probs), as_np(q.probs), 0.5)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(as_np(got), ref, rtol=rtol, atol=1e-7)
    # gradients finite in float64 through the same parameters
    out = js_divergence(type(p)(logits=p_logits), type(q)(logits=q_logits))
    out.backward()
    assert torch.isfinite(p_logits.grad).all() and torch.isfinite(q_logits.grad).all()


@pytest.mark.parametrize("build", ["logits", "probs"])
@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_disjoint_supports_give_h_alpha_and_finite_grads(build, alpha, dtype):
    if build == "logits":
        a = torch.tensor([0.3, -1.0, NEG_INF, NEG_INF], dtype=dtype, requires_grad=True)
        b = torch.tensor([NEG_INF, NEG_INF, 2.0, 0.0], dtype=dtype, requires_grad=True)
        p, q = Categorical(logits=a), OneHotCategorical(logits=b)
    else:
        a = torch.tensor([0.3, 0.7, 0.0, 0.0], dtype=dtype, requires_grad=True)
        b = torch.tensor([0.0, 0.0, 0.5, 0.5], dtype=dtype, requires_grad=True)
        p, q = Categorical(probs=a), OneHotCategorical(probs=b)
    got = js_divergence(p, q, skew=alpha)
    h = binary_entropy(alpha)
    assert abs(got.item() - h) <= 4 * torch.finfo(dtype).eps * h
    assert got.item() <= h
    got.backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_zero_at_p_equals_q_exactly(dtype):
    logits = torch.randn(50, 6, dtype=dtype)
    logits[:, 2] = NEG_INF
    x = logits.clone().requires_grad_()
    got = js_divergence(Categorical(logits=x), OneHotCategorical(logits=logits))
    assert (got == 0).all()
    got.sum().backward()
    assert torch.isfinite(x.grad).all()


def _mp_js(lp: list[float], lq: list[float], alpha: float) -> float:
    a = mpmath.mpf(alpha)
    s = mpmath.mpf(0)
    for x, y in zip(lp, lq):
        p, q = mpmath.exp(x), mpmath.exp(y)
        m = a * p + (1 - a) * q
        s += a * p * mpmath.log(p / m) + (1 - a) * q * mpmath.log(q / m)
    return float(s)


@pytest.mark.parametrize(
    "dtype, delta, rtol",
    [(torch.float64, 1e-3, 1e-11), (torch.float64, 1e-5, 1e-9), (torch.float32, 1e-3, 1e-3)],
)
@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_relative_precision_when_p_near_q(dtype, delta, rtol, alpha):
    """log(p/m) computed with log1p/expm1 keeps relative precision where p ~ q (no cancellation)."""
    mpmath.mp.dps = 40
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(10):
        base = torch.randn(8, generator=g, dtype=torch.float64)
        lp = torch.log_softmax(base, -1).to(dtype)
        lq = torch.log_softmax(base + delta * torch.randn(8, generator=g, dtype=torch.float64), -1)
        lq = lq.to(dtype)
        ref = _mp_js(lp.double().tolist(), lq.double().tolist(), alpha)
        got = js_from_log_probs(lp, lq, skew=alpha).item()
        worst = max(worst, abs(got - ref) / ref)
    assert worst < rtol, worst


def test_gradcheck_categorical_family():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)

    def f(a, w, c):
        p = Categorical(logits=a)
        q = MixtureSameFamily(Categorical(logits=w), OneHotCategorical(logits=c))
        return js_divergence(p, q, skew=0.3)

    assert torch.autograd.gradcheck(f, (a, w, c))


def test_straight_through_subclass_dispatches():
    logits = torch.randn(4, 3)
    p = OneHotCategoricalStraightThrough(logits=logits)
    q = Categorical(logits=logits.flip(-1))
    expected = js_divergence(OneHotCategorical(logits=logits), q)
    torch.testing.assert_close(js_divergence(p, q), expected)


def test_categorical_errors():
    with pytest.raises(ValueError, match="same number of categories"):
        js_divergence(Categorical(logits=torch.zeros(3)), Categorical(logits=torch.zeros(4)))
    with pytest.raises(ValueError, match="broadcast"):
        js_divergence(Categorical(logits=torch.zeros(2, 3)), Categorical(logits=torch.zeros(4, 3)))


def test_mixture_families_not_supported():
    gammas = MixtureSameFamily(Categorical(logits=torch.zeros(2)), Gamma(torch.ones(2), 1.0))
    with pytest.raises(NotImplementedError, match=r"MixtureSameFamily\(Gamma\)") as err:
        js_divergence(gammas, Categorical(logits=torch.zeros(3)))
    assert "MixtureSameFamily(Categorical)" in str(err.value)
    cat_mix = MixtureSameFamily(
        Categorical(logits=torch.zeros(2)), Categorical(logits=torch.zeros(2, 3))
    )
    with pytest.raises(
        NotImplementedError, match="both must be categorical-family or both Gaussian"
    ):
        js_divergence(cat_mix, Normal(0.0, 1.0))
    with pytest.raises(NotImplementedError, match="supported"):
        js_divergence(
            Independent(Gamma(torch.ones(3), 1.0), 1), Independent(Normal(0.0, 1.0).expand([3]), 1)
        )
    assert "Normal" in SUPPORTED and "Categorical" in SUPPORTED


# ============================================================================================
# 2b. Gaussian rules: estimates by the method in force.


def quad_js(p: Distribution, q: Distribution, alpha: float) -> float:
    """JS_alpha of scalar (unbatched) distributions by adaptive quadrature, split at features."""

    def f(x: float) -> float:
        t = torch.tensor(x, dtype=torch.float64)
        lp, lq = float(p.log_prob(t)), float(q.log_prob(t))
        lm = float(np.logaddexp(math.log(alpha) + lp, math.log1p(-alpha) + lq))
        return alpha * math.exp(lp) * (lp - lm) + (1 - alpha) * math.exp(lq) * (lq - lm)

    locs, scales = [], []
    for d in (p, q):
        comp = d.component_distribution if isinstance(d, MixtureSameFamily) else d
        locs += as_np(comp.loc).ravel().tolist()
        scales += as_np(comp.scale).ravel().tolist()
    edges = sorted({m + k * s for m, s in zip(locs, scales) for k in (-12, -4, -1, 0, 1, 4, 12)})
    return sum(
        integrate.quad(f, a, b, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
        for a, b in zip(edges[:-1], edges[1:])
    )


def one_d_rows():
    return [e for e in by_family("mixture") if e.build()[0].event_shape == torch.Size()]


def element(d: Distribution, idx: tuple, batch: torch.Size) -> Distribution:
    """Batch element ``idx`` of ``d`` broadcast to ``batch``."""
    d = d.expand(batch)
    if isinstance(d, MixtureSameFamily):
        return MixtureSameFamily(
            Categorical(logits=d.mixture_distribution.logits[idx]),
            Normal(d.component_distribution.loc[idx], d.component_distribution.scale[idx]),
        )
    return Normal(d.loc[idx], d.scale[idx])


@pytest.mark.parametrize("ex", params(one_d_rows()))
@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_one_d_rows_against_scipy_quad(ex, alpha):
    p, q = ex.build("cpu", torch.float64)
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    got = js_divergence(p, q, skew=alpha)  # "auto": quadrature for 1-D events
    assert got.shape == batch
    for idx in np.ndindex(*batch):
        ref = quad_js(element(p, idx, batch), element(q, idx, batch), alpha)
        assert abs(got[idx].item() - ref) <= 1e-6 * ref, (ex.id, idx, got[idx].item(), ref)


@pytest.mark.parametrize(
    "p, q",
    [
        (Normal(0.0, 1.0), Normal(1.0, 2.0)),
        (Normal(0.0, 1.0), Normal(0.0, 1.0)),
        (Normal(-3.0, 0.1), Normal(4.0, 3.0)),
        (
            MixtureSameFamily(
                Categorical(logits=torch.tensor([0.0, 1.0, -1.0])),
                Normal(torch.tensor([-3.0, 0.0, 4.0]), torch.tensor([0.5, 1.0, 0.2])),
            ),
            Normal(0.5, 1.5),
        ),
    ],
    ids=["overlap", "equal", "far-narrow", "narrow-component"],
)
@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_normal_pairs_against_scipy_quad(p, q, alpha):
    p64 = _to64(p)
    q64 = _to64(q)
    got = js_divergence(p64, q64, skew=alpha).item()
    ref = quad_js(p64, q64, alpha)
    assert abs(got - ref) <= 1e-6 * ref + 1e-15, (got, ref)
    assert 0.0 <= got <= binary_entropy(alpha)


def _to64(d: Distribution) -> Distribution:
    if isinstance(d, MixtureSameFamily):
        c = d.component_distribution
        return MixtureSameFamily(
            Categorical(logits=d.mixture_distribution.logits.double()),
            Normal(c.loc.double(), c.scale.double()),
        )
    return Normal(d.loc.double(), d.scale.double())


def test_method_dispatch_for_gaussians():
    p = Normal(torch.tensor([0.0, 1.0], dtype=torch.float64), 1.0)
    q = Normal(torch.tensor(0.5, dtype=torch.float64), 2.0)
    quad = js_divergence(p, q)
    with distkl.options(method="quadrature"):
        torch.testing.assert_close(js_divergence(p, q), quad, rtol=0, atol=0)
    for method in ("variational", "unscented"):  # KL-only methods: no silent fallback
        with distkl.options(method=method), pytest.raises(ValueError, match="no JSD counterpart"):
            js_divergence(p, q)
    with distkl.options(method="mc", num_samples=256, generator=torch.Generator().manual_seed(3)):
        via_rule = js_divergence(p, q)
    direct = jsd_mc(p, q, num_samples=256, generator=torch.Generator().manual_seed(3)).value
    torch.testing.assert_close(via_rule, direct, rtol=0, atol=0)

    p3 = Independent(Normal(torch.zeros(3), 1.0), 1)
    q3 = MultivariateNormal(torch.ones(3), torch.eye(3))
    with distkl.options(method="quadrature"), pytest.raises(ValueError, match="1-D event"):
        js_divergence(p3, q3)
    for method in ("auto", "mc"):
        with distkl.options(
            method=method, num_samples=64, generator=torch.Generator().manual_seed(4)
        ):
            got = js_divergence(p3, q3)
        ref = jsd_mc(p3, q3, num_samples=64, generator=torch.Generator().manual_seed(4)).value
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("ex", params([*by_family("normal"), *by_family("mixture")]))
def test_gaussian_rows_shape_range_device(ex, device, dtype):
    p, q = ex.build(device, dtype)
    with distkl.options(num_samples=64, generator=torch.Generator(device=device).manual_seed(5)):
        got = js_divergence(p, q)
        swapped = js_divergence(q, p, skew=0.5)
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert got.shape == batch and got.dtype == dtype and got.device.type == device.type
    assert ((got >= 0) & (got <= LOG2)).all()
    assert ((swapped >= 0) & (swapped <= LOG2)).all()


def test_event_shape_mismatch():
    mvn2 = MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="same event shape"):
        js_divergence(mvn2, MultivariateNormal(torch.zeros(3), torch.eye(3)))
    with pytest.raises(NotImplementedError, match="No JSD"):  # () against (2,): never registered
        js_divergence(Normal(0.0, 1.0), mvn2)
    with pytest.raises(ValueError, match="same event shape"):
        jsd_mc(Normal(0.0, 1.0), MultivariateNormal(torch.zeros(2), torch.eye(2)), num_samples=8)


def test_gradcheck_quadrature_rule():
    def f(loc, scale, w):
        p = MixtureSameFamily(Categorical(logits=w), Normal(loc, scale))
        return js_divergence(p, Normal(loc.new_tensor(0.3), 1.2), skew=0.3)

    args = (
        torch.tensor([0.2, 2.0], dtype=torch.float64, requires_grad=True),
        torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True),
        torch.tensor([0.0, 0.4], dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(f, args)


# ============================================================================================
# 3. Properties on thousands of random pairs (one batched call per hypothesis example).


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 12),
    alpha=st.floats(0.01, 0.99),
    sparsity=st.floats(0.0, 0.6),
    scale=st.floats(0.1, 8.0),
)
def test_categorical_properties(seed, k, alpha, sparsity, scale):
    g = torch.Generator().manual_seed(seed)
    n = 1500
    lp = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    lq = torch.randn(n, k, generator=g, dtype=torch.float64) * scale
    lp[torch.rand(n, k, generator=g) < sparsity] = NEG_INF
    lq[torch.rand(n, k, generator=g) < sparsity] = NEG_INF
    lp[:, 0] = lp[:, 0].clamp_min(0.0)
    lq[:, -1] = lq[:, -1].clamp_min(0.0)
    p, q = Categorical(logits=lp), Categorical(logits=lq)
    h = binary_entropy(alpha)
    js = js_divergence(p, q, skew=alpha)
    assert ((js >= 0) & (js <= h)).all()
    # JS_alpha(p, q) = JS_(1-alpha)(q, p); symmetric at 1/2
    torch.testing.assert_close(js, js_divergence(q, p, skew=1 - alpha), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(js_divergence(p, q), js_divergence(q, p), rtol=1e-12, atol=1e-15)
    assert (js_divergence(p, p, skew=alpha) == 0).all()
    # disjoint supports: q lives where p does not
    half = k // 2
    lp_d, lq_d = lp.clone(), lq.clone()
    lp_d[:, half:] = NEG_INF
    lq_d[:, :half] = NEG_INF
    lp_d[:, 0] = 0.0
    lq_d[:, -1] = 0.0
    js_d = js_divergence(Categorical(logits=lp_d), Categorical(logits=lq_d), skew=alpha)
    assert (js_d <= h).all()
    torch.testing.assert_close(js_d, torch.full_like(js_d, h), rtol=1e-14, atol=0)


@settings(max_examples=6, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**31 - 1), alpha=st.floats(0.02, 0.98))
def test_normal_properties(seed, alpha):
    g = torch.Generator().manual_seed(seed)
    n = 300
    loc = torch.randn(2, n, generator=g, dtype=torch.float64) * 3
    scale = torch.rand(2, n, generator=g, dtype=torch.float64) * 3 + 0.05
    p, q = Normal(loc[0], scale[0]), Normal(loc[1], scale[1])
    h = binary_entropy(alpha)
    js = js_divergence(p, q, skew=alpha)
    assert ((js >= 0) & (js <= h)).all()
    # quadrature: equal to within its accuracy (<= 1e-6 relative), the rule is not swap-exact
    torch.testing.assert_close(js, js_divergence(q, p, skew=1 - alpha), rtol=1e-7, atol=1e-12)
    assert (js_divergence(p, p, skew=alpha) < 1e-12).all()
    far = Normal(loc[0] + 80 * (scale[0] + scale[1]), scale[1])
    torch.testing.assert_close(
        js_divergence(p, far, skew=alpha), torch.full_like(js, h), rtol=1e-7, atol=0
    )


# ============================================================================================
# 4. jsd_mc.


def _check_z(est, exact, label):
    err = (est.value - exact).abs()
    ok = err <= Z * est.stderr + 1e-12
    assert ok.all(), (
        f"{label}: N={est.num_samples} estimate={est.value.tolist()} "
        f"stderr={est.stderr.tolist()} exact={exact.tolist()}"
    )


def same_event_rows():
    """Categorical rows whose samples both sides can score (index vs index, one-hot vs one-hot)."""
    rows = []
    for e in by_family("categorical"):
        p, q = e.build()
        if p.event_shape == q.event_shape:
            rows.append(e)
    return rows


@pytest.mark.parametrize("ex", params(same_event_rows()))
@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_jsd_mc_categorical_rows_agree_with_exact(ex, alpha):
    p, q = ex.build("cpu", torch.float64)
    exact = js_divergence(p, q, skew=alpha)
    est = jsd_mc(p, q, skew=alpha, num_samples=2000, generator=torch.Generator().manual_seed(6))
    _check_z(est, exact, ex.id)


@pytest.mark.parametrize("ex", params(one_d_rows()))
@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_jsd_mc_one_d_rows_agree_with_quadrature(ex, alpha, dtype):
    p, q = ex.build("cpu", dtype)
    exact = js_divergence(p, q, skew=alpha)
    est = jsd_mc(p, q, skew=alpha, num_samples=2000, generator=torch.Generator().manual_seed(7))
    assert est.value.dtype == dtype and est.num_samples == 4000
    _check_z(est, exact, ex.id)


def test_jsd_mc_multivariate_against_one_d_truth():
    """Identical coordinates do not change the JSD; neither does a rotation."""
    p1, q1 = Normal(0.0, 1.0), Normal(1.5, 0.6)
    p1, q1 = _to64(p1), _to64(q1)
    exact = torch.tensor(quad_js(p1, q1, 0.5), dtype=torch.float64)
    gen = torch.Generator().manual_seed(8)
    loc_p = torch.tensor([0.0, 2.0, -1.0], dtype=torch.float64)
    loc_q = torch.tensor([1.5, 2.0, -1.0], dtype=torch.float64)
    sp = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    sq = torch.tensor([0.6, 0.5, 2.0], dtype=torch.float64)
    est = jsd_mc(
        Independent(Normal(loc_p, sp), 1),
        Independent(Normal(loc_q, sq), 1),
        num_samples=4000,
        generator=gen,
    )
    _check_z(est, exact, "Independent(Normal)")
    rot, _ = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))
    p = MultivariateNormal(rot @ loc_p, rot @ torch.diag(sp**2) @ rot.T)
    q = LowRankMultivariateNormal(
        rot @ loc_q, torch.zeros(3, 1, dtype=torch.float64), sq**2
    )  # not rotated: a different 3-D pair, checked below against the rotated MVN one
    q_rot = MultivariateNormal(rot @ loc_q, rot @ torch.diag(sq**2) @ rot.T)
    _check_z(jsd_mc(p, q_rot, num_samples=4000, generator=gen), exact, "rotated MVN")
    assert jsd_mc(p, q, num_samples=64, generator=gen).value.shape == ()


@pytest.mark.parametrize("ex", params([e for e in by_family("mixture") if e not in one_d_rows()]))
def test_jsd_mc_multivariate_mixture_rows_agree_with_plain_estimator(ex):
    """Against the textbook estimator on independent draws: |a - b| < Z sqrt(se_a^2 + se_b^2)."""
    p, q = ex.build("cpu", torch.float64)
    est = jsd_mc(p, q, num_samples=2000, generator=torch.Generator().manual_seed(9))
    n = 8000
    torch.manual_seed(10)
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    p, q = p.expand(batch), q.expand(batch)
    x, y = p.sample((n,)), q.sample((n,))

    def log_over_m(a, b):
        return a - torch.logaddexp(a, b) + LOG2

    t_p = log_over_m(p.log_prob(x), q.log_prob(x))
    t_q = log_over_m(q.log_prob(y), p.log_prob(y))
    plain = 0.5 * (t_p.mean(0) + t_q.mean(0))
    se = 0.5 * (t_p.var(0) / n + t_q.var(0) / n).sqrt()
    assert ((est.value - plain).abs() < Z * (est.stderr**2 + se**2).sqrt()).all(), (
        ex.id,
        est.value,
        est.stderr,
        plain,
        se,
    )


@pytest.mark.parametrize("alpha", [0.5, 0.05, 0.9])
def test_jsd_mc_always_in_range_even_from_8_samples(alpha, dtype):
    g = torch.Generator().manual_seed(11)
    n = 600
    loc = torch.randn(2, n, generator=g, dtype=dtype) * torch.tensor([[0.1], [10.0]], dtype=dtype)
    scale = torch.rand(2, n, generator=g, dtype=dtype) * 2 + 0.01
    h = binary_entropy(alpha)
    pairs = [
        (Normal(loc[0], scale[0]), Normal(loc[1], scale[1])),
        (
            MixtureSameFamily(Categorical(logits=loc.T), Normal(loc.T, scale.T)),
            Normal(loc[1], scale[0]),
        ),
        (
            Categorical(logits=loc.T.reshape(-1, 4)),
            Categorical(logits=scale.T.reshape(-1, 4).log() * 5),
        ),
    ]
    for p, q in pairs:
        est = jsd_mc(p, q, skew=alpha, num_samples=8, generator=g)
        assert (est.value >= 0).all() and (est.value <= h).all()
        assert torch.isfinite(est.stderr).all()


def test_jsd_mc_exactly_zero_for_p_equals_q():
    p = MixtureSameFamily(
        Categorical(logits=torch.randn(4, 3)),
        Independent(Normal(torch.randn(4, 3, 2), torch.rand(4, 3, 2) + 0.5), 1),
    )
    est = jsd_mc(p, p, skew=0.3, num_samples=16, generator=torch.Generator().manual_seed(12))
    assert (est.value == 0).all() and (est.stderr == 0).all()


def test_jsd_mc_reproducible_and_leaves_global_rng_alone():
    p = Categorical(logits=torch.randn(3, 5))
    q = MixtureSameFamily(Categorical(logits=torch.zeros(2)), Categorical(logits=torch.randn(2, 5)))
    state = torch.get_rng_state()
    a = jsd_mc(p, q, num_samples=64, generator=torch.Generator().manual_seed(13))
    b = jsd_mc(p, q, num_samples=64, generator=torch.Generator().manual_seed(13))
    c = jsd_mc(p, q, num_samples=64, generator=torch.Generator().manual_seed(14))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    assert not torch.equal(a.value, c.value)
    gp, gq = Normal(torch.zeros(3), 1.0), Normal(1.0, 2.0)
    a = jsd_mc(gp, gq, num_samples=64, generator=torch.Generator().manual_seed(13))
    b = jsd_mc(gp, gq, num_samples=64, generator=torch.Generator().manual_seed(13))
    assert torch.equal(a.value, b.value)


def test_jsd_mc_uses_options_defaults():
    p, q = Normal(0.0, 1.0), Normal(1.0, 1.0)
    with distkl.options(num_samples=32, generator=torch.Generator().manual_seed(15)):
        a = jsd_mc(p, q)
    b = jsd_mc(p, q, num_samples=32, generator=torch.Generator().manual_seed(15))
    assert a.num_samples == 64 and torch.equal(a.value, b.value)


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "8"])
def test_jsd_mc_bad_num_samples(bad):
    with pytest.raises(ValueError, match="num_samples"):
        jsd_mc(Normal(0.0, 1.0), Normal(1.0, 1.0), num_samples=bad)


def test_jsd_mc_bad_generator():
    with pytest.raises(TypeError, match="generator"):
        jsd_mc(Normal(0.0, 1.0), Normal(1.0, 1.0), num_samples=8, generator=0)


def test_jsd_mc_shapes_broadcast():
    p = Normal(torch.zeros(2, 1), 1.0)
    q = MixtureSameFamily(Categorical(logits=torch.zeros(3, 2)), Normal(torch.randn(3, 2), 1.0))
    est = jsd_mc(p, q, num_samples=16, generator=torch.Generator().manual_seed(16))
    assert est.value.shape == (2, 3) and est.stderr.shape == (2, 3)


def test_gradcheck_jsd_mc_pathwise():
    def f(loc, scale, w):
        gen = torch.Generator().manual_seed(17)
        p = MixtureSameFamily(Categorical(logits=w), Independent(Normal(loc, scale), 1))
        q = MultivariateNormal(
            torch.zeros(2, dtype=torch.float64), 1.5 * torch.eye(2, dtype=torch.float64)
        )
        return jsd_mc(p, q, skew=0.4, num_samples=64, generator=gen).value

    args = (
        torch.randn(2, 2, dtype=torch.float64, requires_grad=True),
        (torch.rand(2, 2, dtype=torch.float64) + 0.5).requires_grad_(),
        torch.randn(2, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(f, args)


def test_jsd_mc_gradient_is_unbiased():
    """Mean pathwise gradient over independent replicates vs the quadrature gradient."""
    reps = 200
    loc = torch.full((reps,), 0.3, dtype=torch.float64, requires_grad=True)
    q = Normal(torch.tensor(1.0, dtype=torch.float64), 1.7)
    est = jsd_mc(Normal(loc, 1.0), q, num_samples=128, generator=torch.Generator().manual_seed(18))
    est.value.sum().backward()
    grads = loc.grad
    ref_loc = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    js_divergence(Normal(ref_loc, 1.0), q).backward()
    mean, se = grads.mean(), grads.std() / math.sqrt(reps)
    assert abs(mean - ref_loc.grad) < Z * se, (mean.item(), se.item(), ref_loc.grad.item())


def test_jsd_mc_device(device):
    p = Normal(torch.zeros(3, device=device), 1.0)
    q = Normal(torch.ones(3, device=device), 2.0)
    est = jsd_mc(p, q, num_samples=32, generator=torch.Generator(device=device).manual_seed(19))
    assert est.value.device.type == device.type and est.stderr.device.type == device.type


def test_no_warnings_on_regular_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        js_divergence(Categorical(logits=torch.zeros(3)), OneHotCategorical(logits=torch.zeros(3)))
