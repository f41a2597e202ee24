"""distkl.latent: free bits (Kingma et al. 2016) and KL annealing schedules."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import (
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from distkl.latent import kl_annealing, kl_free_bits


def _diag(loc: torch.Tensor, scale: torch.Tensor, r: int = 1) -> Independent:
    return Independent(Normal(loc, scale), r)


def _posterior(b: int, d: int, device: torch.device, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(b, d, generator=g, dtype=torch.float64)
    scale = torch.exp(0.5 * torch.randn(b, d, generator=g, dtype=torch.float64))
    return loc.to(device, dtype), scale.to(device, dtype)


def _kl_std_normal(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Independent reference: KL(N(mu, s^2) || N(0, 1)) = (s^2 + mu^2 - 1 - log s^2) / 2."""
    return 0.5 * (scale**2 + loc**2 - 1.0 - 2.0 * scale.log())


def _tol(dtype: torch.dtype) -> dict:
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 0}


# ---------------------------------------------------------------------------------------------
# kl_free_bits


def test_free_bits_zero_is_the_minibatch_mean_kl(device, dtype):
    loc, scale = _posterior(16, 3, device, dtype)
    q = _diag(loc, scale)
    p = _diag(torch.zeros(3, device=device, dtype=dtype), torch.ones(3, device=device, dtype=dtype))
    got = kl_free_bits(posterior=q, prior=p, free_bits=0.0)
    assert got.shape == ()
    torch.testing.assert_close(got, kl_divergence(q, p).mean(), **_tol(dtype))


def test_free_bits_clamps_each_dimension_after_the_batch_mean(device, dtype):
    loc, scale = _posterior(32, 4, device, dtype)
    # Shrink dimension 0 towards the prior so its mean KL is far below lambda.
    loc[:, 0] *= 0.01
    scale[:, 0] = 1.0
    q = _diag(loc, scale)
    p = _diag(torch.zeros(4, device=device, dtype=dtype), torch.ones(4, device=device, dtype=dtype))
    lam = 0.3
    per_dim = _kl_std_normal(loc, scale).mean(0)  # (4,)
    expected = per_dim.clamp(min=lam).sum()
    got = kl_free_bits(posterior=q, prior=p, free_bits=lam)
    torch.testing.assert_close(got, expected, **_tol(dtype))
    assert per_dim[0] < lam < per_dim[1:].min(), per_dim  # the clamp is active on dim 0 only


def test_free_bits_is_not_the_per_example_clamp(device):
    # One example carries 2*lam nats, the other 0: the minibatch mean is lam, so Kingma et al.'s
    # objective is lam, whereas clamping per example gives (2*lam + lam) / 2 on average.
    dt = torch.float64
    loc = torch.tensor([[math.sqrt(2.0)], [0.0]], device=device, dtype=dt)  # KLs 1.0 and 0.0
    q = _diag(loc, torch.ones_like(loc))
    p = _diag(torch.zeros(1, device=device, dtype=dt), torch.ones(1, device=device, dtype=dt))
    lam = 0.5
    minibatch = kl_free_bits(posterior=q, prior=p, free_bits=lam)
    per_example = kl_free_bits(posterior=q, prior=p, free_bits=lam, batch_dims=0)
    assert per_example.shape == (2,)
    torch.testing.assert_close(minibatch, torch.tensor(0.5, device=device, dtype=dt))
    torch.testing.assert_close(per_example, torch.tensor([1.0, 0.5], device=device, dtype=dt))


def test_free_bits_gradient_vanishes_only_below_lambda(device):
    dt = torch.float64
    loc, scale = _posterior(8, 3, device, dt, seed=3)
    loc[:, 1] = 0.0
    scale[:, 1] = 1.05  # tiny KL in dimension 1
    loc = loc.requires_grad_()
    q = _diag(loc, scale)
    p = _diag(torch.zeros(3, device=device, dtype=dt), torch.ones(3, device=device, dtype=dt))
    lam = 0.1
    (grad,) = torch.autograd.grad(kl_free_bits(posterior=q, prior=p, free_bits=lam), loc)
    assert torch.all(grad[:, 1] == 0)
    # Above lambda the gradient is that of the plain minibatch-mean KL: mu / B.
    torch.testing.assert_close(grad[:, [0, 2]], loc.detach()[:, [0, 2]] / 8)


