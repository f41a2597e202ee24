"""Exact categorical KL rules: values against scipy/mpmath, shapes, zeros, gradients, dispatch."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator

import mpmath
import numpy as np
import pytest
import torch
from scipy.stats import entropy
from torch.distributions import (
    Binomial,
    Categorical,
    Distribution,
    MixtureSameFamily,
    Normal,
    OneHotCategorical,
    OneHotCategoricalStraightThrough,
    kl_divergence,
)
from torch.distributions import kl as torch_kl

import distkl.rules.categorical as rules
from distkl import bounded_kl, js_divergence
from distkl._categorical import (
    categorical_log_probs,
    is_categorical_family,
    kl_categorical_mixture_pair,
)
from distkl.registry import kl_rules
from tests.examples import EDGE, INFINITE, by_family, copy_of, params

ROWS = by_family("categorical")
INF = math.inf


# ---- independent references -----------------------------------------------------------------


def ref_probs(d: Distribution) -> np.ndarray:
    """Probabilities ``(*batch, K)`` in float64 numpy, from d's parameters upcast to float64."""
    if isinstance(d, MixtureSameFamily):
        w = torch.softmax(d.mixture_distribution.logits.detach().cpu().double(), -1).numpy()
        comp = ref_probs(d.component_distribution)
        return (w[..., None] * comp).sum(-2)
    return torch.softmax(d.logits.detach().cpu().double(), -1).numpy()


def ref_kl(p: Distribution, q: Distribution) -> np.ndarray:
    """scipy.stats.entropy(p, q) for every pair of the broadcast batch."""
    pp, qq = ref_probs(p), ref_probs(q)
    batch = np.broadcast_shapes(pp.shape[:-1], qq.shape[:-1])
    pp = np.broadcast_to(pp, batch + pp.shape[-1:]).reshape(-1, pp.shape[-1])
    qq = np.broadcast_to(qq, batch + qq.shape[-1:]).reshape(-1, qq.shape[-1])
    return np.array([entropy(a, b) for a, b in zip(pp, qq)]).reshape(batch)


def tol(dtype: torch.dtype) -> dict:
    return (
        {"rtol": 1e-11, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    )


# ---- rebuilding a distribution from its (leaf) logits, for gradients -------------------------


def leaves(d: Distribution) -> list[torch.Tensor]:
    if isinstance(d, MixtureSameFamily):
        return [d.mixture_distribution.logits, *leaves(d.component_distribution)]
    return [d.logits]


def rebuild(d: Distribution, it: Iterator[torch.Tensor]) -> Distribution:
    if isinstance(d, MixtureSameFamily):
        w = next(it)
        return MixtureSameFamily(Categorical(logits=w), rebuild(d.component_distribution, it))
    return type(d)(logits=next(it))


def with_grad(p: Distribution, q: Distribution):
    xs = [t.detach().clone().requires_grad_() for t in leaves(p) + leaves(q)]
    n = len(leaves(p))
    return xs, rebuild(p, iter(xs[:n])), rebuild(q, iter(xs[n:]))


def kl_of(p: Distribution, q: Distribution) -> torch.Tensor:
    if isinstance(p, MixtureSameFamily) and isinstance(q, MixtureSameFamily):
        return kl_categorical_mixture_pair(p, q)  # (MSF, MSF) is registered by rules/mixture.py
    return kl_divergence(p, q)


# ---- the example table -----------------------------------------------------------------------


@pytest.mark.parametrize("ex", params(ROWS))
def test_value_matches_scipy(ex, device, dtype):
    p, q = ex.build(device, dtype)
    kl = kl_of(p, q)
    expected = ref_kl(p, q)
    assert kl.shape == torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert kl.dtype == dtype and kl.device.type == device.type
    np.testing.assert_allclose(kl.cpu().double().numpy(), expected, **tol(dtype), err_msg=ex.id)


@pytest.mark.parametrize("ex", params(ROWS))
def test_kl_to_itself_is_zero(ex, device, dtype):
    p, q = ex.build(device, dtype)
    log_ref = torch.as_tensor(np.log(ref_probs(p)), device=device, dtype=dtype)  # p, as q's type
    base = q.component_distribution if isinstance(q, MixtureSameFamily) else q
    twin: Distribution = type(base)(logits=log_ref)
    if isinstance(q, MixtureSameFamily):  # a one-component mixture equal to p
        one = torch.zeros(log_ref.shape[:-1] + (1,), device=device, dtype=dtype)
        twin = MixtureSameFamily(Categorical(logits=one), type(base)(logits=log_ref.unsqueeze(-2)))
    kl = kl_of(p, twin)
    assert torch.all(kl.abs() <= (1e-12 if dtype == torch.float64 else 2e-6)), (ex.id, kl)
    copy_kl = kl_categorical_mixture_pair(p, copy_of(p))  # rebuilt: logits renormalised
    assert torch.all(copy_kl.abs() <= (1e-12 if dtype == torch.float64 else 2e-6)), (ex.id, copy_kl)


@pytest.mark.parametrize("ex", params(ROWS))
def test_gradcheck(ex):
    p, q = ex.build("cpu", torch.float64)
    xs, _, _ = with_grad(p, q)
    n = len(leaves(p))

    def f(*ts):
        return kl_of(rebuild(p, iter(ts[:n])), rebuild(q, iter(ts[n:])))

    assert torch.autograd.gradcheck(f, tuple(xs))


@pytest.mark.parametrize("ex", params(ROWS))
def test_gradients_finite(ex, device, dtype):
    xs, p, q = with_grad(*ex.build(device, dtype))
    kl_of(p, q).sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)


