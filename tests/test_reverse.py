"""KL(diagonal Gaussian mixture || one Gaussian) with the cross term in closed form
(`distkl._reverse`), and the fused diagonal-mixture log-density (`distkl._diagonal`).

Unbiasedness of the value and of the gradient: z-tests over independent replicates (one batched
call) against scipy quadrature and a differentiable trapezoid rule; the interval's coverage over
replicates; agreement with the stratified engine in 3-D (diagonal and full-covariance q).
Z = 4.5 from conftest.
"""

from __future__ import annotations

import math

import pytest
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
from distkl import montecarlo
from distkl._diagonal import diag_mixture_log_prob
from distkl._reverse import kl_mixture_to_gaussian, reverse_applies
from distkl.montecarlo import kl_mc, kl_mc_value
from tests.conftest import Z
from tests.test_montecarlo import P_SEPARATED, _mix1d, _replicate, kl_quad
from tests.test_montecarlo_few import _grid_kl

F64 = torch.float64
R = 20_000
P_OVERLAP = ([0.0, 1.2], [0.0, 0.3], [1.0, 0.8])


def _z(values: torch.Tensor, exact: float) -> float:
    v = values.detach().double()
    return (v.mean().item() - exact) / (v.std().item() / math.sqrt(v.numel()))


@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("mix", [P_SEPARATED, P_OVERLAP], ids=["separated", "overlapping"])
def test_unbiased_against_quadrature(n, mix):
    p, q = _mix1d(*mix), Normal(torch.tensor(0.5, dtype=F64), torch.tensor(2.5, dtype=F64))
    exact = kl_quad(p, q)
    g = torch.Generator().manual_seed(10 + n)
    value = kl_mixture_to_gaussian(_replicate(p, R), _replicate(q, R), num_samples=n, generator=g)
    z = _z(value, exact)
    assert abs(z) < Z, f"mean {value.mean().item():.6f} exact {exact:.6f} z {z:.2f}"


def test_gradient_unbiased_and_exact_in_q():
    """Per-replicate leaves: the gradients averaged against the trapezoid rule's; q's gradient
    is the closed form's, identical in every replicate."""
    (pl, pm, ps) = P_SEPARATED
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    ref_p = [t(pl).requires_grad_(), t(pm).requires_grad_(), t(ps).requires_grad_()]
    ref_q = [t(0.5).requires_grad_(), t(2.5).requires_grad_()]
    ref = torch.autograd.grad(_grid_kl(*ref_p, Normal(*ref_q)), [*ref_p, *ref_q])
    leaves = [t(v).expand(R, 3).clone().requires_grad_() for v in (pl, pm, ps)]
    q_leaves = [t(v).expand(R).clone().requires_grad_() for v in (0.5, 2.5)]
    p = MixtureSameFamily(Categorical(logits=leaves[0]), Normal(leaves[1], leaves[2]))
    value = kl_mixture_to_gaussian(
        p, Normal(*q_leaves), num_samples=1, generator=torch.Generator().manual_seed(4)
    )
    grads = torch.autograd.grad(value.sum(), [*leaves, *q_leaves])
    for name, g, r in zip(("logits", "loc", "scale"), grads[:3], ref[:3]):
        z = (g.mean(0) - r) / (g.std(0) / math.sqrt(R))
        assert (z.abs() < Z).all(), f"{name}: mean={g.mean(0).tolist()} ref={r.tolist()}"
    for name, g, r in zip(("q loc", "q scale"), grads[3:], ref[3:]):
        torch.testing.assert_close(g, r.expand(R), rtol=1e-7, atol=1e-9, msg=name)


@pytest.mark.parametrize("full", [False, True], ids=["diagonal-q", "full-q"])
def test_agrees_with_the_stratified_engine_in_3d(full):
    """Replicates of the value (each with its own draws) against the engine's estimate at many
    samples, on a diagonal q (the moment form of the cross-entropy) and a full one (pairwise)."""
    g = torch.Generator().manual_seed(0)
    k, d, b = 4, 3, 5
    p = MixtureSameFamily(
        Categorical(logits=torch.randn(k, generator=g, dtype=F64)),
        Independent(
            Normal(
                torch.randn(k, d, generator=g, dtype=F64),
                torch.rand(k, d, generator=g, dtype=F64) + 0.4,
            ),
            1,
        ),
    )
    loc, sd = torch.randn(b, d, generator=g, dtype=F64), torch.rand(b, d, generator=g, dtype=F64)
    q = (
        MultivariateNormal(loc, torch.diag_embed((sd + 0.5).square()) + 0.1)
        if full
        else Independent(Normal(loc, sd + 0.5), 1)
    )
    assert reverse_applies(p, q, 4)
    ours = torch.stack(
        [
            kl_mixture_to_gaussian(p, q, num_samples=4, generator=torch.Generator().manual_seed(s))
            for s in range(200)
        ]
    )
    engine = kl_mc(p, q, num_samples=200_000, generator=torch.Generator().manual_seed(2))
    se = (ours.var(0) / ours.shape[0] + engine.stderr.square()).sqrt()
    z = (ours.mean(0) - engine.value) / se
    assert (z.abs() < Z).all(), f"z {z.tolist()}"


