"""Registered KL rules for Gaussian mixtures: dispatch, method selection, agreement, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import (
    Categorical,
    Gamma,
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    OneHotCategorical,
    kl_divergence,
)
from torch.distributions import kl as torch_kl

import distkl
import distkl.rules.mixture as mixture_rules
from distkl import registry
from distkl._reverse import reverse_applies
from distkl.montecarlo import kl_mc, kl_mc_value
from distkl.registry import kl_rules
from tests.conftest import Z
from tests.examples import by_family, by_id, params

ROWS = {e.id: e for e in by_family("mixture")}
SCALAR = ROWS["MixtureSameFamily(Normal)-MixtureSameFamily(Normal)"]  # 1-D events
SCALAR_SINGLE = ROWS["Normal-MixtureSameFamily(Normal)"]
VECTOR = ROWS["MixtureSameFamily(Independent(Normal))-MixtureSameFamily(MultivariateNormal)"]
CATEGORICAL_MIXTURES = {e.id: e for e in by_family("categorical")}[
    "MixtureSameFamily(Categorical)-MixtureSameFamily(Categorical)"
]

MSF = MixtureSameFamily
PAIRS = [
    (MSF, MSF),
    (MSF, Normal),
    (Normal, MSF),
    (MSF, Independent),
    (Independent, MSF),
    (MSF, MultivariateNormal),
    (MultivariateNormal, MSF),
    (MSF, LowRankMultivariateNormal),
    (LowRankMultivariateNormal, MSF),
]


def test_pairs_registered_as_estimates():
    ours = {(r.type_p, r.type_q): r for r in kl_rules() if r.module == mixture_rules.__name__}
    assert set(ours) == set(PAIRS)
    for pair, rule in ours.items():
        assert rule.kind == "estimate"
        assert torch_kl._KL_REGISTRY[pair] is rule.fn
        assert "estimate" in (rule.fn.__doc__ or "")


def _naive(p, q, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent reference: x = p.sample((n,)); mean and stderr of log p(x) - log q(x)."""
    torch.manual_seed(seed)
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    x = p.sample((n,))
    x = x.reshape(n, *(1,) * (len(batch) - len(p.batch_shape)), *x.shape[1:])
    d = p.log_prob(x) - q.log_prob(x)
    return d.mean(0), d.std(0) / math.sqrt(n)


