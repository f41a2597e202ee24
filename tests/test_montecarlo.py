"""distkl.kl_mc and distkl.montecarlo.expectation: unbiased, honest standard errors, gradients.

Statistical checks are seeded. Agreement is |estimate - exact| < Z * stderr with Z = 4.5 (a
false-failure rate below 1e-5 per comparison for a normal estimate); coverage of 95% intervals is
checked over 200-400 independent estimates drawn at once as a batch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate
from scipy.special import logsumexp
from torch.distributions import (
    Categorical,
    Gamma,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    Poisson,
    kl_divergence,
)

from distkl import montecarlo
from distkl.montecarlo import Estimate, expectation, kl_mc
from tests.conftest import Z

# ---- deterministic references ------------------------------------------------------------


def _np_mix(d) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(log weights, locs, scales) of a 1-D Normal or MixtureSameFamily(Normal), unbatched."""
    if isinstance(d, MixtureSameFamily):
        lw = d.mixture_distribution.logits.detach().double().numpy()
        c = d.component_distribution
        return (
            lw - logsumexp(lw),
            c.loc.detach().double().numpy(),
            c.scale.detach().double().numpy(),
        )
    return (
        np.zeros(1),
        d.loc.detach().double().numpy()[None],
        d.scale.detach().double().numpy()[None],
    )


def _log_density(x: float, mix) -> float:
    lw, mu, s = mix
    z = (x - mu) / s
    return float(logsumexp(lw - 0.5 * z * z - np.log(s) - 0.5 * np.log(2 * np.pi)))


def kl_quad(p, q) -> float:
    """KL(p || q) of unbatched 1-D Gaussian mixtures by scipy.integrate.quad."""
    mp, mq = _np_mix(p), _np_mix(q)
    lo = min((mp[1] - 14 * mp[2]).min(), (mq[1] - 14 * mq[2]).min())
    hi = max((mp[1] + 14 * mp[2]).max(), (mq[1] + 14 * mq[2]).max())

    def integrand(x: float) -> float:
        lp = _log_density(x, mp)
        return math.exp(lp) * (lp - _log_density(x, mq))

    value, _ = integrate.quad(
        integrand, lo, hi, points=sorted(mp[1]), limit=500, epsabs=1e-13, epsrel=1e-12
    )
    return value


def _mix1d(logits, loc, scale, dtype=torch.float64, device="cpu") -> MixtureSameFamily:
    t = lambda v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
    return MixtureSameFamily(Categorical(logits=t(logits)), Normal(t(loc), t(scale)))


def _replicate(d, r: int):
    """``d`` with a new leading batch dimension of size ``r`` (independent estimates per row)."""
    if isinstance(d, MixtureSameFamily):
        logits = d.mixture_distribution.logits
        return MixtureSameFamily(
            Categorical(logits=logits.expand(r, *logits.shape)),
            _replicate(d.component_distribution, r),
        )
    if isinstance(d, Normal):
        return Normal(d.loc.expand(r, *d.loc.shape), d.scale.expand(r, *d.scale.shape))
    if isinstance(d, Independent):
        return Independent(_replicate(d.base_dist, r), d.reinterpreted_batch_ndims)
    if isinstance(d, MultivariateNormal):
        return MultivariateNormal(
            d.loc.expand(r, *d.loc.shape), scale_tril=d.scale_tril.expand(r, *d.scale_tril.shape)
        )
    raise AssertionError(type(d))


P_SEPARATED = ([0.0, 0.5, -0.3], [-4.0, 0.0, 3.5], [0.7, 0.5, 1.0])
Q_WIDE = ([0.2, -0.1], [-1.0, 2.0], [2.0, 1.5])
PAIRS_1D = {
    "mixture-mixture": (P_SEPARATED, Q_WIDE),
    "mixture-overlapping": (
        ([0.0, 1.2], [0.0, 0.3], [1.0, 0.8]),
        ([0.0, 0.0], [0.1, -0.2], [1.1, 0.9]),
    ),
    "normal-mixture": (([0.0], [1.0], [0.8]), P_SEPARATED),
    "mixture-normal": (P_SEPARATED, ([0.0], [0.5], [2.5])),
}


