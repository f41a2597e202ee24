"""Edge cases of the Monte Carlo engine: empty batches (11.8), meta tensors (11.13), Estimate
equality (11.14) and RNG hygiene (10.8)."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import (
    Categorical,
    Distribution,
    Gamma,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

import distkl
from distkl.density import mixture_log_prob
from distkl.montecarlo import Estimate, _samplers, expectation, jsd_mc, kl_mc


def _mixture(*batch: int, k: int = 3, device="cpu") -> MixtureSameFamily:
    z = torch.zeros(*batch, k, device=device)
    return MixtureSameFamily(
        Categorical(logits=z, validate_args=False),
        Normal(z + torch.arange(k, device=device), z + 1.0, validate_args=False),
        validate_args=False,
    )


# ---- 11.8: empty batches -------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4, 64])
def test_kl_mc_empty_batch_gives_empty_result(n, device):
    p, q = _mixture(0, device=device), Normal(torch.zeros(0, device=device), 1.0)
    for a, b in ((p, q), (q, p)):
        est = kl_mc(a, b, num_samples=n)
        assert est.value.shape == (0,) and est.stderr.shape == (0,)
        assert est.value.device.type == device.type


def test_jsd_mc_and_gaussian_jsd_rule_empty_batch(device, monkeypatch):
    # torch's own validation cannot reshape an empty batch of events: switch it off.
    monkeypatch.setattr(Distribution, "_validate_args", False)
    p, q = (
        Normal(torch.zeros(0, 2, device=device), 1.0),
        Normal(torch.zeros(0, 2, device=device), 2.0),
    )
    assert jsd_mc(p, q, num_samples=8).value.shape == (0, 2)
    mp = MixtureSameFamily(
        Categorical(logits=torch.zeros(0, 2, device=device), validate_args=False),
        Independent(Normal(torch.zeros(0, 2, 3, device=device), 1.0), 1),
        validate_args=False,
    )
    mq = MultivariateNormal(torch.zeros(0, 3, device=device), torch.eye(3, device=device))
    assert jsd_mc(mp, mq, num_samples=8).value.shape == (0,)
    with distkl.options(method="mc", num_samples=8):
        assert distkl.js_divergence(mp, mq).shape == (0,)


def test_expectation_empty_batch():
    est = expectation(_mixture(0), lambda x: x.square(), num_samples=16)
    assert est.value.shape == (0,)


@pytest.mark.parametrize("kind", ["scalar", "diag", "full"])
def test_mixture_log_prob_zero_sample_rows(kind, device, monkeypatch):
    monkeypatch.setattr(Distribution, "_validate_args", False)  # torch's check fails on 0 rows
    if kind == "scalar":
        m, x = _mixture(2, device=device), torch.zeros(0, 2, device=device)
    elif kind == "diag":
        comp = Independent(Normal(torch.zeros(2, 3, 4, device=device), 1.0), 1)
        m = MixtureSameFamily(Categorical(logits=torch.zeros(2, 3, device=device)), comp)
        x = torch.zeros(0, 2, 4, device=device)
    else:
        comp = MultivariateNormal(torch.zeros(2, 3, 4, device=device), torch.eye(4, device=device))
        m = MixtureSameFamily(Categorical(logits=torch.zeros(2, 3, device=device)), comp)
        x = torch.zeros(0, 2, 4, device=device)
    out = mixture_log_prob(m, x)
    assert out.shape == (0, 2)  # torch's Independent.log_prob itself cannot reshape 0 rows
    one = _mixture(device=device)
    assert mixture_log_prob(one, torch.zeros(0, device=device)).shape == (0,)


# ---- 11.13: meta tensors -------------------------------------------------------------------


def test_meta_tensors_give_meta_results(monkeypatch):
    monkeypatch.setattr(Distribution, "_validate_args", False)
    p, q = _mixture(5, device="meta"), Normal(torch.zeros(5, device="meta"), 1.0)
    for est in (
        kl_mc(p, q, num_samples=100),
        kl_mc(q, p, num_samples=3),
        jsd_mc(p, q, num_samples=9),
    ):
        assert est.value.is_meta and est.stderr.is_meta and est.value.shape == (5,)


# ---- 11.14: Estimate equality --------------------------------------------------------------


def test_estimate_equality_does_not_raise():
    a = kl_mc(_mixture(3), Normal(torch.zeros(3), 1.0), num_samples=8)
    b = Estimate(a.value, a.stderr, a.num_samples)
    assert a == a and a != b  # identity, as for tensors' containers; no elementwise ambiguity
    assert len({a, b}) == 2  # hashable


# ---- 10.8: RNG hygiene ---------------------------------------------------------------------

PAIRS = {
    "gaussian mixture": lambda: (_mixture(4), Normal(torch.zeros(4), 2.0)),
    "generic (Gamma)": lambda: (
        Gamma(torch.full((4,), 2.0), 1.0),
        Gamma(torch.full((4,), 3.0), 1.0),
    ),
}


@pytest.mark.parametrize("n", [1, 5, 600])
@pytest.mark.parametrize("name", list(PAIRS))
def test_explicit_generator_leaves_global_rng_untouched(name, n, monkeypatch):
    p, q = PAIRS[name]()
    scopes: list[torch.device] = []
    real = _samplers.rng_scope

    def spy(generator, device):  # type: ignore[no-untyped-def]
        scopes.append(device)
        return real(generator, device)

    monkeypatch.setattr(_samplers, "rng_scope", spy)
    before = torch.get_rng_state()
    a = kl_mc(p, q, num_samples=n, generator=torch.Generator().manual_seed(3))
    b = jsd_mc(p, q, num_samples=n, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    again = kl_mc(p, q, num_samples=n, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.value, again.value)
    assert b.value.isfinite().all()
    # Only the generator of p's device is ever forked (never every CUDA device's).
    assert all(d == torch.device("cpu") for d in scopes)


@pytest.mark.parametrize("name", list(PAIRS))
def test_default_draws_from_the_global_generator(name):
    p, q = PAIRS[name]()
    torch.manual_seed(11)
    a = kl_mc(p, q, num_samples=64)
    after = torch.get_rng_state()
    torch.manual_seed(11)
    b = kl_mc(p, q, num_samples=64)
    assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    torch.manual_seed(11)
    assert not torch.equal(torch.get_rng_state(), after), "the global generator was not used"
    c = kl_mc(p, q, num_samples=64)
    assert torch.equal(a.value, c.value)