@pytest.mark.parametrize("ex", params(by_family("mixture")))
def test_example_rows_agree_with_naive_monte_carlo(ex):
    p, q = ex.build("cpu", torch.float64)
    g = torch.Generator().manual_seed(1)
    with distkl.options(method="mc", num_samples=8192, generator=g):
        value = kl_divergence(p, q)
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert value.shape == batch and value.dtype == torch.float64
    if reverse_applies(p, q, 8192):
        # The value-only estimator (distkl._reverse): its spread from 16 seeds.
        runs = [
            kl_mc_value(p, q, num_samples=8192, generator=torch.Generator().manual_seed(s))
            for s in range(1, 17)
        ]
        torch.testing.assert_close(value, runs[0], rtol=0, atol=0)
        stack = torch.stack(runs)
        value, stderr = stack.mean(0), stack.std(0) / 4.0
    else:
        # The registered rule returns kl_mc(...).value: rerun with the same seed for the stderr.
        est = kl_mc(p, q, num_samples=8192, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(value, est.value, rtol=0, atol=0)
        stderr = est.stderr
    mean, se = _naive(p, q, 200_000, seed=2)
    z = (value - mean) / (stderr.square() + se.square()).sqrt()
    assert z.abs().max().item() < Z, (
        f"{ex.id}: N=8192 estimate={value.tolist()} stderr={stderr.tolist()} "
        f"naive={mean.tolist()} naive_stderr={se.tolist()}"
    )


@pytest.mark.parametrize("ex", params(by_family("mixture")))
def test_example_rows_on_device(ex, device, dtype):
    p, q = ex.build(device, dtype)
    with distkl.options(method="mc", num_samples=512):
        value = kl_divergence(p, q)
    assert value.shape == torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert value.dtype == dtype and value.device.type == device.type
    assert torch.isfinite(value).all()


def test_identical_mixture_is_zero():
    p, _ = SCALAR.build("cpu", torch.float64)
    copy, _ = SCALAR.build("cpu", torch.float64)  # equal parameters, another object
    for method in ("mc", "quadrature", "variational", "unscented"):
        with distkl.options(method=method):
            assert (kl_divergence(p, p) == 0).all()
            assert (kl_divergence(p, copy).abs() <= 1e-12).all(), method


def test_auto_is_mc_for_multivariate_events():
    p, q = VECTOR.build("cpu", torch.float64)
    assert p.event_shape == (3,)
    with distkl.options(method="auto", generator=torch.Generator().manual_seed(3)):
        auto = kl_divergence(p, q)
    with distkl.options(method="mc", generator=torch.Generator().manual_seed(3)):
        mc = kl_divergence(p, q)
    assert torch.equal(auto, mc)


def test_quadrature_needs_a_1d_event():
    p, q = VECTOR.build("cpu", torch.float64)
    with distkl.options(method="quadrature"):
        with pytest.raises(ValueError, match=r"1-D event \(event shape \(\)\)"):
            kl_divergence(p, q)


@pytest.mark.parametrize(
    "method, name, kwargs",
    [
        ("quadrature", "kl_quadrature", {"nodes": 17}),
        ("variational", "kl_variational", {}),
        ("unscented", "kl_unscented", {}),
    ],
)
def test_deterministic_methods_dispatch(method, name, kwargs, monkeypatch):
    """The rule calls the method's function with the documented signature."""
    calls = []

    def recorder(p, q, **kw):
        calls.append((p, q, kw))
        return torch.full(torch.broadcast_shapes(p.batch_shape, q.batch_shape), 1.25)

    monkeypatch.setattr(mixture_rules, name, recorder)
    p, q = SCALAR.build("cpu", torch.float64)  # 1-D events
    with distkl.options(method=method, quadrature_nodes=17):
        value = kl_divergence(p, q)
    assert calls and calls[0][0] is p and calls[0][1] is q and calls[0][2] == kwargs
    assert (value == 1.25).all()


def test_auto_is_quadrature_for_1d_events(monkeypatch):
    monkeypatch.setattr(
        mixture_rules, "kl_quadrature", lambda p, q, *, nodes: torch.tensor(float(nodes))
    )
    p, q = SCALAR_SINGLE.build("cpu", torch.float64)
    with distkl.options(method="auto", quadrature_nodes=33):
        assert kl_divergence(p, q).item() == 33.0


def test_real_quadrature_agrees_with_mc():
    p, q = SCALAR.build("cpu", torch.float64)
    det = distkl.kl_quadrature(p, q, nodes=128)
    est = kl_mc(p, q, num_samples=50_000, generator=torch.Generator().manual_seed(4))
    assert ((det - est.value).abs() < Z * est.stderr).all(), (det, est)


def test_categorical_mixtures_are_delegated(monkeypatch):
    calls = []

    def pair(p, q):
        calls.append((p, q))
        return torch.zeros(())

    monkeypatch.setattr(mixture_rules, "kl_categorical_mixture_pair", pair)
    p = MSF(Categorical(logits=torch.zeros(2)), Categorical(logits=torch.randn(2, 4)))
    q = MSF(Categorical(logits=torch.zeros(3)), OneHotCategorical(logits=torch.randn(3, 4)))
    mixture_rules._kl_mixture_mixture(p, q)
    assert calls == [(p, q)]


def test_categorical_mixtures_through_kl_divergence():
    from distkl.rules.categorical import kl_categorical_mixture_pair

    p, q = by_id("MixtureSameFamily(Categorical)-MixtureSameFamily(Categorical)").build(
        "cpu", torch.float64
    )
    torch.testing.assert_close(kl_divergence(p, q), kl_categorical_mixture_pair(p, q))


# ---- errors ------------------------------------------------------------------------------


def test_unsupported_component_family():
    p = MSF(Categorical(logits=torch.zeros(2)), Gamma(torch.ones(2), torch.ones(2)))
    q = MSF(Categorical(logits=torch.zeros(2)), Normal(torch.zeros(2), torch.ones(2)))
    with pytest.raises(
        NotImplementedError, match=r"MixtureSameFamily\(Gamma\).*Normal.*Categorical"
    ):
        kl_divergence(p, q)
    with pytest.raises(NotImplementedError, match=r"MixtureSameFamily\(Gamma\)"):
        kl_divergence(p, Normal(0.0, 1.0))
    with pytest.raises(NotImplementedError, match=r"Independent\(Gamma, 1\)"):
        kl_divergence(
            Independent(Gamma(torch.ones(3), torch.ones(3)), 1),
            MSF(
                Categorical(logits=torch.zeros(2)),
                Independent(Normal(torch.zeros(2, 3), torch.ones(2, 3)), 1),
            ),
        )


def test_gaussian_against_categorical_mixture():
    p = MSF(Categorical(logits=torch.zeros(2)), Normal(torch.zeros(2), torch.ones(2)))
    q = MSF(Categorical(logits=torch.zeros(2)), Categorical(logits=torch.zeros(2, 3)))
    with pytest.raises(NotImplementedError, match="not defined"):
        kl_divergence(p, q)


def test_event_shape_mismatch():
    p = MSF(
        Categorical(logits=torch.zeros(2)),
        Independent(Normal(torch.zeros(2, 3), torch.ones(2, 3)), 1),
    )
    q = MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match=r"same event shape, got \(3,\).*\(2,\)"):
        kl_divergence(p, q)


