"""The shared-prior rule of the 1-D quadrature (``distkl/quadrature/_shared.py``, issue 10.6):
many scalar Normal posteriors against one scalar Gaussian-mixture prior, as in a Bayesian network.

Truth is the composite rule with 1024 nodes (``kl_composite``, checked against scipy and mpmath in
``tests/test_quadrature.py``); gradients are checked with ``gradcheck`` in float64 and against the
per-pair rule's autograd gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal, kl_divergence

import distkl.quadrature._api as api
import distkl.quadrature._shared as shared
from distkl.quadrature import kl_composite, kl_quadrature
from tests.conftest import DEVICES, F64
from tests.test_quadrature import BLUNDELL, blundell_posteriors

#: Measured worst relative error against the 1024-node composite rule: 8.2e-10 on these tests'
#: random priors, 6.9e-11 on Blundell's prior. Asserted with a margin of about 2.
TOLERANCE = 2e-9


def _prior(logits, loc, scale, device="cpu") -> MixtureSameFamily:
    t = lambda x: torch.as_tensor(x, dtype=F64, device=device)  # noqa: E731
    return MixtureSameFamily(Categorical(logits=t(logits)), Normal(t(loc), t(scale)))


def _random_case(seed: int, n: int = 5000, device: str = "cpu"):
    """A random prior (2-4 components, scales log-uniform on [1e-3, 1e2]) and `n` posteriors whose
    means and scales span every regime of the rule."""
    g = torch.Generator().manual_seed(seed)
    k = 2 + seed % 3
    logits = torch.randn(k, generator=g, dtype=F64) * 2
    loc = torch.randn(k, generator=g, dtype=F64) * 3
    scale = torch.empty(k, dtype=F64).uniform_(math.log(1e-3), math.log(1e2), generator=g).exp()
    mu = torch.randn(n, generator=g, dtype=F64) * 3
    sigma = torch.empty(n, dtype=F64).uniform_(math.log(1e-3), math.log(1e2), generator=g).exp()
    post = Normal(mu.to(device), sigma.to(device))
    return post, _prior(logits, loc, scale, device)


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls in which the shared-prior rule answered (returned a tensor)."""
    calls = []

    def wrapped(*args):
        out = shared.kl_normal_shared_mixture(*args)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(api, "kl_normal_shared_mixture", wrapped)
    return calls


def _check_against_composite(post: Normal, prior, got: torch.Tensor, n_random: int = 150):
    """Relative error on a random subsample and on the elements where the shared and the
    per-pair rules differ most."""
    per_pair = api.kl_normal_mixture_tensors(
        post.loc.double(),
        post.scale.double(),
        prior.mixture_distribution.logits.double().expand(post.loc.shape[0], -1),
        prior.component_distribution.loc.double().expand(post.loc.shape[0], -1),
        prior.component_distribution.scale.double().expand(post.loc.shape[0], -1),
        n=16,
    )
    worst = ((got.double() - per_pair).abs() / per_pair).topk(100).indices
    rand = torch.randperm(post.loc.shape[0], generator=torch.Generator().manual_seed(3))
    idx = torch.cat([worst.cpu(), rand[:n_random]]).unique()
    sub = Normal(post.loc.cpu()[idx].double(), post.scale.cpu()[idx].double())
    cpu_prior = _prior(
        prior.mixture_distribution.logits.cpu(),
        prior.component_distribution.loc.cpu(),
        prior.component_distribution.scale.cpu(),
    )
    ref = kl_composite(sub, cpu_prior, nodes=1024)
    rel = ((got.cpu()[idx].double() - ref).abs() / ref).max().item()
    assert rel <= TOLERANCE, rel


