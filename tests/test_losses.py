"""nn.Module losses on distributions: reductions mean what they say, KL direction, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, Normal, kl_divergence

import distkl
from distkl import functional
from distkl.bounded import bounded_kl, js_divergence_normalized
from distkl.losses import REDUCTIONS, JSDLoss, KLLoss
from distkl.registry import js_divergence


def pair(batch: tuple[int, ...], k: int = 5, device="cpu", dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(*batch, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    lq = torch.randn(*batch, k, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return Categorical(logits=lp), Categorical(logits=lq)


@pytest.mark.parametrize("batch", [(), (6,), (4, 3)], ids=["scalar", "B", "BxT"])
@pytest.mark.parametrize("make", ["jsd", "kl"])
def test_reductions(batch, make, device, dtype):
    p, q = pair(batch, device=device, dtype=dtype)
    per = js_divergence(p, q) if make == "jsd" else kl_divergence(p, q)
    loss_cls = JSDLoss if make == "jsd" else KLLoss
    none = loss_cls(reduction="none")(p, q)
    assert none.shape == batch and none.device.type == device.type and none.dtype == dtype
    torch.testing.assert_close(none, per)
    torch.testing.assert_close(loss_cls(reduction="sum")(p, q), per.sum())
    torch.testing.assert_close(loss_cls(reduction="mean")(p, q), per.sum() / max(1, per.numel()))
    first = batch[0] if batch else 1
    torch.testing.assert_close(loss_cls(reduction="batchmean")(p, q), per.sum() / first)


def test_default_reduction_is_mean():
    p, q = pair((4, 3))
    torch.testing.assert_close(JSDLoss()(p, q), js_divergence(p, q).mean())
    torch.testing.assert_close(KLLoss()(p, q), kl_divergence(p, q).mean())


def test_kl_loss_against_f_kl_div_and_its_mean_pitfall():
    """KLLoss(p, q) = KL(p || q); F.kl_div takes (log q, p) and its 'mean' divides by B * K."""
    b, k = 8, 5
    p, q = pair((b,), k)
    log_q, probs_p = q.logits, p.probs
    ours = KLLoss(reduction="batchmean")(p, q)
    torch.testing.assert_close(ours, F.kl_div(log_q, probs_p, reduction="batchmean"))
    torch.testing.assert_close(KLLoss(reduction="mean")(p, q), ours)  # batch shape (B,)
    with pytest.warns(UserWarning, match="batchmean"):
        pitfall = F.kl_div(log_q, probs_p, reduction="mean")
    torch.testing.assert_close(pitfall * k, ours)  # off by the number of categories
    torch.testing.assert_close(
        KLLoss(reduction="sum")(p, q), F.kl_div(log_q, probs_p, reduction="sum")
    )


def test_jsd_loss_options():
    p, q = pair((5,))
    torch.testing.assert_close(
        JSDLoss(skew=0.2, reduction="none")(p, q), js_divergence(p, q, skew=0.2)
    )
    norm = JSDLoss(normalized=True, reduction="none")(p, q)
    torch.testing.assert_close(norm, js_divergence_normalized(p, q))
    assert ((norm >= 0) & (norm <= 1)).all()
    torch.testing.assert_close(JSDLoss(normalized=True)(p, q), norm.mean())


def test_kl_loss_bounded():
    p, q = pair((5,))
    got = KLLoss(bound=0.5, saturation="sigmoid", reduction="none")(p, q)
    torch.testing.assert_close(got, bounded_kl(p, q, bound=0.5, saturation="sigmoid"))
    assert (got < 0.5).all()


@pytest.mark.parametrize("cls", [JSDLoss, KLLoss])
def test_bad_reduction(cls):
    with pytest.raises(ValueError, match="reduction"):
        cls(reduction="elementwise_mean")
    assert "batchmean" in REDUCTIONS


def test_bad_options():
    with pytest.raises(ValueError, match="skew"):
        JSDLoss(skew=1.0)
    with pytest.raises(ValueError, match="bound"):
        KLLoss(bound=-1.0)
    with pytest.raises(ValueError, match="saturation"):
        KLLoss(bound=1.0, saturation="clip")


def test_modules_have_no_parameters_and_a_repr():
    loss = JSDLoss(skew=0.3, reduction="sum")
    assert list(loss.parameters()) == []
    assert "skew=0.3" in repr(loss) and "'sum'" in repr(loss)
    assert "bound=2.0" in repr(KLLoss(bound=2.0))
    assert repr(KLLoss()) == "KLLoss(reduction='mean')"


def test_training_with_jsd_loss_converges():
    torch.manual_seed(0)
    target = Categorical(logits=torch.tensor([[2.0, 0.0, -1.0, float("-inf")]] * 4))
    logits = torch.nn.Parameter(torch.zeros(4, 4))
    opt = torch.optim.Adam([logits], lr=0.1)
    loss_fn = JSDLoss(reduction="batchmean")
    first = None
    for _ in range(200):
        opt.zero_grad()
        loss = loss_fn(Categorical(logits=logits), target)
        loss.backward()
        assert torch.isfinite(logits.grad).all()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 1e-2 * first


def test_gaussian_losses_with_gradients(device):
    loc = torch.zeros(3, 2, device=device, requires_grad=True)
    p = Independent(Normal(loc, 1.0), 1)
    q = Independent(Normal(torch.ones(3, 2, device=device), 1.5), 1)
    with distkl.options(num_samples=64, generator=torch.Generator(device=device).manual_seed(0)):
        loss = JSDLoss()(p, q) + KLLoss(bound=math.log(2))(p, q)
    loss.backward()
    assert torch.isfinite(loc.grad).all() and (loc.grad != 0).any()


def test_reduction_message_is_the_functional_one():
    with pytest.raises(ValueError) as from_loss:
        KLLoss(reduction="avg")
    with pytest.raises(ValueError) as from_functional:
        functional.kl_divergence(p_logits=torch.zeros(2), q_logits=torch.zeros(2), reduction="avg")
    assert str(from_loss.value) == str(from_functional.value)
    assert "reduction must be one of 'none', 'sum', 'mean', 'batchmean', got 'avg'" in str(
        from_loss.value
    )


@pytest.mark.parametrize("bound", ["1", True, torch.tensor(1.0)])
def test_bound_of_the_wrong_type_is_named(bound):
    with pytest.raises(TypeError, match="bound must be a finite number > 0"):
        KLLoss(bound=bound)


def test_skew_none_is_named():
    with pytest.raises(TypeError, match="skew must be a Python float in \\(0, 1\\), got NoneType"):
        JSDLoss(skew=None)  # type: ignore[arg-type]
