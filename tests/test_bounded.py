"""Bounded divergences: normalised JSD, JS distance, and saturated KL done right."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    Normal,
    OneHotCategorical,
    kl_divergence,
)

from distkl._logspace import binary_entropy
from distkl.bounded import (
    SATURATIONS,
    bounded_kl,
    js_distance,
    js_divergence_normalized,
    saturate,
)
from distkl.registry import js_divergence

LOG2 = math.log(2.0)
NEG_INF = -math.inf


def random_categoricals(n: int, k: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(n, k, generator=g, dtype=dtype) * 2
    lq = torch.randn(n, k, generator=g, dtype=dtype) * 2
    lp[torch.rand(n, k, generator=g) < 0.2] = NEG_INF
    lq[torch.rand(n, k, generator=g) < 0.2] = NEG_INF
    lp[:, 0] = lp[:, 0].clamp_min(0.0)
    lq[:, -1] = lq[:, -1].clamp_min(0.0)
    return Categorical(logits=lp), Categorical(logits=lq)


# ============================================================================================
# Normalised JSD and the JS distance.


def test_normalized_is_bits_at_half_and_matches_scipy():
    p, q = random_categoricals(1000, 6, 0)
    got = js_divergence_normalized(p, q).numpy()
    ref = jensenshannon(p.probs.numpy(), q.probs.numpy(), axis=-1, base=2) ** 2
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-15)
    assert ((got >= 0) & (got <= 1)).all()


@pytest.mark.parametrize("alpha", [0.5, 0.1, 0.7])
def test_normalized_range_and_disjoint_is_one(alpha, dtype):
    p, q = random_categoricals(500, 5, 1, dtype)
    got = js_divergence_normalized(p, q, skew=alpha)
    assert ((got >= 0) & (got <= 1)).all()
    torch.testing.assert_close(got, js_divergence(p, q, skew=alpha) / binary_entropy(alpha))
    a = Categorical(logits=torch.tensor([0.0, 1.0, NEG_INF, NEG_INF], dtype=dtype))
    b = OneHotCategorical(logits=torch.tensor([NEG_INF, NEG_INF, 0.5, 0.0], dtype=dtype))
    one = js_divergence_normalized(a, b, skew=alpha).item()
    assert one <= 1.0 and one >= 1 - 4 * torch.finfo(dtype).eps


def test_js_distance_matches_scipy():
    p, q = random_categoricals(1000, 6, 2)
    pn, qn = p.probs.numpy(), q.probs.numpy()
    np.testing.assert_allclose(
        js_distance(p, q).numpy(), jensenshannon(pn, qn, axis=-1), rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        js_distance(p, q, normalized=True).numpy(),
        jensenshannon(pn, qn, axis=-1, base=2),
        rtol=1e-9,
        atol=1e-12,
    )


def test_js_distance_triangle_inequality():
    """sqrt(JSD) is a metric (Endres & Schindelin 2003): check 5000 random triples."""
    g = torch.Generator().manual_seed(3)
    a, b, c = (
        Categorical(logits=torch.randn(5000, 4, generator=g, dtype=torch.float64) * 3)
        for _ in range(3)
    )
    ab, bc, ac = js_distance(a, b), js_distance(b, c), js_distance(a, c)
    assert (ac <= ab + bc + 1e-12).all()


def test_js_distance_finite_gradient_at_p_equals_q(dtype):
    logits = torch.randn(4, 5, dtype=dtype, requires_grad=True)
    d = js_distance(Categorical(logits=logits), Categorical(logits=logits.detach()))
    assert (d == 0).all()
    d.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # and near it: finite, non-zero
    near = logits.detach().clone().requires_grad_()
    d = js_distance(Categorical(logits=near), Categorical(logits=logits.detach() + 1e-3))
    d.sum().backward()
    assert torch.isfinite(near.grad).all() and (near.grad != 0).any()


def test_js_distance_gradcheck():
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 4, dtype=torch.float64)

    def f(a):
        return js_distance(Categorical(logits=a), Categorical(logits=b), skew=0.3)

    assert torch.autograd.gradcheck(f, (a,))


def test_js_distance_continuous(device):
    p = Normal(torch.zeros(3, device=device), 1.0)
    q = Normal(torch.tensor([0.0, 1.0, 50.0], device=device), 1.0)
    d = js_distance(p, q, normalized=True)
    assert d.device.type == device.type
    assert d[0].item() == 0 and 0 < d[1].item() < 1 and abs(d[2].item() - 1.0) < 1e-4


# ============================================================================================
# Saturated KL.


@pytest.mark.parametrize("saturation", SATURATIONS)
def test_saturate_shape_of_the_curve(saturation, dtype):
    bound = 2.5
    kl = torch.linspace(0, 12 * bound, 2001, dtype=dtype)
    entropy = torch.tensor(0.7, dtype=dtype)
    y = saturate(kl, bound=bound, saturation=saturation, entropy=entropy)
    assert y[0].item() == 0.0
    # strictly increasing while it is representably below the bound
    below = y < bound * (1 - 1e3 * torch.finfo(dtype).eps)
    assert below[kl <= bound].all()
    assert (y[1:][below[1:]] > y[:-1][below[1:]]).all()
    assert (y <= bound).all() and (y >= 0).all()


@pytest.mark.parametrize("saturation", SATURATIONS)
def test_saturate_huge_and_infinite_kl_gradients(saturation, dtype):
    big = torch.finfo(dtype).max
    kl = torch.tensor([0.0, 1.0, 1e3, big, math.inf], dtype=dtype, requires_grad=True)
    y = saturate(kl, bound=1.0, saturation=saturation, entropy=torch.zeros((), dtype=dtype))
    assert y[-1].item() == 1.0 and y[-2].item() <= 1.0
    y.sum().backward()
    assert torch.isfinite(kl.grad).all()
    assert kl.grad[-1].item() == 0.0
    assert kl.grad[0].item() > 0


def test_saturate_formulas():
    kl = torch.tensor([0.0, 0.3, 2.0, 9.0], dtype=torch.float64)
    b = 1.7
    torch.testing.assert_close(saturate(kl, bound=b), b * torch.tanh(kl / b))
    # the popular b * sigmoid(kl / b) recentred: 2 sigmoid - 1
    recentred = b * (2 * torch.sigmoid(kl / b) - 1)
    torch.testing.assert_close(saturate(kl, bound=b, saturation="sigmoid"), recentred)
    assert (b * torch.sigmoid(kl[:1] / b)).item() == b / 2  # the popular form is not 0 at p = q
    h = torch.tensor([0.0, 0.5, 3.0, -2.0], dtype=torch.float64)  # negative: differential entropy
    s = b * (1 + torch.exp(-h.clamp_min(0)))
    torch.testing.assert_close(
        saturate(kl, bound=b, saturation="entropy", entropy=h), b * (1 - torch.exp(-kl / s))
    )


@pytest.mark.parametrize("saturation", SATURATIONS)
def test_saturate_is_odd_for_negative_estimates(saturation):
    kl = torch.tensor([0.01, 0.5, 4.0, math.inf], dtype=torch.float64)
    e = torch.tensor(0.3, dtype=torch.float64)
    pos = saturate(kl, bound=2.0, saturation=saturation, entropy=e)
    neg = saturate(-kl, bound=2.0, saturation=saturation, entropy=e)
    torch.testing.assert_close(neg, -pos)
    assert (neg > -2.0).sum() == 3


def test_saturate_nan_stays_nan():
    assert torch.isnan(saturate(torch.tensor([math.nan]), bound=1.0)).all()


@pytest.mark.parametrize("saturation", SATURATIONS)
def test_bounded_kl_zero_at_p_equals_q(saturation, device, dtype):
    logits = torch.randn(3, 4, device=device, dtype=dtype)
    logits[:, 1] = NEG_INF
    x = logits.clone().requires_grad_()
    y = bounded_kl(
        Categorical(logits=x), Categorical(logits=logits), bound=1.0, saturation=saturation
    )
    assert y.shape == (3,) and y.device.type == device.type and (y == 0).all()
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("saturation", SATURATIONS)
def test_bounded_kl_infinite_kl_gives_bound_and_zero_gradient(saturation, dtype):
    """torch's own Categorical rule backpropagates NaN here; bounded_kl does not."""
    a = torch.tensor([[0.0, 0.0, NEG_INF], [0.0, 1.0, 2.0]], dtype=dtype, requires_grad=True)
    b = torch.tensor([[0.0, NEG_INF, 0.0], [0.5, 0.0, 1.0]], dtype=dtype, requires_grad=True)
    y = bounded_kl(Categorical(logits=a), Categorical(logits=b), bound=3.0, saturation=saturation)
    assert y[0].item() == 3.0 and 0 < y[1].item() < 3.0
    y.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert (a.grad[0] == 0).all() and (b.grad[0] == 0).all()