# ---- zeros, infinities, precision ------------------------------------------------------------


@pytest.mark.parametrize("make", [m for _, m in INFINITE], ids=[i for i, _ in INFINITE])
def test_infinite_pairs(make, device, dtype):
    xs, p, q = with_grad(*make(device, dtype))
    kl = kl_divergence(p, q)
    assert torch.all(kl == INF), kl
    kl.sum().backward()
    # The value is infinite; what gradient there is must not be NaN.
    assert all(not torch.isnan(x.grad).any() for x in xs)


@pytest.mark.parametrize("make", [m for _, m in INFINITE], ids=[i for i, _ in INFINITE])
def test_infinite_pairs_reversed_match_scipy(make, device, dtype):
    # Swapping p and q: the supports in these rows are such that KL(q || p) is +inf or finite;
    # either way it matches scipy and is never NaN.
    p, q = make(device, dtype)
    kl = kl_divergence(q, p)
    assert not torch.isnan(kl).any()
    np.testing.assert_allclose(kl.cpu().double().numpy(), ref_kl(q, p), **tol(dtype))


@pytest.mark.parametrize("make", [m for _, m in EDGE], ids=[i for i, _ in EDGE])
def test_edge_values_and_gradients(make, device, dtype):
    xs, p, q = with_grad(*make(device, dtype))
    kl = kl_divergence(p, q)
    np.testing.assert_allclose(kl.detach().cpu().double().numpy(), ref_kl(p, q), **tol(dtype))
    kl.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in xs)


def test_zero_in_p_gradcheck():
    p_logits = torch.tensor([0.0, -INF, 1.0, 0.3], dtype=torch.float64, requires_grad=True)
    q_logits = torch.tensor([0.5, -0.5, 2.0, 0.1], dtype=torch.float64, requires_grad=True)

    def f(a, b):
        return kl_divergence(Categorical(logits=a), OneHotCategorical(logits=b))

    assert torch.autograd.gradcheck(f, (p_logits, q_logits))


def test_torch_categorical_rule_has_nan_gradients_ours_does_not():
    a = torch.tensor([0.0, -INF, 1.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.5, -0.5, 2.0], dtype=torch.float64)
    # torch's Categorical-Categorical rule masks its output in place: NaN gradient w.r.t. a.
    kl_divergence(Categorical(logits=a), Categorical(logits=b)).backward()
    assert torch.isnan(a.grad).any(), "torch's own rule no longer gives NaN; update the docs"
    a.grad = None
    kl = kl_divergence(Categorical(logits=a), OneHotCategorical(logits=b))
    kl.backward()
    assert torch.isfinite(a.grad).all(), a.grad
    expected = entropy([1 / (1 + math.e), 0, math.e / (1 + math.e)], torch.softmax(b, -1).numpy())
    assert kl.item() == pytest.approx(expected, rel=1e-13)


def _mp_kl(log_p: list, log_q: list) -> float:
    return float(sum(mpmath.exp(a) * (a - b) for a, b in zip(log_p, log_q)))


