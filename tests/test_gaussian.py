"""distkl._gaussian: the one home of Gaussian algebra, checked against torch's closed forms."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

import distkl
from distkl._gaussian import (
    as_gaussian_mixture,
    entropies,
    expected_log_density,
    half_log_det,
    loc_scale_1d,
    mixture_log_density,
    pairwise_kl,
    same_parameters,
    to_float64,
)
from distkl.approx import kl_unscented, kl_variational
from distkl.bounds import kl_bounds
from distkl.examples import random_spd
from distkl.montecarlo import jsd_mc, kl_mc
from distkl.quadrature import jsd_quadrature, kl_quadrature
from distkl.registry import js_divergence
from tests.conftest import F64, Z


def _families(g: torch.Generator):
    """Three components of each layout (diagonal, dense), float64, batch (2, 3)."""
    loc = torch.randn(2, 3, 4, generator=g, dtype=F64)
    scale = torch.rand(2, 3, 4, generator=g, dtype=F64) + 0.5
    cov = random_spd(2, 3, d=4, generator=g)
    return Independent(Normal(loc, scale), 1), MultivariateNormal(loc.flip(-1), cov)


@pytest.mark.parametrize("dense_p", [False, True], ids=["diag-p", "dense-p"])
@pytest.mark.parametrize("dense_q", [False, True], ids=["diag-q", "dense-q"])
def test_pairwise_quantities_match_torch(dense_p, dense_q):
    g = torch.Generator().manual_seed(1)
    p = _families(g)[int(dense_p)]
    q = _families(g)[int(dense_q)]
    # Components along the batch's last dim: view (2, 3) batches as (2,) mixtures of K = 3.
    mp, mq = as_gaussian_mixture(p), as_gaussian_mixture(q)
    kp = _components(mp)
    kq = _components(mq)
    kl = pairwise_kl(kp, kq)  # (2, 3, 3)
    cross = expected_log_density(kp, kq)
    for a in range(3):
        for b in range(3):
            pa, qb = _pick(p, a), _pick(q, b)
            ref = kl_divergence(pa, qb)
            torch.testing.assert_close(kl[:, a, b], ref, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(cross[:, a, b], -pa.entropy() - ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(entropies(kp), _entropy_grid(p), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(2.0 * half_log_det(kp), kp.log_det_cov())


def _components(m):
    """Reinterpret the last batch dim of a one-component canonical form as the components."""
    return type(m)(
        torch.full(m.batch_shape, -torch.log(torch.tensor(3.0, dtype=F64))),
        m.loc.squeeze(-2),
        None if m.scale_diag is None else m.scale_diag.squeeze(-2),
        None if m.scale_tril is None else m.scale_tril.squeeze(-3),
        m.event_shape,
    )


def _pick(d, k):
    if isinstance(d, Independent):
        return Independent(Normal(d.base_dist.loc[:, k], d.base_dist.scale[:, k]), 1)
    return MultivariateNormal(d.loc[:, k], scale_tril=d.scale_tril[:, k])


def _entropy_grid(d):
    return d.entropy()


def test_mixture_log_density_matches_torch():
    g = torch.Generator().manual_seed(2)
    p = _families(g)[1]
    m = _components(as_gaussian_mixture(p))
    x = torch.randn(2, 5, 4, generator=g, dtype=F64)
    per_comp = p.log_prob(x.transpose(0, 1).unsqueeze(-2))  # (5, 2, 3)
    ref = (per_comp + m.log_weights).logsumexp(-1).transpose(0, 1)
    torch.testing.assert_close(mixture_log_density(x, m), ref)


def test_same_parameters_compares_values_not_objects():
    loc = torch.tensor([0.0, 1.0])
    p = as_gaussian_mixture(Normal(loc, torch.ones(2)))
    q = as_gaussian_mixture(Normal(loc.clone(), torch.tensor([1.0, 2.0])))
    assert same_parameters(p, q).tolist() == [True, False]
    dense = as_gaussian_mixture(MultivariateNormal(torch.zeros(1), torch.eye(1)))
    diag = as_gaussian_mixture(Independent(Normal(torch.zeros(1), torch.ones(1)), 1))
    assert same_parameters(dense, diag).item()


def test_to_float64_and_loc_scale_1d():
    m = as_gaussian_mixture(Normal(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])))
    m64 = to_float64(m)
    assert m64.loc.dtype == m64.log_weights.dtype == m64.scale_diag.dtype == F64
    loc, scale = loc_scale_1d(m64)
    assert loc.tolist() == [[1.0], [2.0]] and scale.tolist() == [[3.0], [4.0]]


# ---- issue 11.3: exact mixture weights in every Gaussian method ----------------------------


def _gen():
    return torch.Generator().manual_seed(5)


KL_METHODS = {
    "quadrature": kl_quadrature,
    "variational": kl_variational,
    "unscented": kl_unscented,
    "bounds-lower": lambda p, q: kl_bounds(p, q).lower,
    "bounds-upper": lambda p, q: kl_bounds(p, q).upper,
    "mc": lambda p, q: kl_mc(p, q, num_samples=64, generator=_gen()).value,
    "registered": kl_divergence,
    "jsd-quadrature": jsd_quadrature,
    "jsd-mc": lambda p, q: jsd_mc(p, q, num_samples=64, generator=_gen()).value,
    "js_divergence": js_divergence,
}


def _zero_weight_pair(dtype, far, reverse):
    w = torch.tensor([1.0, 0.0], dtype=dtype, requires_grad=True)
    loc = torch.tensor([0.0, far], dtype=dtype, requires_grad=True)
    mix = MixtureSameFamily(Categorical(probs=w), Normal(loc, torch.ones(2, dtype=dtype)))
    single = Normal(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    return (single, mix, (w, loc)) if reverse else (mix, single, (w, loc))


@pytest.mark.parametrize("method", list(KL_METHODS))
@pytest.mark.parametrize("far", [100.0, 1e9])
@pytest.mark.parametrize("reverse", [False, True], ids=["mixture-p", "mixture-q"])
def test_zero_weight_component_counts_zero(method, far, reverse, dtype):
    """KL(Mixture(probs=[1, 0], N(0,1), N(far,1)) || N(0,1)) = 0, and back: truly 0.

    torch's clamped logits made it 6e-4 (float32, far=100) and 111 nats (float64, far=1e9).
    """
    p, q, leaves = _zero_weight_pair(dtype, far, reverse)
    value = KL_METHODS[method](p, q)
    assert value.dtype == dtype
    if method == "mc" and reverse:
        # A single Gaussian p goes through the closed-form-entropy estimator: unbiased, not
        # pointwise 0. The clamped weight gave 6e-4 (float32) and 111 nats (float64, far=1e9).
        est = kl_mc(p, q, num_samples=64, generator=_gen())
        assert est.value.abs().item() <= Z * est.stderr.item(), est
        return
    # kl_bounds widens its upper bound by a documented 1e-12 nats (then rounds outward).
    assert 0.0 <= value.item() <= (1.0001e-12 if method == "bounds-upper" else 0.0), value
    grads = torch.autograd.grad(value, leaves, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads), grads


@pytest.mark.parametrize("far", [100.0, 1e9])
def test_zero_weight_bounds_bracket_the_truth(far, dtype):
    for reverse in (False, True):
        p, q, _ = _zero_weight_pair(dtype, far, reverse)
        lower, upper = kl_bounds(p, q)
        assert lower.item() <= 0.0 <= upper.item(), (lower, upper)


def _tiny_weight_truth() -> float:
    """KL(p || N(0,1)), p = (1 - 1e-10) N(0,1) + 1e-10 N(30,1), by scipy quad (float64)."""
    w = np.array([1.0 - 1e-10, 1e-10])

    def integrand(x: float) -> float:
        log_comp = np.log(w) + scipy.stats.norm.logpdf(x, loc=[0.0, 30.0])
        log_p = scipy.special.logsumexp(log_comp)
        return float(np.exp(log_p) * (log_p - scipy.stats.norm.logpdf(x)))

    total = 0.0
    for a, b in [(-40.0, 15.0), (15.0, 60.0)]:
        part, _ = scipy.integrate.quad(
            integrand,
            a,
            b,
            points=[0.0, 30.0] if a < 0 else [30.0],
            epsabs=1e-22,
            epsrel=1e-12,
            limit=500,
        )
        total += part
    return total


@pytest.mark.parametrize("method", ["quadrature", "registered", "bounds-lower", "bounds-upper"])
def test_tiny_weight_is_not_inflated(method, dtype):
    """A weight of 1e-10 counts as 1e-10: torch's logits read it as 1.2e-7 in float32 (1000x)."""
    truth = _tiny_weight_truth()
    probs = torch.tensor([1.0 - 1e-10, 1e-10], dtype=dtype)
    p = MixtureSameFamily(
        Categorical(probs=probs),
        Normal(torch.tensor([0.0, 30.0], dtype=dtype), torch.ones(2, dtype=dtype)),
    )
    q = Normal(torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype))
    value = KL_METHODS[method](p, q).item()
    # float32 cannot hold 1 - 1e-10: the weights it stores are off by 1e-10, worth ~1e-10 nats.
    tol = 1e-6 * truth if dtype == torch.float64 else 2e-10
    if method.startswith("bounds"):
        tol += 2e-12  # the bounds' documented absolute margin
    assert abs(value - truth) <= tol, (value, truth)
    if method.startswith("bounds"):
        lower, upper = kl_bounds(p, q)
        if dtype == torch.float64:
            assert lower.item() <= truth <= upper.item()