# ---- agreement with quadrature -----------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRS_1D))
def test_agrees_with_quadrature(name):
    (pl, pm, ps), (ql, qm, qs) = PAIRS_1D[name]
    p, q = _mix1d(pl, pm, ps), _mix1d(ql, qm, qs)
    exact = kl_quad(p, q)
    g = torch.Generator().manual_seed(11)
    est = kl_mc(p, q, num_samples=20_000, generator=g)
    err = abs(est.value.item() - exact)
    assert err < Z * est.stderr.item(), (
        f"{name}: N={est.num_samples} estimate={est.value.item():.6f} "
        f"stderr={est.stderr.item():.2e} exact={exact:.6f}"
    )
    assert est.stderr.item() > 0


def test_unbiased_and_covering_on_repeats():
    """400 estimates with n=256: mean within Z standard errors, 95% coverage in [0.90, 0.99]."""
    (pl, pm, ps), (ql, qm, qs) = PAIRS_1D["mixture-mixture"]
    p, q = _mix1d(pl, pm, ps), _mix1d(ql, qm, qs)
    exact = kl_quad(p, q)
    r = 400
    g = torch.Generator().manual_seed(12)
    est = kl_mc(_replicate(p, r), _replicate(q, r), num_samples=256, generator=g)
    assert est.value.shape == (r,)
    v = est.value
    mean_err = (v.mean().item() - exact) / (v.std().item() / math.sqrt(r))
    assert abs(mean_err) < Z, f"bias: mean={v.mean().item():.5f} exact={exact:.5f} z={mean_err:.2f}"
    coverage = ((v - exact).abs() < 1.96 * est.stderr).double().mean().item()
    assert 0.90 <= coverage <= 0.99, f"coverage {coverage:.3f} (N=256, exact={exact:.5f})"


@pytest.mark.parametrize("n", [200, 4000])
def test_coverage_when_q_much_wider_than_p(n):
    """The k3 caveat: here E_p[(q/p)^2] = inf, so the k3 estimator (r - 1) - log r has infinite
    variance. kl_mc does not use the ratio control; its intervals must still cover."""
    p = _mix1d([0.0, 0.0], [-1.0, 1.0], [0.5, 0.5])
    q = _mix1d([0.0], [0.0], [3.0])  # variance 9 > 2 * 0.25: the k3 control has infinite variance
    # The premise: int q^2 / p over [-L, L] keeps growing with L.
    mp, mq = _np_mix(p), _np_mix(q)
    second = [
        integrate.quad(
            lambda x: math.exp(2 * _log_density(x, mq) - _log_density(x, mp)), -L, L, limit=200
        )[0]
        for L in (10.0, 20.0)
    ]
    assert second[1] > 1e3 * second[0]
    exact = kl_quad(p, q)
    r = 200
    g = torch.Generator().manual_seed(13)
    est = kl_mc(_replicate(p, r), _replicate(q, r), num_samples=n, generator=g)
    coverage = ((est.value - exact).abs() < 1.96 * est.stderr).double().mean().item()
    assert 0.90 <= coverage <= 0.99, f"coverage {coverage:.3f} (N={n}, exact={exact:.5f})"


def test_multivariate_coverage():
    """D = 3 mixture against a MultivariateNormal: 200 estimates against a 10^6-sample reference."""
    g = torch.Generator().manual_seed(14)
    d = 3
    comp = MultivariateNormal(
        2.0 * torch.randn(3, d, generator=g, dtype=torch.float64),
        scale_tril=torch.linalg.cholesky(torch.eye(d, dtype=torch.float64) * 0.6 + 0.2),
    )
    p = MixtureSameFamily(
        Categorical(logits=torch.tensor([0.0, 0.4, -0.2], dtype=torch.float64)), comp
    )
    q = MultivariateNormal(
        torch.zeros(d, dtype=torch.float64), 3.0 * torch.eye(d, dtype=torch.float64)
    )
    ref = kl_mc(p, q, num_samples=1_000_000, generator=g)
    r = 200
    est = kl_mc(_replicate(p, r), _replicate(q, r), num_samples=512, generator=g)
    z = (est.value - ref.value) / (est.stderr.square() + ref.stderr.square()).sqrt()
    coverage = (z.abs() < 1.96).double().mean().item()
    assert 0.90 <= coverage <= 0.99, f"coverage {coverage:.3f} (ref={ref.value.item():.5f})"