def _mp_log_softmax(x: list) -> list:
    lse = mpmath.log(mpmath.fsum(mpmath.exp(mpmath.mpf(v)) for v in x))
    return [mpmath.mpf(v) - lse for v in x]


def test_peaked_k1000_exact_against_mpmath(dtype):
    mpmath.mp.dps = 50
    k = 1000
    p_logits = [0.0] + [-60.0] * (k - 1)
    ref = _mp_kl(_mp_log_softmax(p_logits), _mp_log_softmax([0.0] * k))
    p = Categorical(logits=torch.tensor(p_logits, dtype=dtype))
    q = OneHotCategorical(logits=torch.zeros(k, dtype=dtype))
    assert kl_divergence(p, q).item() == pytest.approx(
        ref, rel=1e-14 if dtype == torch.float64 else 1e-6
    )


def test_tiny_probs_given_as_probs_stay_exact():
    # q puts e^-30 on 999 of K = 1000 categories. torch's Categorical(probs=...) turns them into
    # logits clamped at log(eps) = -15.9 in float32, and its own rule is then off by 14 nats.
    mpmath.mp.dps = 50
    k = 1000
    q_logits = [0.0] + [-30.0] * (k - 1)
    ref = _mp_kl(_mp_log_softmax([0.0] * k), _mp_log_softmax(q_logits))
    q_probs = torch.softmax(torch.tensor(q_logits, dtype=torch.float64), -1).float()
    p_probs = torch.full((k,), 1.0 / k)
    ours = kl_divergence(Categorical(probs=p_probs), OneHotCategorical(probs=q_probs)).item()
    theirs = kl_divergence(Categorical(probs=p_probs), Categorical(probs=q_probs)).item()
    print(
        f"K=1000 float32: exact {ref:.6f}, distkl {ours:.6f}, torch Categorical rule {theirs:.6f}"
    )
    assert ours == pytest.approx(ref, rel=1e-6)
    assert abs(theirs - ref) > 10.0, "torch's probs clamping is gone; update the docs"
    # Same numbers when q is given by logits.
    ours_logits = kl_divergence(
        Categorical(probs=p_probs), OneHotCategorical(logits=torch.tensor(q_logits))
    ).item()
    assert ours_logits == pytest.approx(ref, rel=1e-6)


def test_underflowing_logits_stay_finite():
    # exp(-200) underflows to 0 in float32: torch's rule reads q.probs == 0 and says +inf.
    mpmath.mp.dps = 50
    p_logits, q_logits = [0.0, 0.0, 0.0], [0.0, -200.0, -200.0]
    ref = _mp_kl(_mp_log_softmax(p_logits), _mp_log_softmax(q_logits))
    p = Categorical(logits=torch.tensor(p_logits))
    q_logits_t = torch.tensor(q_logits)
    ours = kl_divergence(p, OneHotCategorical(logits=q_logits_t)).item()
    assert ours == pytest.approx(ref, rel=1e-6)
    assert kl_divergence(p, Categorical(logits=q_logits_t)).item() == INF


def test_zero_probs_given_as_probs(device, dtype):
    p = Categorical(probs=torch.tensor([0.5, 0.5, 0.0], device=device, dtype=dtype))
    q = OneHotCategorical(probs=torch.tensor([0.5, 0.0, 0.5], device=device, dtype=dtype))
    r = OneHotCategorical(probs=torch.tensor([0.2, 0.8, 0.0], device=device, dtype=dtype))
    assert kl_divergence(p, q).item() == INF  # torch's clamped logits would make it finite
    assert kl_divergence(p, r).item() == pytest.approx(
        entropy([0.5, 0.5, 0], [0.2, 0.8, 0]), rel=1e-6
    )
    assert kl_divergence(r, p).item() == pytest.approx(
        entropy([0.2, 0.8, 0], [0.5, 0.5, 0]), rel=1e-6
    )


def test_probs_gradient_finite_at_zero():
    probs = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    q = OneHotCategorical(logits=torch.zeros(3, dtype=torch.float64))
    kl = kl_divergence(Categorical(probs=probs), q)
    kl.backward()
    assert torch.isfinite(probs.grad).all(), probs.grad