def test_batch_shapes_must_broadcast():
    p = MSF(Categorical(logits=torch.zeros(4, 2)), Normal(torch.zeros(4, 2), torch.ones(4, 2)))
    q = Normal(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="broadcast"):
        kl_divergence(p, q)


def test_invalid_options_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        distkl.options(method="sampling")
    with pytest.raises(ValueError, match="num_samples"):
        distkl.options(num_samples=0)
    with pytest.raises(TypeError, match="generator"):
        distkl.options(generator=0)
    p, q = VECTOR.build("cpu", torch.float64)
    with distkl.options(method="mc", num_samples=3):  # fewer than 2 per component: accepted
        assert kl_divergence(p, q).isfinite().all()


@pytest.mark.parametrize("method", ["variational", "unscented"])
def test_real_approximations_dispatch(method):
    """The registered rule returns exactly what the approximation returns."""
    p, q = VECTOR.build("cpu", torch.float64)
    with distkl.options(method=method):
        value = kl_divergence(p, q)
    direct = {"variational": distkl.kl_variational, "unscented": distkl.kl_unscented}[method]
    torch.testing.assert_close(value, direct(p, q), rtol=0, atol=0)


# ---- one method table for KL and JSD (issue 13.2) -------------------------------------------


def test_one_method_table_for_kl_and_jsd():
    assert set(mixture_rules.METHODS) | {"auto"} == set(distkl._options.METHODS)
    for name, method in mixture_rules.METHODS.items():
        assert method.kl is not None
        assert (method.jsd is None) == (name in ("variational", "unscented"))


@pytest.mark.parametrize("method", ["variational", "unscented"])
@pytest.mark.parametrize("row", [SCALAR, VECTOR], ids=["scalar", "vector"])
def test_jsd_refuses_a_method_without_jsd(method, row):
    """Was: silently ran "auto" (quadrature or Monte Carlo) under these methods."""
    p, q = row.build("cpu", torch.float64)
    with distkl.options(method=method):
        with pytest.raises(ValueError, match=f"method='{method}'.*no JSD counterpart"):
            distkl.js_divergence(p, q)
        # Two single Gaussians of the same event shape.
        single = p.component_distribution
        if single.event_shape:
            one = Independent(Normal(torch.zeros(single.event_shape), 1.0), 1)
            other = MultivariateNormal(torch.ones(single.event_shape), torch.eye(3))
        else:
            one, other = Normal(0.0, 1.0), Normal(1.0, 2.0)
        with pytest.raises(ValueError, match="no JSD counterpart"):
            distkl.js_divergence(one, other)


@pytest.mark.parametrize("method, name", [("quadrature", "jsd_quadrature"), ("mc", "jsd_mc")])
def test_jsd_methods_dispatch(method, name, monkeypatch):
    calls = []

    def recorder(p, q, **kw):
        calls.append(kw)
        value = torch.full(torch.broadcast_shapes(p.batch_shape, q.batch_shape), 0.25)
        return value if name == "jsd_quadrature" else distkl.Estimate(value, value, 1)

    monkeypatch.setattr(mixture_rules, name, recorder)
    p, q = SCALAR.build("cpu", torch.float64)
    g = torch.Generator()
    with distkl.options(method=method, quadrature_nodes=17, num_samples=8, generator=g):
        assert (distkl.js_divergence(p, q, skew=0.3) == 0.25).all()
    expected = (
        {"skew": 0.3, "nodes": 17}
        if method == "quadrature"
        else {"skew": 0.3, "num_samples": 8, "generator": g, "chunk_size": None}
    )
    assert calls == [expected]


def test_jsd_quadrature_needs_a_1d_event():
    p, q = VECTOR.build("cpu", torch.float64)
    with distkl.options(method="quadrature"):
        with pytest.raises(ValueError, match=r"1-D event \(event shape \(\)\)"):
            distkl.js_divergence(p, q)


# ---- per-call kind of the mixture-vs-mixture rules (issue 11.12) ------------------------------


def test_mixture_pair_kind_follows_the_components():
    cat_p, cat_q = CATEGORICAL_MIXTURES.build("cpu", torch.float64)
    gauss_p, gauss_q = SCALAR.build("cpu", torch.float64)
    for lookup in (registry.lookup_kl, registry.lookup_jsd):
        _, info = lookup(MSF, MSF)
        assert info is not None and info.module == mixture_rules.__name__
        assert info.kind_for(cat_p, cat_q) == "exact"
        assert info.kind_for(gauss_p, gauss_q) == "estimate"
        assert info.kind_summary == "exact for categorical components, estimate otherwise"
