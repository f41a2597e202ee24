"""distkl.bounds: guaranteed bounds on KL between Gaussian mixtures enclose the truth.

References: 1-D, composite Gauss-Legendre quadrature (relative error below 1e-8, see
tests/test_quadrature.py), which is exact at the scale of these bounds; D >= 2, stratified Monte
Carlo with antithetic draws, a fixed seed and its standard error: a bound fails when it is off by
more than z = 4.5 standard errors (false-failure rate below 1e-5 per check).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributions import (
    Categorical,
    Gamma,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from distkl._gaussian import as_gaussian_mixture, mixture_log_density, to_float64
from distkl.bounds import KLBounds, kl_bounds
from distkl.bounds._combine import all_bounds
from distkl.quadrature import kl_quadrature
from tests.conftest import F64, Z
from tests.examples import by_family, by_id, params

SLACK = 1e-9  # relative tolerance against the quadrature reference (its own error is < 1e-10)


def mc_reference(
    p, q, per_component: int = 1 << 13, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified (per component of p), antithetic Monte Carlo KL(p || q) and its standard error."""
    shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    mp = as_gaussian_mixture(p).expand(shape)
    mq = as_gaussian_mixture(q).expand(shape)
    mp = to_float64(mp)
    mq = to_float64(mq)
    g = torch.Generator().manual_seed(seed)
    half = per_component // 2
    eps = torch.randn(half, *mp.loc.shape, generator=g, dtype=F64)
    eps = torch.cat([eps, -eps])
    x = mp.loc + (mp.tril() @ eps.unsqueeze(-1)).squeeze(-1)  # (n, *b, K, D)
    pts = x.movedim(0, -2).flatten(-3, -2)  # (*b, K n, D)
    ratio = mixture_log_density(pts, mp) - mixture_log_density(pts, mq)
    ratio = ratio.unflatten(-1, (mp.num_components, per_component))
    pairs = 0.5 * (ratio[..., :half] + ratio[..., half:])
    w = mp.log_weights.exp()
    mean = (w * pairs.mean(-1)).sum(-1)
    se = (w.square() * pairs.var(-1) / half).sum(-1).sqrt()
    return mean, se