def test_free_bits_gradcheck():
    dt = torch.float64
    loc, scale = _posterior(5, 3, torch.device("cpu"), dt, seed=4)
    loc = loc.requires_grad_()
    log_scale = scale.log().requires_grad_()
    prior_loc = torch.tensor([0.1, -0.2, 0.3], dtype=dt, requires_grad=True)

    def f(m, ls, pm):
        q = _diag(m, ls.exp())
        p = _diag(pm, torch.full((3,), 0.8, dtype=dt))
        return kl_free_bits(posterior=q, prior=p, free_bits=0.05)

    # lambda chosen away from every dimension's mean KL: the clamp is smooth there.
    assert torch.autograd.gradcheck(f, (loc, log_scale, prior_loc))


def test_free_bits_shapes_and_event_rank(device, dtype):
    # Image-shaped latent: Independent(Normal, 2) over (C, H); batch (S, B).
    g = torch.Generator().manual_seed(5)
    loc = torch.randn(2, 6, 3, 4, generator=g).to(device, dtype)
    scale = torch.rand(2, 6, 3, 4, generator=g).add(0.5).to(device, dtype)
    q = _diag(loc, scale, r=2)
    p = _diag(torch.zeros(3, 4, device=device, dtype=dtype), torch.ones(3, 4, device=device,
              dtype=dtype), r=2)
    assert kl_free_bits(posterior=q, prior=p, free_bits=0.1).shape == (6,)
    assert kl_free_bits(posterior=q, prior=p, free_bits=0.1, batch_dims=2).shape == ()
    got = kl_free_bits(posterior=q, prior=p, free_bits=0.1, batch_dims=0)
    assert got.shape == (2, 6)
    expected = _kl_std_normal(loc, scale).clamp(min=0.1).sum((-2, -1))
    torch.testing.assert_close(got, expected, **_tol(dtype))


def test_free_bits_whole_latent_group_accepts_any_registered_pair(device, dtype):
    loc, scale = _posterior(16, 2, device, dtype)
    q = _diag(loc, scale)
    p = _diag(torch.full((2,), 0.5, device=device, dtype=dtype),
              torch.full((2,), 2.0, device=device, dtype=dtype))
    kl = kl_divergence(q, p)
    for lam in (0.0, kl.mean().item() + 1.0):
        got = kl_free_bits(posterior=q, prior=p, free_bits=lam, per_dimension=False)
        torch.testing.assert_close(got, kl.mean().clamp(min=lam), **_tol(dtype))


def test_free_bits_whole_latent_group_with_a_mixture_prior(device, dtype):
    import distkl
    import distkl.rules.mixture  # noqa: F401  (registers the mixture rules)

    loc, scale = _posterior(16, 2, device, dtype)
    q = _diag(loc, scale)
    g = torch.Generator().manual_seed(1)
    p = MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.randn(3, generator=g).to(device, dtype)),
        _diag(torch.randn(3, 2, generator=g).to(device, dtype),
              torch.rand(3, 2, generator=g).add(0.5).to(device, dtype)),
    )
    with distkl.options(method="variational"):
        kl = kl_divergence(q, p)
        got = kl_free_bits(posterior=q, prior=p, free_bits=1.0, per_dimension=False, batch_dims=0)
    torch.testing.assert_close(got, kl.clamp(min=1.0), **_tol(dtype))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"free_bits": -0.1}, "free_bits must be a finite number >= 0"),
        ({"free_bits": math.inf}, "free_bits must be a finite number >= 0"),
        ({"free_bits": 0.1, "batch_dims": 2}, "batch_dims=2 exceeds"),
        ({"free_bits": 0.1, "batch_dims": -1}, "batch_dims must be an int >= 0"),
    ],
)
def test_free_bits_bad_arguments(kwargs, match):
    q = _diag(torch.zeros(4, 2), torch.ones(4, 2))
    p = _diag(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match=match):
        kl_free_bits(posterior=q, prior=p, **kwargs)