# ---- variance reduction ------------------------------------------------------------------


def test_variance_reduction_on_separated_mixtures():
    """Against the naive estimator's standard error at the same N, on separated mixtures."""
    (pl, pm, ps), (ql, qm, qs) = PAIRS_1D["mixture-mixture"]
    p, q = _mix1d(pl, pm, ps), _mix1d(ql, qm, qs)
    n = 4096
    g = torch.Generator().manual_seed(15)
    est = kl_mc(p, q, num_samples=n, generator=g)
    plain = kl_mc(p, q, num_samples=n, generator=g, control_variates=False)
    torch.manual_seed(15)
    x = p.sample((200_000,))
    naive_var = (p.log_prob(x) - q.log_prob(x)).var().item() / n
    ratio = naive_var / est.stderr.item() ** 2
    assert ratio >= 30, f"variance reduction {ratio:.1f}x < 30x"
    # Stratification alone is never worse than naive sampling (proportional allocation).
    assert naive_var / plain.stderr.item() ** 2 > 0.8


def test_never_worse_when_components_overlap():
    """Heavily overlapping components with uneven weights: no gain to expect, no loss allowed."""
    p = _mix1d([2.0, 0.0], [0.0, 0.1], [1.0, 1.1])
    q = _mix1d([0.0], [0.3], [1.3])
    n = 4096
    g = torch.Generator().manual_seed(16)
    est = kl_mc(p, q, num_samples=n, generator=g)
    torch.manual_seed(16)
    x = p.sample((200_000,))
    naive_var = (p.log_prob(x) - q.log_prob(x)).var().item() / n
    assert est.stderr.item() ** 2 <= 1.1 * naive_var


# ---- exactness, reproducibility, shapes --------------------------------------------------


def test_identical_distributions_give_exact_zero():
    p = _mix1d(*P_SEPARATED)
    same = kl_mc(p, p, num_samples=64)
    assert same.value.item() == 0.0 and same.stderr.item() == 0.0
    twin = _mix1d(*P_SEPARATED)
    est = kl_mc(p, twin, num_samples=64)
    assert est.value.item() == 0.0 and est.stderr.item() == 0.0