def reference(p, q) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, standard error): quadrature (error 0) for scalar events, Monte Carlo otherwise."""
    if as_gaussian_mixture(p).dim == 1:
        ref = kl_quadrature(p, q, nodes=256).to(F64)
        return ref, SLACK * ref.abs() + 1e-15
    return mc_reference(p, q)


def assert_encloses(lower, upper, p, q, label: str) -> None:
    ref, se = reference(p, q)
    lower, upper = lower.to(F64), upper.to(F64)
    bad = (lower > ref + Z * se) | (upper < ref - Z * se) | (lower < 0) | (lower > upper)
    assert not bad.any(), (
        f"{label}: bounds do not enclose KL.\n lower {lower.tolist()}\n upper {upper.tolist()}\n"
        f" reference {ref.tolist()}\n stderr {se.tolist()} (z = {Z})"
    )


# ---- the example table --------------------------------------------------------------------------


@pytest.mark.parametrize("ex", params(by_family("mixture")))
def test_bounds_enclose_reference_on_table(ex):
    p, q = ex.build("cpu", F64)
    lower, upper = kl_bounds(p, q)
    assert lower.shape == upper.shape == torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert_encloses(lower, upper, p, q, ex.id)


@pytest.mark.parametrize("ex", params(by_family("mixture")))
def test_identical_gives_zero_and_devices(ex, device, dtype):
    p, _ = ex.build(device, dtype)
    lower, upper = kl_bounds(p, p)
    assert lower.dtype == upper.dtype == dtype and lower.device.type == device.type
    assert (lower == 0).all() and (upper == 0).all()


# ---- generated mixtures -------------------------------------------------------------------------


@st.composite
def mixture_pairs(draw, dims=(1, 2, 3)):
    d = draw(st.sampled_from(dims))
    floats = lambda lo, hi: st.floats(lo, hi, allow_nan=False, width=64)  # noqa: E731

    def mixture(k: int):
        logits = torch.tensor(draw(st.lists(floats(-2, 2), min_size=k, max_size=k)), dtype=F64)
        loc = torch.tensor(draw(st.lists(floats(-3, 3), min_size=k * d, max_size=k * d)), dtype=F64)
        raw = draw(st.lists(floats(-1, 1), min_size=k * d * d, max_size=k * d * d))
        tril = torch.tensor(raw, dtype=F64).reshape(k, d, d).tril(-1)
        diag = torch.tensor(
            draw(st.lists(floats(-1.5, 1.5), min_size=k * d, max_size=k * d)), dtype=F64
        )
        tril = tril + torch.diag_embed(diag.reshape(k, d).exp())
        return logits, loc.reshape(k, d), tril

    def build(logits, loc, tril):
        if d == 1:
            comp = Normal(loc[:, 0], tril[:, 0, 0])
        else:
            comp = MultivariateNormal(loc, scale_tril=tril)
        return MixtureSameFamily(Categorical(logits=logits), comp)

    kp = draw(st.integers(1, 3))
    p = mixture(kp)
    if draw(st.booleans()):  # q: a small perturbation of p (small KL: the hard regime)
        scale = draw(st.sampled_from([1e-3, 3e-2]))
        g = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
        q = tuple(x + scale * torch.randn(x.shape, generator=g, dtype=F64) for x in p)
        q = (q[0], q[1], q[2].tril(-1) + torch.diag_embed(torch.diagonal(p[2], dim1=-2, dim2=-1)))
    else:
        q = mixture(draw(st.integers(1, 3)))
    return build(*p), build(*q)


FAST = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@FAST
@given(mixture_pairs())
def test_bounds_enclose_generated_mixtures(pair):
    p, q = pair
    lower, upper = kl_bounds(p, q)
    assert_encloses(lower, upper, p, q, "generated")


@settings(FAST, max_examples=40)
@given(mixture_pairs(dims=(1,)))
def test_every_general_bound_is_valid_in_1d(pair):
    # The bounds built for D >= 2 (DV, boxes, slabs, coupling, mixing information) are valid in
    # any dimension: check each one, without the 1-D cell bounds, against quadrature.
    p, q = pair
    ref = kl_quadrature(p, q, nodes=256).item()
    lowers, uppers = all_bounds(
        to_float64(as_gaussian_mixture(p)), to_float64(as_gaussian_mixture(q)), cells=False
    )
    slack = SLACK * ref + 1e-14
    for i, low in enumerate(lowers):
        assert low.item() <= ref + slack, f"lower bound {i}: {low.item()!r} > KL {ref!r}"
    for i, up in enumerate(uppers):
        assert up.item() >= ref - slack, f"upper bound {i}: {up.item()!r} < KL {ref!r}"


# ---- special cases ------------------------------------------------------------------------------


def test_single_gaussians_give_the_closed_form():
    g = torch.Generator().manual_seed(5)
    for d in (1, 3):
        a, b = torch.randn(d, d, generator=g, dtype=F64), torch.randn(d, d, generator=g, dtype=F64)
        p = MultivariateNormal(
            torch.randn(d, generator=g, dtype=F64), a @ a.T + torch.eye(d, dtype=F64)
        )
        q = MultivariateNormal(
            torch.randn(d, generator=g, dtype=F64), b @ b.T + torch.eye(d, dtype=F64)
        )
        exact = kl_divergence(p, q)
        lower, upper = kl_bounds(p, q)
        assert lower <= exact <= upper
        assert (upper - lower) <= 1e-7 * exact


def test_nearly_identical_mixtures():
    w = torch.tensor([0.3, 0.7], dtype=F64)
    p = MixtureSameFamily(
        Categorical(probs=w),
        Normal(torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([1.0, 0.5], dtype=F64)),
    )
    q = MixtureSameFamily(
        Categorical(probs=w),
        Normal(torch.tensor([1e-4, 1.0], dtype=F64), torch.tensor([1.0, 0.5], dtype=F64)),
    )
    lower, upper = kl_bounds(p, q)
    exact = kl_quadrature(p, q).item()
    assert 0.0 <= lower.item() <= exact <= upper.item() <= 1e-7


def test_float32_bounds_are_rounded_outward(device):
    ex = by_id("MixtureSameFamily(Normal)-MixtureSameFamily(Normal)")
    p, q = ex.build(device, torch.float32)
    lower, upper = kl_bounds(p, q)
    assert lower.dtype == upper.dtype == torch.float32
    # the same float32 parameters, evaluated in float64
    p64, q64 = ex.build("cpu", torch.float32)
    p64 = MixtureSameFamily(
        Categorical(logits=p64.mixture_distribution.logits.double()),
        Normal(p64.component_distribution.loc.double(), p64.component_distribution.scale.double()),
    )
    q64 = MixtureSameFamily(
        Categorical(logits=q64.mixture_distribution.logits.double()),
        Normal(q64.component_distribution.loc.double(), q64.component_distribution.scale.double()),
    )
    exact = kl_quadrature(p64, q64)
    assert (lower.cpu().double() <= exact).all() and (upper.cpu().double() >= exact).all()


def test_broadcasting_and_namedtuple():
    g = torch.Generator().manual_seed(6)
    p = MixtureSameFamily(
        Categorical(logits=torch.randn(2, 1, 3, generator=g, dtype=F64)),
        MultivariateNormal(
            torch.randn(2, 1, 3, 2, generator=g, dtype=F64), torch.eye(2, dtype=F64)
        ),
    )
    q = MixtureSameFamily(
        Categorical(logits=torch.randn(4, 2, generator=g, dtype=F64)),
        MultivariateNormal(
            torch.randn(4, 2, 2, generator=g, dtype=F64), 2 * torch.eye(2, dtype=F64)
        ),
    )
    out = kl_bounds(p, q)
    assert isinstance(out, KLBounds) and out.lower.shape == out.upper.shape == (2, 4)
    one = kl_bounds(
        MixtureSameFamily(
            Categorical(logits=p.mixture_distribution.logits[1, 0]),
            MultivariateNormal(p.component_distribution.loc[1, 0], torch.eye(2, dtype=F64)),
        ),
        MixtureSameFamily(
            Categorical(logits=q.mixture_distribution.logits[2]),
            MultivariateNormal(q.component_distribution.loc[2], 2 * torch.eye(2, dtype=F64)),
        ),
    )
    assert out.lower[1, 2].item() == pytest.approx(one.lower.item(), rel=1e-9)
    assert out.upper[1, 2].item() == pytest.approx(one.upper.item(), rel=1e-9)


@pytest.mark.parametrize("d", [1, 3])
def test_gradients_are_finite(d):
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    loc = torch.randn(2, 3, d, generator=g, dtype=F64, requires_grad=True)
    scale = (torch.rand(2, 3, d, generator=g, dtype=F64) + 0.5).requires_grad_()
    comp = Independent(Normal(loc, scale), 1)
    p = MixtureSameFamily(Categorical(logits=logits), comp)
    q = MixtureSameFamily(
        Categorical(logits=torch.randn(4, generator=g, dtype=F64)),
        MultivariateNormal(torch.randn(4, d, generator=g, dtype=F64), torch.eye(d, dtype=F64)),
    )
    lower, upper = kl_bounds(p, q)
    (lower.sum() + upper.sum()).backward()
    for t in (logits, loc, scale):
        assert torch.isfinite(t.grad).all()


def test_errors():
    mvn2 = MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.raises(ValueError, match="same event shape"):
        kl_bounds(mvn2, Normal(0.0, 1.0))
    with pytest.raises(NotImplementedError, match="MultivariateNormal"):
        kl_bounds(mvn2, Independent(Gamma(torch.ones(2), torch.ones(2)), 1))


def test_lower_is_never_negative_and_below_upper():
    for ex in by_family("mixture"):
        p, q = ex.build("cpu", F64)
        lower, upper = kl_bounds(q, p) if q.event_shape == p.event_shape else kl_bounds(p, q)
        assert (lower >= 0).all() and (lower <= upper).all() and torch.isfinite(upper).all()
        assert not math.isnan(lower.sum().item())
