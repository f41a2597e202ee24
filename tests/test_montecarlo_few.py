"""kl_mc / jsd_mc / expectation with any num_samples >= 1 (issue 10.1).

Fewer samples than two per mixture component: interval stratification of the weights' CDF
(`distkl.montecarlo._strata.IntervalStrata`). Unbiasedness of the value and of the gradient is
checked by a z-test over independent replicates (one batch, one call) against quadrature
(scipy.integrate.quad for the value, a differentiable torch trapezoid on a fine grid for the
gradient). Z = 4.5 from conftest.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import integrate
from torch.distributions import Categorical, MixtureSameFamily, Normal

from distkl.montecarlo import expectation, jsd_mc, kl_mc
from tests.conftest import Z
from tests.test_montecarlo import (
    P_SEPARATED,
    Q_WIDE,
    _log_density,
    _mix1d,
    _np_mix,
    _replicate,
    kl_quad,
)

R = 20_000


def _z(values: torch.Tensor, exact: float) -> float:
    v = values.detach().double()
    return (v.mean().item() - exact) / (v.std().item() / math.sqrt(v.numel()))


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("reverse", [False, True], ids=["mix-mix", "rev"])
def test_kl_mc_unbiased_below_two_per_component(n, reverse):
    p, q = _mix1d(*P_SEPARATED), _mix1d(*Q_WIDE)
    if reverse:
        p, q = q, p
    exact = kl_quad(p, q)
    g = torch.Generator().manual_seed(100 + n)
    est = kl_mc(_replicate(p, R), _replicate(q, R), num_samples=n, generator=g)
    z = _z(est.value, exact)
    assert abs(z) < Z, f"n={n}: mean={est.value.mean().item():.5f} exact={exact:.5f} z={z:.2f}"


def test_single_gaussian_p_at_one_sample():
    p, q = _mix1d([0.0], [0.3], [0.8]), _mix1d(*P_SEPARATED)
    exact = kl_quad(p, q)
    est = kl_mc(
        _replicate(p, R),
        _replicate(q, R),
        num_samples=1,
        generator=torch.Generator().manual_seed(7),
    )
    assert abs(_z(est.value, exact)) < Z
    assert est.stderr.isnan().all(), "one sample cannot estimate a standard error"


def test_stderr_nan_at_one_sample_and_never_understated_above():
    """n = 1: NaN. n = 2..5: the collapsed-strata variance is conservative (E[se^2] >= Var)."""
    p, q = _mix1d(*P_SEPARATED), _mix1d(*Q_WIDE)
    one = kl_mc(p, q, num_samples=1, generator=torch.Generator().manual_seed(1))
    assert one.stderr.isnan() and one.value.isfinite()
    for n in (2, 3, 5):
        est = kl_mc(
            _replicate(p, R),
            _replicate(q, R),
            num_samples=n,
            generator=torch.Generator().manual_seed(n),
        )
        assert est.stderr.isfinite().all()
        var = est.value.var().item()
        se2 = est.stderr.square()
        # var of the sample variance of the values: (m4 - var^2) / R, estimated.
        v = est.value - est.value.mean()
        sd_var = math.sqrt(((v**4).mean().item() - var**2) / R)
        margin = Z * math.hypot(se2.std().item() / math.sqrt(R), sd_var)
        assert se2.mean().item() >= var - margin, (
            f"n={n}: E[se^2]={se2.mean().item():.4f} var={var:.4f}"
        )


def _grid_kl(logits, loc, scale, q) -> torch.Tensor:
    """KL(p || q) by the trapezoid rule on [-30, 30] (2e5 intervals), differentiable."""
    x = torch.linspace(-30.0, 30.0, 200_001, dtype=torch.float64)
    p = MixtureSameFamily(Categorical(logits=logits), Normal(loc, scale))
    lp = p.log_prob(x)
    return torch.trapezoid(lp.exp() * (lp - q.log_prob(x)), x)


def test_gradient_unbiased_at_one_sample():
    """Per-replicate leaves: the gradient of each replicate's value, averaged, against the grid."""
    (pl, pm, ps), q = P_SEPARATED, _mix1d(*Q_WIDE)
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    ref_leaves = [t(pl).requires_grad_(), t(pm).requires_grad_(), t(ps).requires_grad_()]
    ref = torch.autograd.grad(_grid_kl(*ref_leaves, q), ref_leaves)
    assert abs(_grid_kl(*ref_leaves, q).item() - kl_quad(_mix1d(*P_SEPARATED), q)) < 1e-8
    leaves = [t(v).expand(R, 3).clone().requires_grad_() for v in (pl, pm, ps)]
    p = MixtureSameFamily(Categorical(logits=leaves[0]), Normal(leaves[1], leaves[2]))
    est = kl_mc(p, _replicate(q, R), num_samples=1, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(est.value.sum(), leaves)
    for name, g, r in zip(("logits", "loc", "scale"), grads, ref):
        z = (g.mean(0) - r) / (g.std(0) / math.sqrt(R))
        assert (z.abs() < Z).all(), (
            f"{name}: mean={g.mean(0).tolist()} ref={r.tolist()} z={z.tolist()}"
        )


def _jsd_quad(p, q, alpha: float) -> float:
    mp, mq = _np_mix(p), _np_mix(q)

    def f(x: float) -> float:
        lp, lq = _log_density(x, mp), _log_density(x, mq)
        lm = math.log(alpha * math.exp(lp) + (1 - alpha) * math.exp(lq))
        return alpha * math.exp(lp) * (lp - lm) + (1 - alpha) * math.exp(lq) * (lq - lm)

    return integrate.quad(f, -40, 40, points=sorted([*mp[1], *mq[1]]), limit=500)[0]


@pytest.mark.parametrize("n", [1, 2])
def test_jsd_mc_unbiased_at_few_samples(n):
    p, q = _mix1d(*P_SEPARATED), _mix1d(*Q_WIDE)
    exact = _jsd_quad(p, q, 0.3)
    est = jsd_mc(
        _replicate(p, R),
        _replicate(q, R),
        skew=0.3,
        num_samples=n,
        generator=torch.Generator().manual_seed(9),
    )
    assert abs(_z(est.value, exact)) < Z
    assert est.stderr.isnan().all() == (n == 1)


def test_expectation_at_one_sample():
    """E[x^2] of the mixture, one sample per replicate."""
    p = _mix1d(*P_SEPARATED)
    w = torch.softmax(torch.tensor(P_SEPARATED[0], dtype=torch.float64), -1)
    m, s = (
        torch.tensor(P_SEPARATED[1], dtype=torch.float64),
        torch.tensor(P_SEPARATED[2], dtype=torch.float64),
    )
    exact = (w * (m.square() + s.square())).sum().item()
    est = expectation(
        p,
        lambda x: x.square(),
        num_samples=1,
        batch_shape=(R,),
        generator=torch.Generator().manual_seed(5),
    )
    assert abs(_z(est.value, exact)) < Z


def test_zero_weight_component_never_drawn():
    """Exact zero weight (probs=0): the interval allocation never picks it, even at n = 1."""
    p = MixtureSameFamily(
        Categorical(probs=torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64).expand(4000, 3)),
        Normal(
            torch.tensor([0.0, 1e6, 1.0], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        ),
    )
    est = expectation(p, lambda x: x, num_samples=1, generator=torch.Generator().manual_seed(2))
    assert (est.value.abs() < 50).all()