@pytest.mark.parametrize("seed", range(9))
def test_random_priors_match_composite(seed, spy):
    post, prior = _random_case(seed)
    got = kl_divergence(post, prior)
    if not spy[-1]:  # a wide prior around narrow posteriors needs cells finer than MAX_LEVEL:
        want = api.kl_normal_mixture_tensors(  # the per-pair rule answers, unchanged
            post.loc, post.scale, *(t.expand(post.loc.shape[0], -1) for t in _params(prior)), n=8
        )
        torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)
        return
    _check_against_composite(post, prior, got)


def test_blundell_prior_matches_composite(spy):
    post = blundell_posteriors(20_000, seed=2)
    got = kl_divergence(post, BLUNDELL)
    assert spy == [True]
    _check_against_composite(post, BLUNDELL, got)


@pytest.mark.parametrize("device", DEVICES)
def test_devices_and_float32(device, spy):
    """float32 posteriors (a network's weights): the rule runs in float64, returns float32."""
    post = blundell_posteriors(8192, seed=4, dtype=torch.float32)
    post = Normal(post.loc.to(device), post.scale.to(device))
    prior = MixtureSameFamily(
        Categorical(logits=torch.zeros(2, device=device)),
        Normal(
            torch.zeros(2, device=device), torch.tensor([math.exp(-1), math.exp(-7)], device=device)
        ),
    )
    got = kl_divergence(post, prior)
    assert got.dtype == torch.float32 and got.device.type == torch.device(device).type
    assert spy == [True]
    ref = kl_divergence(Normal(post.loc.double(), post.scale.double()), prior)
    torch.testing.assert_close(got, ref.float(), rtol=2e-6, atol=0.0)


def test_batch_shape_is_kept(spy):
    post = blundell_posteriors(64 * 100, seed=5)
    post = Normal(post.loc.reshape(64, 100), post.scale.reshape(64, 100))
    got = kl_divergence(post, BLUNDELL)
    assert got.shape == (64, 100) and spy == [True]
    flat = kl_quadrature(Normal(post.loc.reshape(-1), post.scale.reshape(-1)), BLUNDELL)
    torch.testing.assert_close(got.reshape(-1), flat, rtol=0.0, atol=0.0)


def _leaves(n: int, seed: int = 6):
    post = blundell_posteriors(n, seed=seed)
    leaves = {
        "mu": post.loc.clone(),
        "log_sigma": post.scale.log(),
        "logits": torch.tensor([0.3, -0.2], dtype=F64),
        "prior_loc": torch.tensor([0.0, 1e-3], dtype=F64),
        "log_scale": torch.tensor([-1.0, -7.0], dtype=F64),
    }
    return {k: v.requires_grad_() for k, v in leaves.items()}


def _kl(t: dict) -> torch.Tensor:
    prior = MixtureSameFamily(
        Categorical(logits=t["logits"]), Normal(t["prior_loc"], t["log_scale"].exp())
    )
    return kl_divergence(Normal(t["mu"], t["log_sigma"].exp()), prior)


def test_gradients_match_the_per_pair_rule(monkeypatch, spy):
    """Gradients into the posteriors and into a learnable prior (weights, means, scales)."""
    t = _leaves(5000)
    weights = torch.rand(5000, generator=torch.Generator().manual_seed(7), dtype=F64)
    got = torch.autograd.grad((_kl(t) * weights).sum(), list(t.values()))
    assert spy == [True]
    monkeypatch.setattr(shared, "MIN_BATCH", 10**9)  # the per-pair rule
    want = torch.autograd.grad((_kl(t) * weights).sum(), list(t.values()))
    for a, b, name in zip(got, want, t):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=name)