# ---- issue 11.11: subclasses of the supported families (Pyro's classes) ----------------------


class _MyNormal(Normal):
    pass


class _MyIndependent(Independent):
    pass


class _MyMixture(MixtureSameFamily):
    pass


def _subclassed(normal, independent, mixture, d):
    """A mixture and a single Gaussian built from the given classes (d = 0: scalar events)."""
    g = torch.Generator().manual_seed(7)
    shape = (2, d) if d else (2,)
    loc = torch.randn(shape, generator=g, dtype=F64)
    scale = torch.rand(shape, generator=g, dtype=F64) + 0.5
    zeros, ones = torch.zeros(shape[1:], dtype=F64), torch.ones(shape[1:], dtype=F64)
    comp, single = normal(loc, scale), normal(zeros, ones)
    if d:
        comp, single = independent(comp, 1), independent(single, 1)
    weights = Categorical(logits=torch.tensor([0.2, -0.3], dtype=F64))
    return mixture(weights, comp), single


@pytest.mark.parametrize("d", [0, 3], ids=["scalar", "vector"])
@pytest.mark.parametrize(
    "method",
    ["variational", "unscented", "quadrature", "bounds-upper", "registered", "js_divergence"],
)
def test_subclasses_are_supported(method, d):
    if method == "quadrature" and d:
        pytest.skip("quadrature is for scalar events only")
    sub = _subclassed(_MyNormal, _MyIndependent, _MyMixture, d)
    base = _subclassed(Normal, Independent, MixtureSameFamily, d)

    def call(p, q):
        # Registered rules: Monte Carlo for vector events, from a fresh seeded generator.
        g = torch.Generator().manual_seed(0)
        with distkl.options(method="mc" if d else "quadrature", num_samples=256, generator=g):
            return KL_METHODS[method](p, q)

    for p, q, bp, bq in [(*sub, *base), (sub[1], sub[0], base[1], base[0])]:
        torch.testing.assert_close(call(p, q), call(bp, bq), rtol=0, atol=0)


