"""distkl.approx: variational and unscented approximations of KL between Gaussian mixtures."""

from __future__ import annotations

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
    kl_divergence,
)

from distkl.approx import kl_unscented, kl_variational
from distkl.examples import random_spd
from distkl.quadrature import kl_quadrature
from tests.conftest import F64
from tests.examples import by_family, copy_of, params

METHODS = [kl_variational, kl_unscented]
IDS = ["variational", "unscented"]


def _single_pairs(device, dtype):
    """(p, q) pairs of single Gaussians, every family, torch's closed form as reference."""
    g = torch.Generator().manual_seed(0)

    def t(*shape, pos=False):
        x = torch.randn(*shape, generator=g, dtype=F64)
        x = x.abs() + 0.5 if pos else x
        return x.to(device=device, dtype=dtype)

    def spd(*batch, d):
        return random_spd(*batch, d=d, generator=g).to(device=device, dtype=dtype)

    yield Normal(t(3), t(3, pos=True)), Normal(t(3), t(3, pos=True))
    for d in (1, 2, 5):
        yield MultivariateNormal(t(2, d), spd(2, d=d)), MultivariateNormal(t(d), spd(d=d))
        yield Independent(Normal(t(2, d), t(2, d, pos=True)), 1), MultivariateNormal(t(d), spd(d=d))
    yield (
        LowRankMultivariateNormal(t(2, 4), t(2, 4, 2), t(2, 4, pos=True)),
        Independent(Normal(t(4), t(4, pos=True)), 1),
    )


def _reference(p, q):
    # torch lacks some cross pairs: compare through MultivariateNormal.
    def as_mvn(d):
        if isinstance(d, Normal):
            return d
        cov = (
            d.covariance_matrix if hasattr(d, "covariance_matrix") else torch.diag_embed(d.variance)
        )
        return MultivariateNormal(d.mean, covariance_matrix=cov)

    return kl_divergence(as_mvn(p), as_mvn(q))


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_exact_for_single_gaussians(method, device, dtype):
    for p, q in _single_pairs(device, dtype):
        got = method(p, q)
        ref = _reference(p, q)
        assert got.shape == ref.shape and got.dtype == dtype
        tol = 1e-10 if dtype == F64 else 1e-4
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_exact_for_one_component_mixtures(method):
    g = torch.Generator().manual_seed(1)
    loc, cov = torch.randn(2, 1, 3, generator=g, dtype=F64), random_spd(2, 1, d=3, generator=g)
    p = MixtureSameFamily(
        Categorical(logits=torch.zeros(2, 1, dtype=F64)), MultivariateNormal(loc, cov)
    )
    q = MultivariateNormal(torch.randn(3, generator=g, dtype=F64), random_spd(d=3, generator=g))
    ref = kl_divergence(MultivariateNormal(loc[:, 0], cov[:, 0]), q)
    torch.testing.assert_close(method(p, q), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", METHODS, ids=IDS)
@pytest.mark.parametrize("ex", params(by_family("mixture")))
def test_shapes_and_self_divergence(method, ex, device, dtype):
    p, q = ex.build(device, dtype)
    out = method(p, q)
    assert out.shape == torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert out.dtype == dtype and out.device.type == device.type
    assert torch.isfinite(out).all()
    assert (method(p, copy_of(p)).abs() <= 4 * torch.finfo(dtype).eps).all()  # 0 up to rounding


@pytest.mark.parametrize(
    ("method", "limit"), [(kl_variational, 1.0), (kl_unscented, 0.15)], ids=IDS
)
def test_in_range_of_quadrature_in_1d(method, limit):
    # Not exact for mixtures: a sanity check on the 1-D rows of the table (the variational
    # approximation is known to be rough; benchmarks/bench_methods.py measures both).
    for ex in by_family("mixture"):
        p, q = ex.build("cpu", F64)
        if p.event_shape != ():
            continue
        ref = kl_quadrature(p, q)
        rel = ((method(p, q) - ref).abs() / ref).max().item()
        assert rel < limit, f"{ex.id}: relative error {rel:.3f}"


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_gradients_are_finite(method):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, generator=g, dtype=F64, requires_grad=True)
    loc = torch.randn(3, 2, generator=g, dtype=F64, requires_grad=True)
    p = MixtureSameFamily(
        Categorical(logits=logits), Independent(Normal(loc, torch.ones(3, 2, dtype=F64)), 1)
    )
    q = MultivariateNormal(torch.zeros(2, dtype=F64), 2.0 * torch.eye(2, dtype=F64))
    method(p, q).backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(loc.grad).all()


@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_errors(method):
    mvn2 = MultivariateNormal(torch.zeros(2), torch.eye(2))
    mvn3 = MultivariateNormal(torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="same event shape"):
        method(mvn2, mvn3)
    with pytest.raises(NotImplementedError, match="MultivariateNormal"):
        method(Gamma(torch.tensor(1.0), torch.tensor(1.0)), Normal(0.0, 1.0))