def test_gradcheck(monkeypatch):
    """gradcheck in float64 through both regimes (Gauss-Hermite and cells) of a small batch."""
    monkeypatch.setattr(shared, "MIN_BATCH", 1)
    mu = torch.tensor([2e-3, -4e-4, 0.3, 1e-4, 0.0, 5e-3], dtype=F64)
    log_sigma = torch.tensor([1e-3, 2e-3, 0.05, 1e-5, 0.5, 4e-4], dtype=F64).log()
    leaves = (
        mu,
        log_sigma,
        torch.tensor([0.3, -0.2], dtype=F64),
        torch.tensor([-1.0, -7.0]).double(),
    )
    leaves = tuple(x.clone().requires_grad_() for x in leaves)

    def fn(mu, log_sigma, logits, log_scale):
        prior = MixtureSameFamily(
            Categorical(logits=logits), Normal(torch.zeros(2, dtype=F64), log_scale.exp())
        )
        return kl_quadrature(Normal(mu, log_sigma.exp()), prior)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-7, atol=1e-6, rtol=1e-5)


def test_second_derivatives_raise(monkeypatch):
    """The rule's first derivatives are constants computed in the forward pass: a backward with
    ``create_graph=True`` raises, naming the way out, instead of a Hessian missing their part."""
    monkeypatch.setattr(shared, "MIN_BATCH", 1)
    mu = torch.tensor([2e-3, 0.3], dtype=F64, requires_grad=True)
    kl = kl_quadrature(Normal(mu, torch.tensor([1e-3, 1e-5], dtype=F64)), BLUNDELL).sum()
    with pytest.raises(RuntimeError, match="method='mc'"):
        torch.autograd.grad(kl, mu, create_graph=True)


@pytest.mark.parametrize(
    "logits, loc, scale",
    [
        ([0.0, 0.0], [0.0, 1.0], [1.0, 1.0]),  # two widest components: G does not vanish
        ([0.0, 0.0, 0.0], [0.0, 0.5, -2.0], [2.0, 0.1, 2.0]),  # a tie with a third component
    ],
    ids=["tie", "tie-of-three"],
)
def test_ties_fall_back_to_the_per_pair_rule(logits, loc, scale, spy):
    post, _ = _random_case(11)
    prior = _prior(logits, loc, scale)
    got = kl_divergence(post, prior)
    assert spy == [False]
    want = api.kl_normal_mixture_tensors(
        post.loc, post.scale, *(t.expand(post.loc.shape[0], -1) for t in _params(prior)), n=8
    )
    torch.testing.assert_close(got, want, rtol=0.0, atol=0.0)


def _params(prior: MixtureSameFamily):
    c = prior.component_distribution
    return prior.mixture_distribution.logits, c.loc, c.scale


def test_zero_weight_components_are_dropped(spy):
    """A weight of exactly 0, on the widest component or another one, is the mixture without it."""
    post, _ = _random_case(12)
    with_zero = _prior(
        [0.0, -math.inf, 1.0, -math.inf], [0.0, 3.0, 0.5, 1.0], [1.0, 5.0, 0.1, 0.01]
    )
    without = _prior([0.0, 1.0], [0.0, 0.5], [1.0, 0.1])
    got, want = kl_divergence(post, with_zero), kl_divergence(post, without)
    assert spy == [True, True]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)


def test_one_effective_component_is_the_normal_kl(spy):
    """A prior whose other component never comes within e^-46 of the widest one: KL to it."""
    post, _ = _random_case(13)
    prior = _prior([0.0, -200.0], [0.0, 1.0], [1.0, 0.5])
    got = kl_divergence(post, prior)
    assert spy == [True]
    want = kl_divergence(post, Normal(torch.zeros((), dtype=F64), torch.ones((), dtype=F64)))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300)


def test_nan_stays_in_its_element(spy):
    """A NaN posterior parameter: NaN there (the per-pair rule takes the call), others unchanged."""
    post = blundell_posteriors(5000, seed=8)
    loc = post.loc.clone()
    loc[17] = math.nan
    got = kl_divergence(Normal(loc, post.scale, validate_args=False), BLUNDELL)
    assert spy == [False] and torch.isnan(got[17])
    keep = torch.arange(5000) != 17
    want = kl_divergence(post, BLUNDELL)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-9, atol=0.0)
