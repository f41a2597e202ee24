"""The small-sample fast path of the Monte Carlo engine changes no result beyond rounding.

Below ``2 * MIN_FOLD_FOR_CONTROLS`` rows in every stratum no control variate can switch on, so
the engine skips building, streaming and fitting them, and pools each component's rows as one
stratum instead of two folds; for a non-mixture ``p`` it also skips the allocation arithmetic
and the component gather. The general path is forced here by patching those two decisions back,
and both must give the same values and standard errors for the same generator seed, to rounding
(the folds are pooled in a different order: a few ulps).
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch.distributions import (
    Categorical,
    Gamma,
    Independent,
    MixtureSameFamily,
    Normal,
    Poisson,
)

from distkl import montecarlo
from distkl.montecarlo import _samplers, _strata, expectation, kl_mc
from distkl.montecarlo._strata import MIN_FOLD_FOR_CONTROLS, Strata
from tests.examples import by_family, by_id, params

SEED = 1234


def _general(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force the general path: controls built and fitted, mixture-style strata for any ``p``."""
    monkeypatch.setattr(_strata.Strata, "can_fit_controls", lambda self: True)
    make = _samplers.make_sampler

    def general_sampler(p, batch_shape=None):  # type: ignore[no-untyped-def]
        sampler = make(p, batch_shape)
        sampler.single = False
        return sampler

    monkeypatch.setattr(montecarlo, "make_sampler", general_sampler)