def test_mixture_with_impossible_category_gradients(device, dtype):
    w = torch.tensor([0.3, -0.2], device=device, dtype=dtype, requires_grad=True)
    c = torch.tensor([[0.0, -INF, 0.0], [1.0, -INF, -INF]], device=device, dtype=dtype)
    c.requires_grad_()
    x = torch.tensor([0.1, 0.2, -0.3], device=device, dtype=dtype, requires_grad=True)
    m = MixtureSameFamily(Categorical(logits=w), Categorical(logits=c))
    out = kl_divergence(m, Categorical(logits=x))
    assert torch.isfinite(out)
    np.testing.assert_allclose(out.item(), ref_kl(m, Categorical(logits=x)), **tol(dtype))
    out.backward()
    assert all(torch.isfinite(t.grad).all() for t in (w, c, x))
    log_m = categorical_log_probs(m)
    assert log_m[1].item() == -INF
    assert kl_divergence(Categorical(logits=x), m).item() == INF


# ---- errors ----------------------------------------------------------------------------------


def test_category_count_mismatch():
    p = Categorical(logits=torch.zeros(3))
    q = OneHotCategorical(logits=torch.zeros(4))
    with pytest.raises(ValueError, match="same number of categories, got 3 and 4"):
        kl_divergence(p, q)
    with pytest.raises(ValueError, match="got 4 and 3"):
        kl_divergence(q, p)
    m = MixtureSameFamily(Categorical(logits=torch.zeros(2)), Categorical(logits=torch.zeros(2, 5)))
    with pytest.raises(ValueError, match="got 5 and 3"):
        kl_divergence(m, p)


def test_unsupported_mixture_components():
    # A mixture of Binomial(4) lives on {0, ..., 4} like a Categorical with 5 categories, but
    # distkl has no rule for it: say so, naming what is supported.
    mix = MixtureSameFamily(
        Categorical(logits=torch.zeros(2)), Binomial(4, probs=torch.tensor([0.2, 0.7]))
    )
    cat = Categorical(logits=torch.zeros(5))
    onehot = OneHotCategorical(logits=torch.zeros(5))
    for p, q in [(mix, cat), (cat, mix), (mix, onehot), (onehot, mix)]:
        with pytest.raises(NotImplementedError, match=r"MixtureSameFamily\(Binomial\)") as e:
            kl_divergence(p, q)
        assert "MixtureSameFamily(Categorical)" in str(e.value)
        assert "OneHotCategorical" in str(e.value)
    gmm = MixtureSameFamily(Categorical(logits=torch.zeros(2)), Normal(torch.zeros(2), 1.0))
    with pytest.raises(NotImplementedError, match=r"MixtureSameFamily\(Normal\)"):
        kl_divergence(gmm, cat)
    with pytest.raises(NotImplementedError, match="supported: Categorical"):
        kl_categorical_mixture_pair(gmm, mix)


# ---- registration and dispatch ---------------------------------------------------------------

OURS = {
    (Categorical, OneHotCategorical),
    (OneHotCategorical, Categorical),
    (MixtureSameFamily, Categorical),
    (Categorical, MixtureSameFamily),
    (MixtureSameFamily, OneHotCategorical),
    (OneHotCategorical, MixtureSameFamily),
}


def test_registered_pairs():
    mine = {(r.type_p, r.type_q): r for r in kl_rules() if r.module == rules.__name__}
    assert set(mine) == OURS
    assert all(r.kind == "exact" for r in mine.values())
    for pair, r in mine.items():
        assert torch_kl._KL_REGISTRY[pair] is r.fn
    # torch's own same-family rules are untouched.
    for pair in [(Categorical, Categorical), (OneHotCategorical, OneHotCategorical)]:
        assert torch_kl._KL_REGISTRY[pair].__module__ == "torch.distributions.kl"
    mixture_pair = torch_kl._KL_REGISTRY.get((MixtureSameFamily, MixtureSameFamily))
    assert mixture_pair is None or mixture_pair.__module__ != rules.__name__