def test_free_bits_rejects_non_factorised_families():
    q = _diag(torch.zeros(4, 2), torch.ones(4, 2))
    mvn = MultivariateNormal(torch.zeros(2), torch.eye(2))
    with pytest.raises(NotImplementedError, match=r"MultivariateNormal.*Independent\(Normal, r\)"):
        kl_free_bits(posterior=q, prior=mvn, free_bits=0.1)
    with pytest.raises(NotImplementedError, match="posterior \\(per-dimension free bits\\)"):
        kl_free_bits(
            posterior=Normal(torch.zeros(4, 2), 1.0),
            prior=_diag(torch.zeros(2), torch.ones(2)),
            free_bits=0.1,
        )
    mix = MixtureSameFamily(
        torch.distributions.Categorical(logits=torch.zeros(3)),
        _diag(torch.zeros(3, 2), torch.ones(3, 2)),
    )
    with pytest.raises(NotImplementedError, match="MixtureSameFamily"):
        kl_free_bits(posterior=q, prior=mix, free_bits=0.1)


def test_free_bits_event_shape_mismatch():
    q = _diag(torch.zeros(4, 2), torch.ones(4, 2))
    p = _diag(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"same event shape, got \(2,\).*\(3,\)"):
        kl_free_bits(posterior=q, prior=p, free_bits=0.1)


# ---------------------------------------------------------------------------------------------
# kl_annealing


def test_annealing_linear_warmup():
    got = [kl_annealing(t, warmup=4) for t in range(7)]
    assert got == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kl_annealing(2, warmup=4, start=0.2, end=0.6) == pytest.approx(0.4)
    assert kl_annealing(0, warmup=0, end=4.0) == 4.0  # beta-VAE, no warm-up
    assert all(isinstance(kl_annealing(t, warmup=3), float) for t in range(5))


def test_annealing_cyclical():
    # Fu et al. (2019): M cycles of length T/M, ramp over the first R = warmup / cycle of each.
    got = [kl_annealing(t, warmup=2, cycle=4) for t in range(9)]
    assert got == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 0.0]
    assert [kl_annealing(t, warmup=3, cycle=3) for t in range(4)] == [0.0, 1 / 3, 2 / 3, 0.0]


@pytest.mark.parametrize(
    "step, kwargs, match",
    [
        (-1, {"warmup": 3}, "step must be an int >= 0"),
        (0, {"warmup": -3}, "warmup must be an int >= 0"),
        (0, {"warmup": 2.5}, "warmup must be an int >= 0"),
        (0, {"warmup": 3, "cycle": 2}, "cycle must be an int >= 3, got 2"),
        (0, {"warmup": 0, "cycle": 0}, "cycle must be a positive int, got 0"),
        (0, {"warmup": 3, "end": math.nan}, "start and end must be finite"),
    ],
)
def test_annealing_bad_arguments(step, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kl_annealing(step, **kwargs)


@pytest.mark.parametrize("free_bits", ["abc", None, torch.tensor(0.1)])
def test_free_bits_of_the_wrong_type_is_named(free_bits):
    q = _diag(torch.zeros(4, 2), torch.ones(4, 2))
    p = _diag(torch.zeros(2), torch.ones(2))
    with pytest.raises(TypeError, match="free_bits must be a finite number >= 0, got"):
        kl_free_bits(posterior=q, prior=p, free_bits=free_bits)


def test_free_bits_arguments_are_keyword_only():
    q = _diag(torch.zeros(4, 2), torch.ones(4, 2))
    p = _diag(torch.zeros(2), torch.ones(2))
    with pytest.raises(TypeError):
        kl_free_bits(q, p, free_bits=0.1)  # type: ignore[misc]


class _MyNormal(Normal):
    """A subclass, as Pyro's ``pyro.distributions.Normal`` is."""


def test_free_bits_accepts_normal_subclasses():
    g = torch.Generator().manual_seed(5)
    loc, scale = torch.randn(4, 2, generator=g), torch.rand(4, 2, generator=g) + 0.5
    q = Independent(_MyNormal(loc, scale), 1)
    p = Independent(_MyNormal(torch.zeros(2), torch.ones(2)), 1)
    got = kl_free_bits(posterior=q, prior=p, free_bits=0.1)
    expected = kl_free_bits(
        posterior=_diag(loc, scale), prior=_diag(torch.zeros(2), torch.ones(2)), free_bits=0.1
    )
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("name, kwargs", [("step", {"warmup": 3}), ("warmup", {"warmup": None})])
def test_annealing_counts_of_the_wrong_type_are_named(name, kwargs):
    step = "0" if name == "step" else 0
    with pytest.raises(ValueError, match=f"{name} must be an int >= 0"):
        kl_annealing(step, **kwargs)  # type: ignore[arg-type]