def _gen(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(SEED)


def _assert_identical(fast: montecarlo.Estimate, slow: montecarlo.Estimate, what: str) -> None:
    """Equal to rounding: a few ulps of the statistics' float64, then the result's dtype."""
    rtol = 1e-12 if fast.value.dtype == torch.float64 else 1e-6
    for name in ("value", "stderr"):
        a, b = getattr(fast, name), getattr(slow, name)
        torch.testing.assert_close(
            a, b, rtol=rtol, atol=0.0, equal_nan=True, msg=f"{what}: {name} {a} vs {b}"
        )


CONFIGS = [(16, None), (40, 7), (2 * MIN_FOLD_FOR_CONTROLS - 1, None)]


@pytest.mark.parametrize("ex", params(by_family("mixture")))
@pytest.mark.parametrize("reverse", [False, True], ids=["pq", "qp"])
def test_kl_mc_fast_path_same_values(ex, reverse, device, dtype, monkeypatch):
    # The stratified engine's paths (one Gaussian p would take distkl._pathwise otherwise, a
    # diagonal mixture p against one Gaussian q distkl._reverse).
    monkeypatch.setattr(montecarlo, "pathwise_applies", lambda p, q, n: False)
    monkeypatch.setattr(montecarlo, "reverse_applies", lambda p, q, n: False)
    p, q = ex.build(device, dtype)
    if reverse:
        p, q = q, p
    fast = [kl_mc(p, q, num_samples=n, chunk_size=c, generator=_gen(device)) for n, c in CONFIGS]
    with monkeypatch.context() as m:
        _general(m)
        calls: list[int] = []
        noise_controls = _samplers.noise_controls

        def spy(eps: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            return noise_controls(eps)

        m.setattr(_samplers, "noise_controls", spy)
        slow = [
            kl_mc(p, q, num_samples=n, chunk_size=c, generator=_gen(device)) for n, c in CONFIGS
        ]
    assert calls, "the general path should have built the noise controls"
    for (n, c), a, b in zip(CONFIGS, fast, slow):
        _assert_identical(a, b, f"{ex.id} reverse={reverse} N={n} chunk={c}")


def _vae(device: torch.device, dtype: torch.dtype, d: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shapes = [(16, d), (16, d), (8,), (8, d), (8, d)]
    return [torch.randn(s, generator=g, dtype=dtype).to(device).requires_grad_() for s in shapes]


def _pair(leaves: list[torch.Tensor]) -> tuple[Independent, MixtureSameFamily]:
    q_loc, q_ls, logits, p_loc, p_ls = leaves
    post = Independent(Normal(q_loc, (0.3 * q_ls).exp()), 1)
    prior = MixtureSameFamily(
        Categorical(logits=logits), Independent(Normal(2.0 * p_loc, (0.2 * p_ls).exp()), 1)
    )
    return post, prior


@pytest.mark.parametrize("reverse", [False, True], ids=["posterior-prior", "prior-posterior"])
def test_vae_layout_value_and_gradients(reverse, device, dtype, monkeypatch):
    """Training-loop layout: same value and stderr; gradients equal up to rounding."""
    results = []
    for general in (False, True):
        with monkeypatch.context() as m:
            if general:
                _general(m)
            leaves = _vae(device, dtype, 2)
            post, prior = _pair(leaves)
            p, q = (prior, post) if reverse else (post, prior)
            est = kl_mc(p, q, num_samples=16, generator=_gen(device))
            est.value.sum().backward()
            results.append((est, [t.grad for t in leaves]))
    (fast, g_fast), (slow, g_slow) = results
    _assert_identical(fast, slow, f"VAE reverse={reverse}")
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, b in zip(g_fast, g_slow):
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()))


GENERIC = [
    ("Gamma", lambda dev, dt: Gamma(torch.tensor([2.0, 3.0], dtype=dt, device=dev), 1.5)),
    ("Poisson", lambda dev, dt: Poisson(torch.tensor([2.0, 5.0, 1.0], dtype=dt, device=dev))),
    (
        "MixtureSameFamily(Gamma)",
        lambda dev, dt: MixtureSameFamily(
            Categorical(logits=torch.tensor([[0.0, 1.0, -1.0]], dtype=dt, device=dev)),
            Gamma(torch.tensor([[1.5, 2.0, 4.0]], dtype=dt, device=dev), 1.0),
        ),
    ),
]


@pytest.mark.parametrize("name,make", GENERIC, ids=[g[0] for g in GENERIC])
@pytest.mark.parametrize("batch_shape", [None, (3,)], ids=["own-batch", "expanded"])
def test_expectation_generic_fast_path_same_values(
    name, make, batch_shape, device, dtype, monkeypatch
):
    p = make(device, dtype)
    bs: Optional[tuple[int, ...]] = None if batch_shape is None else (*batch_shape, *p.batch_shape)

    def f(x: torch.Tensor) -> torch.Tensor:
        return (x - 0.3).square() + x.cos()

    def run() -> list[montecarlo.Estimate]:
        return [
            expectation(p, f, num_samples=n, chunk_size=c, batch_shape=bs, generator=_gen(device))
            for n, c in CONFIGS
        ]

    fast = run()
    with monkeypatch.context() as m:
        _general(m)
        slow = run()
    for (n, c), a, b in zip(CONFIGS, fast, slow):
        _assert_identical(a, b, f"{name} batch_shape={bs} N={n} chunk={c}")


def test_controls_still_switch_on_for_large_strata(device, monkeypatch):
    """At 2 * MIN_FOLD_FOR_CONTROLS rows a stratum fits its controls: the estimate changes."""
    # The stratified engine (one Gaussian p would take distkl._pathwise otherwise).
    monkeypatch.setattr(montecarlo, "pathwise_applies", lambda p, q, n: False)
    ex = by_id("Independent(Normal)-MixtureSameFamily(Independent(Normal))")
    p, q = ex.build(device, torch.float64)
    n = 2 * MIN_FOLD_FOR_CONTROLS
    with_cv = kl_mc(p, q, num_samples=n, generator=_gen(device))
    without = kl_mc(p, q, num_samples=n, generator=_gen(device), control_variates=False)
    print(ex.id, with_cv, without)
    assert not torch.equal(with_cv.stderr, without.stderr)
    assert bool((with_cv.stderr < without.stderr).any())


@pytest.mark.parametrize(
    "n,expected", [(2 * MIN_FOLD_FOR_CONTROLS - 1, False), (2 * MIN_FOLD_FOR_CONTROLS, True)]
)
def test_can_fit_controls_threshold(n, expected):
    single = Strata(torch.zeros(4, 1), n, single=True)
    general = Strata(torch.zeros(4, 1), n)
    assert single.can_fit_controls() is expected
    assert general.can_fit_controls() is expected
    assert torch.equal(single.counts, general.counts)
    for first, last in ((0, n), (3, 10)):
        for a, b in zip(single.assign(first, last), general.assign(first, last)):
            assert torch.equal(a, b)