def test_subclass_dispatch(device):
    st = OneHotCategoricalStraightThrough(logits=torch.tensor([0.2, -1.0, 0.5], device=device))
    cat = Categorical(logits=torch.tensor([0.0, 0.3, -0.3], device=device))
    mix = MixtureSameFamily(
        Categorical(logits=torch.zeros(2, device=device)),
        OneHotCategoricalStraightThrough(logits=torch.randn(2, 3, device=device)),
    )
    assert torch_kl._dispatch_kl(type(st), Categorical) is rules._kl_categorical_onehotcategorical
    expected = entropy(st.probs.cpu().numpy(), cat.probs.cpu().numpy())
    assert kl_divergence(st, cat).item() == pytest.approx(expected, rel=1e-5)
    assert kl_divergence(cat, st).item() == pytest.approx(
        entropy(cat.probs.cpu().numpy(), st.probs.cpu().numpy()), rel=1e-5
    )
    assert kl_divergence(st, mix).item() == pytest.approx(ref_kl(st, mix).item(), rel=1e-5)
    assert kl_divergence(mix, cat).item() == pytest.approx(ref_kl(mix, cat).item(), rel=1e-5)


def test_no_ambiguity_warnings():
    z = torch.zeros(3)
    dists = [
        Categorical(logits=z),
        OneHotCategorical(logits=z),
        OneHotCategoricalStraightThrough(logits=z),
        MixtureSameFamily(
            Categorical(logits=torch.zeros(2)), Categorical(logits=torch.zeros(2, 3))
        ),
        MixtureSameFamily(
            Categorical(logits=torch.zeros(2)), OneHotCategorical(logits=torch.zeros(2, 3))
        ),
    ]
    for p, q in itertools.product(dists, dists):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch_kl._dispatch_kl(type(p), type(q))  # not memoised: warns on every ambiguity
            try:
                kl = kl_divergence(p, q)
            except NotImplementedError:
                assert isinstance(p, MixtureSameFamily) and isinstance(q, MixtureSameFamily)
            else:
                assert kl.item() == pytest.approx(0.0, abs=1e-6)
        assert not caught, [str(w.message) for w in caught]


def test_is_categorical_family():
    z = torch.zeros(3)
    assert is_categorical_family(Categorical(logits=z))
    assert is_categorical_family(OneHotCategoricalStraightThrough(logits=z))
    assert is_categorical_family(
        MixtureSameFamily(Categorical(logits=torch.zeros(2)), Categorical(logits=torch.zeros(2, 3)))
    )
    assert not is_categorical_family(Normal(0.0, 1.0))
    assert not is_categorical_family(
        MixtureSameFamily(Categorical(logits=torch.zeros(2)), Normal(torch.zeros(2), 1.0))
    )


def test_mixture_batch_broadcasting(dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 3, generator=g, dtype=dtype)  # mixing weights broadcast over the batch
    c = torch.randn(4, 3, 5, generator=g, dtype=dtype)
    m = MixtureSameFamily(Categorical(logits=w), OneHotCategorical(logits=c))
    q = Categorical(logits=torch.randn(2, 1, 5, generator=g, dtype=dtype))
    kl = kl_divergence(m, q)
    assert kl.shape == (2, 4)
    np.testing.assert_allclose(kl.numpy(), ref_kl(m, q), **tol(dtype))
    np.testing.assert_allclose(kl_divergence(q, m).numpy(), ref_kl(q, m), **tol(dtype))


# ---- NaN, batch shapes, subclasses (issue 11) -------------------------------------------------


def _nan_family(device: torch.device) -> dict[str, Distribution]:
    """Categorical-family distributions with a NaN in the first batch row, validation off."""
    bad = torch.tensor([[0.1, math.nan, 0.4], [0.1, 0.2, 0.4]], device=device)
    off = {"validate_args": False}
    return {
        "Categorical(logits)": Categorical(logits=bad, **off),
        "Categorical(probs)": Categorical(probs=bad, **off),
        "OneHotCategorical(logits)": OneHotCategorical(logits=bad, **off),
        "OneHotCategorical(probs)": OneHotCategorical(probs=bad, **off),
        "Mixture(NaN weight)": MixtureSameFamily(
            Categorical(probs=torch.tensor([[math.nan, 1.0], [0.5, 0.5]], device=device), **off),
            Categorical(logits=torch.zeros(2, 2, 3, device=device), **off),
            **off,
        ),
        "Mixture(NaN component)": MixtureSameFamily(
            Categorical(logits=torch.zeros(2, 2, device=device), **off),
            OneHotCategorical(logits=bad.unsqueeze(-2).expand(2, 2, 3), **off),
            **off,
        ),
    }