def test_pyro_classes_are_supported():
    """Pyro's Normal(...).to_event(1) against a Gaussian mixture (run in a subprocess)."""
    if importlib.util.find_spec("pyro") is None:
        pytest.skip("pyro-ppl is not installed")
    code = """
import torch, pyro.distributions as dist, distkl
from torch.distributions import Independent, MixtureSameFamily, Normal, Categorical, kl_divergence
loc, scale = torch.tensor([[0.0, 1.0], [2.0, -1.0]]), torch.tensor([[1.0, 0.5], [2.0, 1.5]])
comps = dist.Normal(loc, scale).to_event(1)
q = dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2)), comps)
p = dist.Normal(torch.zeros(2), 1.0).to_event(1)
tq = MixtureSameFamily(Categorical(logits=torch.zeros(2)), Independent(Normal(loc, scale), 1))
tp = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
with distkl.options(method="variational"):
    print(torch.equal(kl_divergence(p, q), kl_divergence(tp, tq)),
          torch.equal(kl_divergence(q, p), kl_divergence(tq, tp)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


# ---- issue 11.13: a negative scale (validation off) gives NaN, never the |scale| answer -----


@pytest.mark.parametrize("method", list(KL_METHODS))
def test_negative_scale_gives_nan(method):
    mix = MixtureSameFamily(
        Categorical(logits=torch.zeros(2, dtype=F64)),
        Normal(
            torch.tensor([0.0, 1.0], dtype=F64),
            torch.tensor([1.0, -2.0], dtype=F64),
            validate_args=False,
        ),
        validate_args=False,
    )
    single = Normal(torch.zeros((), dtype=F64), torch.tensor(-1.5, dtype=F64), validate_args=False)
    good = Normal(torch.zeros((), dtype=F64), torch.ones((), dtype=F64))
    for p, q in [(mix, good), (good, mix), (single, mix), (mix, single)]:
        assert torch.isnan(KL_METHODS[method](p, q)).all(), (method, p, q)