@pytest.mark.parametrize("saturation", ["tanh", "sigmoid"])
def test_bounded_kl_continuous_matches_saturated_torch_kl(saturation):
    p = Independent(Normal(torch.randn(5, 3), torch.rand(5, 3) + 0.5), 1)
    q = Independent(Normal(torch.randn(5, 3) * 4, torch.rand(5, 3) + 0.1), 1)
    expected = saturate(kl_divergence(p, q), bound=4.0, saturation=saturation)
    torch.testing.assert_close(bounded_kl(p, q, bound=4.0, saturation=saturation), expected)


def test_bounded_kl_entropy_scale_is_detached():
    loc = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    log_scale = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    q = Normal(torch.tensor(1.0, dtype=torch.float64), 2.0)
    y = bounded_kl(Normal(loc, log_scale.exp()), q, bound=2.0, saturation="entropy")
    y.backward()
    # reference: same formula with the scale as a constant
    loc2 = loc.detach().clone().requires_grad_()
    ls2 = log_scale.detach().clone().requires_grad_()
    p2 = Normal(loc2, ls2.exp())
    s = 2.0 * (1 + torch.exp(-p2.entropy().detach().clamp_min(0)))
    (2.0 * (1 - torch.exp(-kl_divergence(p2, q) / s))).backward()
    torch.testing.assert_close(loc.grad, loc2.grad)
    torch.testing.assert_close(log_scale.grad, ls2.grad)