@pytest.mark.parametrize(
    "name",
    [
        "Categorical(logits)",
        "Categorical(probs)",
        "OneHotCategorical(logits)",
        "OneHotCategorical(probs)",
        "Mixture(NaN weight)",
        "Mixture(NaN component)",
    ],
)
def test_nan_in_gives_nan_out_without_validation(name, device, monkeypatch):
    # OneHotCategorical builds its inner Categorical with torch's default validation.
    monkeypatch.setattr(Distribution, "_validate_args", False)
    bad = _nan_family(device)[name]
    good = torch.tensor([0.3, 0.3, 0.4], device=device)
    partners = [Categorical(probs=good), OneHotCategorical(probs=good)]
    for other in partners:
        if type(other) is type(bad):  # torch's own rule, not distkl's
            continue
        for p, q in [(bad, other), (other, bad)]:
            for value in (
                kl_divergence(p, q),
                kl_categorical_mixture_pair(p, q),
                js_divergence(p, q),
                bounded_kl(p, q, bound=1.0),
            ):
                assert value.shape == (2,)
                assert value[0].isnan() and torch.isfinite(value[1]), (name, type(other), value)


def test_nan_with_torch_default_validation_off(monkeypatch):
    monkeypatch.setattr(Distribution, "_validate_args", False)
    p = Categorical(logits=torch.tensor([math.nan, 0.0, 0.0]))
    q = OneHotCategorical(logits=torch.zeros(3))
    assert kl_divergence(p, q).isnan() and kl_divergence(q, p).isnan()


def test_nan_with_validation_on_is_value_error():
    with pytest.raises(ValueError):
        Categorical(logits=torch.tensor([math.nan, 0.0]), validate_args=True)


def test_nonbroadcasting_batch_shapes_are_value_errors():
    p = Categorical(logits=torch.zeros(2, 3))
    q = OneHotCategorical(logits=torch.zeros(3, 3))
    mix = MixtureSameFamily(
        Categorical(logits=torch.zeros(3, 2)), Categorical(logits=torch.zeros(3, 2, 3))
    )
    for a, b in [(p, q), (q, p), (p, mix), (mix, p)]:
        for fn in (kl_divergence, js_divergence):
            with pytest.raises(ValueError, match=r"batch shapes must broadcast, got \(\d,\) and"):
                fn(a, b)
        with pytest.raises(ValueError, match="batch shapes must broadcast"):
            bounded_kl(a, b, bound=1.0)


class _MyCategorical(Categorical):
    pass


class _MyOneHot(OneHotCategorical):
    pass


def test_subclasses_are_supported_everywhere():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    p, q = _MyCategorical(logits=a), _MyOneHot(logits=b)
    mix = MixtureSameFamily(
        _MyCategorical(logits=torch.zeros(4, 2)),
        _MyOneHot(logits=torch.randn(4, 2, 5, generator=g)),
    )
    assert is_categorical_family(p) and is_categorical_family(q) and is_categorical_family(mix)
    ref_pq = ref_kl(p, q)
    np.testing.assert_allclose(kl_divergence(p, q).numpy(), ref_pq, rtol=2e-5)
    np.testing.assert_allclose(bounded_kl(p, q, bound=1e6).numpy(), ref_pq, rtol=2e-5)
    np.testing.assert_allclose(kl_divergence(mix, p).numpy(), ref_kl(mix, p), rtol=2e-5)
    np.testing.assert_allclose(kl_divergence(q, mix).numpy(), ref_kl(q, mix), rtol=2e-5)
    js = js_divergence(p, q)
    js_plain = js_divergence(Categorical(logits=a), OneHotCategorical(logits=b))
    torch.testing.assert_close(js, js_plain)
    torch.testing.assert_close(js_divergence(mix, p), js_divergence(p, mix, skew=0.5))


def test_kl_and_jsd_of_a_copy_are_exactly_zero(dtype):
    # A copy, not the same object: no identity shortcut can answer.
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 6, generator=g, dtype=dtype)
    p = OneHotCategorical(logits=logits)
    twin = Categorical(logits=logits.clone() + 0.0)
    assert torch.all(kl_divergence(p, twin) == 0) and torch.all(kl_divergence(twin, p) == 0)
    assert torch.all(js_divergence(p, twin) == 0)
    # Built from probs instead of logits: equal up to the rounding of exp and log.
    js = js_divergence(twin, OneHotCategorical(probs=p.probs.clone()))
    assert torch.all(js.abs() <= (1e-15 if dtype == torch.float64 else 1e-7)), js