def test_equal_rows_in_a_batch_are_zero():
    loc = torch.tensor([[0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    p = MixtureSameFamily(
        Categorical(logits=torch.zeros(2, 2, dtype=torch.float64)),
        Normal(loc, torch.ones_like(loc)),
    )
    q_loc = torch.tensor([[0.0, 1.0], [0.5, 1.0]], dtype=torch.float64)
    q = MixtureSameFamily(
        Categorical(logits=torch.zeros(2, 2, dtype=torch.float64)),
        Normal(q_loc, torch.ones_like(q_loc)),
    )
    est = kl_mc(p, q, num_samples=256, generator=torch.Generator().manual_seed(0))
    assert est.value[0].item() == 0.0 and est.stderr[0].item() == 0.0
    assert est.value[1].item() > 0.0


def test_gaussian_pair_variance_reduction_is_capped(monkeypatch):
    """For two Gaussians log p - log q is linear in the controls; the fit is shrunk to a 1000-fold
    variance reduction (MAX_VARIANCE_REDUCTION) and the stderr reports the shrunk estimator."""
    # The stratified engine (one Gaussian p would take distkl._pathwise otherwise).
    monkeypatch.setattr(montecarlo, "pathwise_applies", lambda p, q, n: False)
    monkeypatch.setattr(montecarlo, "reverse_applies", lambda p, q, n: False)
    p = Normal(torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.7, dtype=torch.float64))
    q = Normal(torch.tensor(-1.0, dtype=torch.float64), torch.tensor(1.9, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    est = kl_mc(p, q, num_samples=4096, generator=g)
    plain = kl_mc(p, q, num_samples=4096, generator=g, control_variates=False)
    exact = kl_divergence(p, q).item()
    assert abs(est.value.item() - exact) < Z * est.stderr.item()
    ratio = (plain.stderr / est.stderr).item() ** 2
    assert 300 < ratio < 3000, ratio


def test_reproducible_with_generator():
    p, q = _mix1d(*P_SEPARATED), _mix1d(*Q_WIDE)
    a = kl_mc(p, q, num_samples=1000, generator=torch.Generator().manual_seed(5))
    b = kl_mc(p, q, num_samples=1000, generator=torch.Generator().manual_seed(5))
    c = kl_mc(p, q, num_samples=1000, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    assert not torch.equal(a.value, c.value)
    state = torch.get_rng_state()
    kl_mc(p, q, num_samples=100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(state, torch.get_rng_state()), "the global RNG must not be touched"


def test_chunked_agrees_with_unchunked():
    p, q = _mix1d(*P_SEPARATED), _mix1d(*Q_WIDE)
    g = torch.Generator().manual_seed(7)
    whole = kl_mc(p, q, num_samples=6000, generator=g)
    chunked = kl_mc(p, q, num_samples=6000, generator=g, chunk_size=700)
    assert chunked.num_samples == 6000
    diff = abs(whole.value.item() - chunked.value.item())
    assert diff < Z * math.hypot(whole.stderr.item(), chunked.stderr.item())
    assert 0.5 < chunked.stderr.item() / whole.stderr.item() < 2.0


def test_batch_broadcasting(device, dtype):
    g = torch.Generator(device=device).manual_seed(8)
    t = lambda *s: torch.randn(*s, dtype=dtype, device=device, generator=g)  # noqa: E731
    p = MixtureSameFamily(
        Categorical(logits=t(2, 1, 3)), Independent(Normal(t(2, 1, 3, 2), t(2, 1, 3, 2).exp()), 1)
    )
    q = MixtureSameFamily(
        Categorical(logits=t(4, 2)), Independent(Normal(t(4, 2, 2), t(4, 2, 2).exp()), 1)
    )
    est = kl_mc(p, q, num_samples=300, generator=g)
    assert est.value.shape == est.stderr.shape == (2, 4)
    assert est.value.dtype == dtype and est.value.device.type == device.type
    # Each element agrees with the unbatched estimate of the same pair.
    for i, j in [(0, 0), (1, 3)]:
        pi = MixtureSameFamily(
            Categorical(logits=p.mixture_distribution.logits[i, 0]),
            Independent(
                Normal(
                    p.component_distribution.base_dist.loc[i, 0],
                    p.component_distribution.base_dist.scale[i, 0],
                ),
                1,
            ),
        )
        qj = MixtureSameFamily(
            Categorical(logits=q.mixture_distribution.logits[j]),
            Independent(
                Normal(
                    q.component_distribution.base_dist.loc[j],
                    q.component_distribution.base_dist.scale[j],
                ),
                1,
            ),
        )
        single = kl_mc(pi, qj, num_samples=20_000, generator=g)
        diff = abs(est.value[i, j].item() - single.value.item())
        assert diff < Z * math.hypot(est.stderr[i, j].item(), single.stderr.item()), (i, j)


def test_p_batch_smaller_than_q_batch():
    p = _mix1d(*P_SEPARATED)
    q = Normal(
        torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64),
        torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64),
    )
    est = kl_mc(p, q, num_samples=2000, generator=torch.Generator().manual_seed(9))
    assert est.value.shape == (3,)
    for j in range(3):
        exact = kl_quad(p, Normal(q.loc[j], q.scale[j]))
        assert abs(est.value[j].item() - exact) < Z * est.stderr[j].item()


def test_float32_matches_float64():
    p32, q32 = _mix1d(*P_SEPARATED, dtype=torch.float32), _mix1d(*Q_WIDE, dtype=torch.float32)
    exact = kl_quad(p32, q32)
    est = kl_mc(p32, q32, num_samples=8000, generator=torch.Generator().manual_seed(10))
    assert est.value.dtype == torch.float32
    assert abs(est.value.item() - exact) < Z * est.stderr.item()


# ---- gradients ---------------------------------------------------------------------------


def test_gradients_unbiased_against_finite_differences():
    """Mean of 400 pathwise gradient estimates (one per batch row) vs differences of quad."""
    pl, pm, ps = ([0.0, 0.7], [-2.0, 1.5], [0.8, 0.5])
    ql, qm, qs = ([0.2, 0.0], [-1.0, 2.0], [1.0, 0.6])
    r = 400
    leaves = [
        torch.tensor(v, dtype=torch.float64).repeat(r, 1).requires_grad_(True)
        for v in (pl, pm, ps, qm)
    ]
    lw, mu, s, q_mu = leaves
    p = MixtureSameFamily(Categorical(logits=lw), Normal(mu, s))
    q = MixtureSameFamily(
        Categorical(logits=torch.tensor(ql, dtype=torch.float64)),
        Normal(q_mu, torch.tensor(qs, dtype=torch.float64)),
    )
    est = kl_mc(p, q, num_samples=256, generator=torch.Generator().manual_seed(17))
    grads = torch.autograd.grad(est.value.sum(), leaves)
    samples = torch.cat(grads, dim=-1)  # (r, 8): 400 independent gradient estimates

    h = 1e-5
    base = [np.array(v, dtype=float) for v in (pl, pm, ps, qm)]

    def ref(vals):
        pp = _mix1d(vals[0].tolist(), vals[1].tolist(), vals[2].tolist())
        qq = _mix1d(ql, vals[3].tolist(), qs)
        return kl_quad(pp, qq)

    fd = []
    for i in range(4):
        for j in range(2):
            up = [b.copy() for b in base]
            dn = [b.copy() for b in base]
            up[i][j] += h
            dn[i][j] -= h
            fd.append((ref(up) - ref(dn)) / (2 * h))
    fd_t = torch.tensor(fd, dtype=torch.float64)
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(r)
    z = (mean - fd_t) / se
    assert z.abs().max().item() < Z, (
        f"gradient z-scores {z.numpy().round(2)}, fd={fd_t.numpy().round(5)}"
    )


def test_gradient_reaches_every_parameter():
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in P_SEPARATED]
    p = MixtureSameFamily(Categorical(logits=leaves[0]), Normal(leaves[1], leaves[2]))
    est = kl_mc(p, _mix1d(*Q_WIDE), num_samples=300)
    grads = torch.autograd.grad(est.value, leaves)
    assert all(torch.isfinite(gr).all() and gr.abs().sum() > 0 for gr in grads)


# ---- families without the fast path ------------------------------------------------------


def test_gamma_mixture_by_generic_sampler():
    """MixtureSameFamily(Gamma) has no Gaussian fast path: stratified rsample + entropy control."""
    p = MixtureSameFamily(
        Categorical(logits=torch.tensor([0.0, 0.3], dtype=torch.float64)),
        Gamma(
            torch.tensor([2.0, 9.0], dtype=torch.float64),
            torch.tensor([2.0, 1.5], dtype=torch.float64),
        ),
    )
    q = Gamma(torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64))

    def integrand(x: float) -> float:
        t = torch.tensor(x, dtype=torch.float64)
        lp = p.log_prob(t).item()
        return math.exp(lp) * (lp - q.log_prob(t).item())

    exact, _ = integrate.quad(integrand, 0.0, 80.0, limit=400)
    g = torch.Generator().manual_seed(18)
    est = kl_mc(p, q, num_samples=20_000, generator=g)
    assert abs(est.value.item() - exact) < Z * est.stderr.item(), (est, exact)
    again = kl_mc(p, q, num_samples=20_000, generator=torch.Generator().manual_seed(18))
    assert torch.equal(est.value, again.value)


def test_score_function_path_for_discrete_p():
    """Poisson has no rsample: value and (score-function) gradient against torch's closed form."""
    r = 300
    rate = torch.full((r,), 3.0, dtype=torch.float64, requires_grad=True)
    q = Poisson(torch.tensor(5.0, dtype=torch.float64))
    est = kl_mc(Poisson(rate), q, num_samples=200, generator=torch.Generator().manual_seed(19))
    exact = kl_divergence(Poisson(torch.tensor(3.0, dtype=torch.float64)), q).item()
    v = est.value.detach()
    assert abs(v.mean().item() - exact) < Z * v.std().item() / math.sqrt(r)
    (grad,) = torch.autograd.grad(est.value.sum(), [rate])
    exact_grad = math.log(3.0 / 5.0)
    assert abs(grad.mean().item() - exact_grad) < Z * grad.std().item() / math.sqrt(r), (
        grad.mean().item(),
        exact_grad,
    )


# ---- expectation() -----------------------------------------------------------------------


def test_expectation_of_a_moment():
    p = _mix1d(*P_SEPARATED)
    w = torch.softmax(torch.tensor(P_SEPARATED[0], dtype=torch.float64), 0)
    mu = torch.tensor(P_SEPARATED[1], dtype=torch.float64)
    s = torch.tensor(P_SEPARATED[2], dtype=torch.float64)
    exact = (w * (mu.square() + s.square())).sum().item()
    est = expectation(
        p, lambda x: x.square(), num_samples=5000, generator=torch.Generator().manual_seed(20)
    )
    assert isinstance(est, Estimate) and est.num_samples == 5000
    assert abs(est.value.item() - exact) < Z * est.stderr.item()


def test_expectation_broadcasts_f_output_and_expands_batch():
    p = _mix1d(*P_SEPARATED)
    q = Normal(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    shared = expectation(p, lambda x: q.log_prob(x.unsqueeze(-1)), num_samples=400)
    assert shared.value.shape == (4,)
    indep = expectation(p, lambda x: q.log_prob(x), num_samples=400, batch_shape=(4,))
    assert indep.value.shape == (4,)
    assert not torch.equal(indep.value[0], indep.value[1])


def test_expectation_rejects_bad_output_shape():
    p = Normal(torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="f must return shape"):
        expectation(p, lambda x: x[:, :2], num_samples=10)


def test_interval():
    est = Estimate(torch.tensor(1.0), torch.tensor(0.5), 10)
    lo, hi = est.interval(0.95)
    assert (
        abs(lo.item() - (1.0 - 1.959964 * 0.5)) < 1e-5
        and abs(hi.item() - (1.0 + 1.959964 * 0.5)) < 1e-5
    )
    with pytest.raises(ValueError, match="level"):
        est.interval(1.5)


# ---- errors ------------------------------------------------------------------------------


def test_event_shape_mismatch():
    p = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    q = Independent(Normal(torch.zeros(2), torch.ones(2)), 1)
    with pytest.raises(ValueError, match="same event shape"):
        kl_mc(p, q, num_samples=10)


def test_batch_shapes_must_broadcast():
    with pytest.raises(ValueError, match="broadcast"):
        kl_mc(Normal(torch.zeros(2), 1.0), Normal(torch.zeros(3), 1.0), num_samples=10)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_samples=0), ValueError, "num_samples must be a positive int"),
        (dict(num_samples=2.5), ValueError, "num_samples must be a positive int"),
        (dict(num_samples=100, chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (dict(num_samples=100, generator=3), TypeError, "generator must be a torch.Generator"),
    ],
)
def test_invalid_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        kl_mc(_mix1d(*P_SEPARATED), _mix1d(*Q_WIDE), **kwargs)