def test_bounded_kl_entropy_needs_entropy():
    mix = MixtureSameFamily(Categorical(logits=torch.zeros(2)), Normal(torch.zeros(2), 1.0))
    with pytest.raises(NotImplementedError, match="entropy"):
        bounded_kl(mix, mix, bound=1.0, saturation="entropy")


@pytest.mark.parametrize("bound", [0.0, -1.0, math.inf, math.nan])
def test_bad_bound_value(bound):
    p = Normal(0.0, 1.0)
    with pytest.raises(ValueError, match="bound"):
        bounded_kl(p, p, bound=bound)
    with pytest.raises(ValueError, match="bound"):
        saturate(torch.zeros(1), bound=bound)


@pytest.mark.parametrize("bound", [True, "1", None, torch.tensor(1.0)])
def test_bad_bound_type(bound):
    with pytest.raises(TypeError, match="bound"):
        bounded_kl(Normal(0.0, 1.0), Normal(0.0, 1.0), bound=bound)


def test_bad_saturation():
    with pytest.raises(ValueError, match="saturation"):
        bounded_kl(Normal(0.0, 1.0), Normal(0.0, 1.0), bound=1.0, saturation="clip")
    with pytest.raises(ValueError, match="entropy"):
        saturate(torch.zeros(1), bound=1.0, saturation="entropy")


def test_squashing_an_estimate_is_biased_low():
    """E[f(KL_hat)] < f(KL) for concave f: why squashing noisy estimates is documented."""
    g = torch.Generator().manual_seed(4)
    kl_hat = 1.0 + 0.8 * torch.randn(100000, generator=g, dtype=torch.float64)  # unbiased, KL = 1
    for saturation in SATURATIONS:
        e = torch.tensor(0.0, dtype=torch.float64)
        mean_f = saturate(kl_hat, bound=1.0, saturation=saturation, entropy=e).mean()
        f_mean = saturate(
            torch.tensor(1.0, dtype=torch.float64), bound=1.0, saturation=saturation, entropy=e
        )
        assert mean_f < f_mean - 0.01


def test_saturate_slopes_at_zero():
    b = 1.5
    h = torch.tensor(0.4, dtype=torch.float64)
    s = b * (1 + math.exp(-0.4))
    for saturation, slope in (("tanh", 1.0), ("sigmoid", 0.5), ("entropy", b / s)):
        x = torch.zeros((), dtype=torch.float64, requires_grad=True)
        saturate(x, bound=b, saturation=saturation, entropy=h).backward()
        assert abs(x.grad.item() - slope) < 1e-12, saturation
