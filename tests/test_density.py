"""distkl.mixture_log_prob: same values as torch's log_prob, by matrix products."""

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
)

from distkl import density
from distkl._gaussian import as_gaussian_mixture
from distkl.density import gaussian_scorer, mixture_log_prob
from distkl.examples import random_spd


def _components(kind: str, *batch: int, d: int, spread: float, g: torch.Generator):
    loc = spread * torch.randn(*batch, d, generator=g, dtype=torch.float64)
    if kind == "normal":
        return Normal(loc[..., 0], 0.5 + torch.rand(*batch, generator=g, dtype=torch.float64))
    if kind == "independent":
        return Independent(
            Normal(loc, 0.5 + torch.rand(*batch, d, generator=g, dtype=torch.float64)), 1
        )
    if kind == "mvn":
        return MultivariateNormal(loc, covariance_matrix=random_spd(*batch, d=d, generator=g))
    if kind == "lowrank":
        return LowRankMultivariateNormal(
            loc,
            0.5 * torch.randn(*batch, d, 2, generator=g, dtype=torch.float64),
            0.5 + torch.rand(*batch, d, generator=g, dtype=torch.float64),
        )
    raise AssertionError(kind)


def _mixture(kind: str, *batch: int, k: int, d: int, spread: float = 2.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*batch, k, generator=g, dtype=torch.float64)
    return MixtureSameFamily(
        Categorical(logits=logits), _components(kind, *batch, k, d=d, spread=spread, g=g)
    )


def _to(d, dtype: torch.dtype, device: torch.device):
    """The same distribution with every parameter cast."""
    if isinstance(d, MixtureSameFamily):
        return MixtureSameFamily(
            Categorical(logits=d.mixture_distribution.logits.to(device, dtype)),
            _to(d.component_distribution, dtype, device),
        )
    if isinstance(d, Normal):
        return Normal(d.loc.to(device, dtype), d.scale.to(device, dtype))
    if isinstance(d, Independent):
        return Independent(_to(d.base_dist, dtype, device), d.reinterpreted_batch_ndims)
    if isinstance(d, MultivariateNormal):
        return MultivariateNormal(
            d.loc.to(device, dtype), scale_tril=d.scale_tril.to(device, dtype)
        )
    if isinstance(d, LowRankMultivariateNormal):
        return LowRankMultivariateNormal(
            d.loc.to(device, dtype), d.cov_factor.to(device, dtype), d.cov_diag.to(device, dtype)
        )
    raise AssertionError(type(d))