def test_nan_stays_in_its_element_and_zero_weight_is_zero():
    loc = torch.tensor([[-1.0, 0.0], [1.0, 0.5], [3.0, 3.0]], dtype=F64, requires_grad=True)
    probs = torch.tensor([0.5, 0.5, 0.0], dtype=F64)
    p = MixtureSameFamily(Categorical(probs=probs), Independent(Normal(loc, 1.0), 1))
    q_loc = torch.tensor([[0.0, 0.0], [math.nan, 0.0], [1.0, 1.0]], dtype=F64)
    q = Independent(Normal(q_loc, 1.5, validate_args=False), 1)
    value = kl_mixture_to_gaussian(p, q, num_samples=64, generator=torch.Generator().manual_seed(0))
    assert value[1].isnan() and value[[0, 2]].isfinite().all()
    finite = Independent(Normal(q_loc[[0, 2]], 1.5), 1)
    value = kl_mixture_to_gaussian(
        p, finite, num_samples=64, generator=torch.Generator().manual_seed(0)
    )
    (g_loc,) = torch.autograd.grad(value.sum(), [loc])
    assert g_loc.isfinite().all() and (g_loc[2] == 0).all(), "a weight-0 component has no say"


def test_registered_rule_takes_it_for_a_shared_prior(monkeypatch):
    """A shared prior against a batch of posteriors at one sample per pair: this estimator; a
    batch of mixtures at one sample: the stratified engine (one draw each is all the budget)."""
    prior = _mix1d(*P_SEPARATED)
    post = Normal(torch.zeros(8, dtype=F64), torch.ones(8, dtype=F64))
    calls: list[int] = []
    real = montecarlo.kl_mixture_to_gaussian

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(montecarlo, "kl_mixture_to_gaussian", spy)
    with distkl.options(method="mc", num_samples=1):
        value = kl_divergence(prior, post)
    assert calls and value.shape == (8,) and value.isfinite().all()
    calls.clear()
    est = kl_mc(prior, post, num_samples=16)  # a standard error: the stratified engine
    assert not calls and est.stderr.isfinite().all()
    assert kl_mc_value(prior, post, num_samples=16).isfinite().all() and calls
    assert not reverse_applies(_replicate(prior, 8), post, 1)
    assert reverse_applies(_replicate(prior, 8), post, 6)


def test_one_component_equal_to_q_is_exactly_zero():
    p = MixtureSameFamily(
        Categorical(logits=torch.zeros(1, dtype=F64)),
        Independent(Normal(torch.ones(1, 2, dtype=F64), 2.0), 1),
    )
    q = Independent(Normal(torch.ones(2, dtype=F64), 2.0), 1)
    assert kl_mixture_to_gaussian(p, q, num_samples=8).item() == 0.0


# ---- the fused log-density ---------------------------------------------------------------------


def _mixture(lw, loc, scale):
    return MixtureSameFamily(Categorical(logits=lw), Independent(Normal(loc, scale), 1))


def test_diag_mixture_log_prob_value_and_derivatives():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, generator=g, dtype=F64, requires_grad=True)
    lw = torch.randn(5, 6, generator=g, dtype=F64).log_softmax(-1).requires_grad_()
    loc = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    sc = (0.3 * torch.randn(1, 6, 4, generator=g, dtype=F64)).exp().requires_grad_()
    torch.testing.assert_close(
        diag_mixture_log_prob(z, lw, loc, sc), _mixture(lw, loc, sc).log_prob(z), rtol=1e-13, atol=0
    )
    assert torch.autograd.gradcheck(diag_mixture_log_prob, (z, lw, loc, sc))
    assert torch.autograd.gradgradcheck(diag_mixture_log_prob, (z, lw, loc, sc))


def test_diag_mixture_log_prob_zero_weight_and_nan():
    lw = torch.tensor([0.0, -math.inf], dtype=F64, requires_grad=True)
    loc = torch.tensor([[0.0], [1.0]], dtype=F64, requires_grad=True)
    sc = torch.ones(2, 1, dtype=F64, requires_grad=True)
    z = torch.tensor([[0.5], [math.nan]], dtype=F64)
    out = diag_mixture_log_prob(z, lw, loc, sc)
    assert out[0].item() == pytest.approx(Normal(0.0, 1.0).log_prob(torch.tensor(0.5)).item())
    assert out[1].isnan()  # (its gradient is NaN in the shared parameters, as torch's is)
    g_lw, g_loc, g_sc = torch.autograd.grad(
        diag_mixture_log_prob(z[:1], lw, loc, sc), [lw, loc, sc]
    )
    assert g_lw[1] == 0 and g_loc[1] == 0 and g_sc[1] == 0
    assert g_lw.isfinite().all() and g_loc.isfinite().all() and g_sc.isfinite().all()