KINDS = ["normal", "independent", "mvn", "lowrank"]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch_log_prob(kind, device, dtype):
    mix = _to(_mixture(kind, k=4, d=3), dtype, device)
    x = mix.sample((50,))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mixture_log_prob(mix, x), mix.log_prob(x), **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_broadcasting(kind, device):
    mix = _to(_mixture(kind, 2, 1, k=3, d=2), torch.float64, device)  # batch (2, 1)
    event = mix.event_shape
    x = torch.randn(5, 1, 4, *event, dtype=torch.float64, device=device)  # sample 5, batch (1, 4)
    out = mixture_log_prob(mix, x)
    assert out.shape == (5, 2, 4)
    torch.testing.assert_close(out, mix.log_prob(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", KINDS)
def test_single_distribution_is_one_component(kind, device):
    g = torch.Generator().manual_seed(3)
    d = _to(_components(kind, 3, d=2, spread=1.0, g=g), torch.float64, device)
    x = d.sample((7,))
    torch.testing.assert_close(mixture_log_prob(d, x), d.log_prob(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["normal", "independent", "mvn"])
@pytest.mark.parametrize("spread", [10.0, 100.0])
def test_float32_accuracy_far_from_the_scales(kind, spread):
    """Centring (and float64 accumulation of the expanded diagonal form) keeps 1e-5 relative."""
    mix64 = _mixture(kind, k=16, d=8 if kind != "normal" else 1, spread=spread, seed=1)
    x = mix64.sample((500,))
    exact = mix64.log_prob(x)
    mix32 = _to(mix64, torch.float32, torch.device("cpu"))
    ours = mixture_log_prob(mix32, x.float()).double()
    # Reference in float64 from the float32-rounded inputs, so only our arithmetic is measured.
    exact = _to(mix32, torch.float64, torch.device("cpu")).log_prob(x.float().double())
    rel = ((ours - exact).abs() / exact.abs().clamp_min(1.0)).max().item()
    assert rel < 1e-5, f"{kind} spread={spread}: max relative error {rel:.2e}"


def test_large_mixture_matches_torch():
    mix = _mixture("independent", k=16, d=64, seed=2)
    x = mix.sample((200,))
    torch.testing.assert_close(mixture_log_prob(mix, x), mix.log_prob(x), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("kind", ["independent", "mvn"])
def test_gradcheck(kind):
    g = torch.Generator().manual_seed(4)
    loc = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    if kind == "independent":
        scale = (0.5 + torch.rand(3, 2, generator=g, dtype=torch.float64)).requires_grad_(True)

        def fn(x, loc, logits, scale):
            comp = Independent(Normal(loc, scale), 1)
            return mixture_log_prob(MixtureSameFamily(Categorical(logits=logits), comp), x)

        assert torch.autograd.gradcheck(fn, (x, loc, logits, scale))
    else:
        tril = torch.linalg.cholesky(random_spd(3, d=2, generator=g)).requires_grad_(True)

        def fn(x, loc, logits, tril):
            comp = MultivariateNormal(loc, scale_tril=tril.tril())
            return mixture_log_prob(MixtureSameFamily(Categorical(logits=logits), comp), x)

        assert torch.autograd.gradcheck(fn, (x, loc, logits, tril))


def test_gradcheck_single_diagonal():
    """One diagonal Gaussian is scored elementwise (``DiagonalScorer``), batch broadcast."""
    g = torch.Generator().manual_seed(5)
    loc = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    scale = (0.5 + torch.rand(3, 2, generator=g, dtype=torch.float64)).requires_grad_(True)
    x = torch.randn(4, 1, 2, generator=g, dtype=torch.float64, requires_grad=True)

    def fn(x, loc, scale):
        return mixture_log_prob(Independent(Normal(loc, scale), 1), x)

    assert torch.autograd.gradcheck(fn, (x, loc, scale))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("precise", [False, True])
def test_elementwise_and_gemm_diagonal_scoring_agree(dtype, precise, monkeypatch):
    """Small inputs are scored elementwise, large ones by the GEMM form: same values and
    gradients to rounding (the GEMM form forced with ``ELEMENTWISE_LIMIT = 0``)."""
    g = torch.Generator().manual_seed(6)
    loc = (3.0 * torch.randn(2, 4, 3, generator=g, dtype=dtype)).requires_grad_()
    scale = (0.5 + torch.rand(2, 4, 3, generator=g, dtype=dtype)).requires_grad_()
    logits = torch.randn(2, 4, generator=g, dtype=dtype).requires_grad_()
    x = 3.0 * torch.randn(5, 1, 3, generator=g, dtype=dtype)

    def score() -> tuple[torch.Tensor, ...]:
        mix = MixtureSameFamily(Categorical(logits=logits), Independent(Normal(loc, scale), 1))
        value = gaussian_scorer(as_gaussian_mixture(mix), precise=precise).log_prob(x)
        return (value, *torch.autograd.grad(value.sum(), (loc, scale, logits)))

    elementwise = score()
    monkeypatch.setattr(density, "ELEMENTWISE_LIMIT", 0)
    gemm = score()
    tol = 1e-10 if dtype == torch.float64 or precise else 2e-5
    for a, b in zip(elementwise, gemm):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_other_families_fall_back_to_log_prob():
    mix = MixtureSameFamily(
        Categorical(logits=torch.zeros(2)),
        Gamma(torch.tensor([1.0, 3.0]), torch.tensor([1.0, 2.0])),
    )
    x = torch.tensor([0.5, 1.0, 4.0])
    torch.testing.assert_close(mixture_log_prob(mix, x), mix.log_prob(x))


def test_event_shape_mismatch_raises():
    mix = _mixture("independent", k=2, d=3)
    with pytest.raises(ValueError, match=r"event shape \(3,\)"):
        mixture_log_prob(mix, torch.zeros(5, 4, dtype=torch.float64))


def test_weights_batch_broadcast_against_components():
    """MixtureSameFamily allows weights of batch () with components of batch (4,)."""
    g = torch.Generator().manual_seed(5)
    comp = Normal(
        torch.randn(4, 3, generator=g, dtype=torch.float64), torch.ones(4, 3, dtype=torch.float64)
    )
    mix = MixtureSameFamily(
        Categorical(logits=torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)), comp
    )
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mixture_log_prob(mix, x), mix.log_prob(x), rtol=1e-10, atol=1e-10)
