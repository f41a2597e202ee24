"""The log-space kernel (distkl._logspace): zeros exact, NaN in gives NaN out, safe gradients."""

from __future__ import annotations

import math

import pytest
import torch

from distkl._logspace import (
    binary_entropy,
    clamp_to_js_range,
    js_from_log_probs,
    kl_from_log_probs,
    log_ratio_to_mix,
    safe_log,
    safe_logsumexp,
)

INF, NAN = math.inf, math.nan


def test_safe_log_zero_is_minus_inf_with_zero_gradient(device, dtype):
    x = torch.tensor([0.0, 0.5, 2.0], device=device, dtype=dtype, requires_grad=True)
    out = safe_log(x)
    assert out[0].item() == -INF
    torch.testing.assert_close(out[1:], x[1:].detach().log())
    out[1:].sum().backward()
    assert x.grad is not None and x.grad[0].item() == 0.0 and torch.isfinite(x.grad).all()


def test_safe_log_keeps_nan_and_negative_is_nan():
    out = safe_log(torch.tensor([NAN, -1.0]))
    assert out.isnan().all()


def test_safe_logsumexp_all_minus_inf_rows(device, dtype):
    x = torch.tensor([[-INF, -INF], [0.0, -INF], [1.0, 2.0]], device=device, dtype=dtype)
    x.requires_grad_()
    out = safe_logsumexp(x, dim=-1)
    assert out[0].item() == -INF
    torch.testing.assert_close(out[1:], torch.logsumexp(x[1:].detach(), -1))
    out[1:].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and (x.grad[0] == 0).all()
    assert safe_logsumexp(x, dim=-1, keepdim=True).shape == (3, 1)


def test_safe_logsumexp_nan_row_is_nan():
    out = safe_logsumexp(torch.tensor([[NAN, 0.0], [-INF, -INF]]), dim=-1)
    assert out[0].isnan() and out[1].item() == -INF


def test_binary_entropy_and_clamp_to_js_range(dtype):
    assert binary_entropy(0.5) == pytest.approx(math.log(2.0), rel=1e-15)
    h = binary_entropy(0.3)
    clamped = clamp_to_js_range(torch.tensor([-1e-9, 0.1, 5.0, NAN], dtype=dtype), 0.3)
    assert clamped[0].item() == 0.0 and clamped[2].item() <= h and clamped[3].isnan()
    assert clamped[2].item() == pytest.approx(h, rel=1e-6)


def test_log_ratio_to_mix_exact_at_zero_and_no_overflow():
    d = torch.tensor([0.0, 1e-12, 800.0], dtype=torch.float64)
    r = log_ratio_to_mix(d, 0.5)
    assert r[0].item() == 0.0
    assert r[1].item() == pytest.approx(-0.5e-12, rel=1e-9)
    assert r[2].item() == pytest.approx(-(math.log(0.5) + 800.0), rel=1e-12)


@pytest.mark.parametrize(
    "log_p, log_q",
    [
        ([NAN, 0.0, -INF], [-1.0, -1.0, -1.0]),  # NaN in p
        ([0.0, -INF, -INF], [-1.0, NAN, -1.0]),  # NaN in q where p = 0: must not be masked
        ([0.0, -INF, -INF], [-INF, NAN, 0.0]),  # NaN beside a p > 0 = q category (KL +inf)
        ([NAN, NAN, NAN], [-1.0, -1.0, -1.0]),
    ],
)
def test_nan_in_gives_nan_out(log_p, log_q, device, dtype):
    lp = torch.tensor([log_p, [-1.0986] * 3], device=device, dtype=dtype)
    lq = torch.tensor([log_q, [-1.0986] * 3], device=device, dtype=dtype)
    for fn in (kl_from_log_probs, js_from_log_probs):
        out = fn(lp, lq)
        assert out[0].isnan(), (fn.__name__, out)
        assert torch.isfinite(out[1]), (fn.__name__, out)
        assert fn(lq, lp)[0].isnan(), fn.__name__


def test_kl_infinite_and_zero_unchanged():
    kl = kl_from_log_probs(torch.tensor([0.0, -INF]), torch.tensor([-INF, 0.0]))
    assert kl.item() == INF
    assert kl_from_log_probs(torch.tensor([0.0, -INF]), torch.tensor([0.0, -INF])).item() == 0.0


def test_dim_out_of_range_is_index_error_naming_dim():
    x = torch.zeros(2, 3)
    for fn in (kl_from_log_probs, js_from_log_probs):
        with pytest.raises(IndexError, match="dim=2 is out of range"):
            fn(x, x, dim=2)
        with pytest.raises(IndexError, match="dim=-3 is out of range"):
            fn(x, x, dim=-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "alpha", [0.5, 0.1, 1e-3, 1e-8, 1e-17, 1.0 - 1e-9], ids=lambda a: f"alpha={a:g}"
)
def test_clamp_to_js_range_upper_end_is_the_largest_value_at_most_h(alpha, dtype):
    """The upper end of the JS clamp is representable, <= H(alpha), and the next number up in
    the dtype is > H(alpha) (computed without tensors, so `torch.compile` folds it)."""
    h = binary_entropy(alpha)
    top = clamp_to_js_range(torch.tensor(math.inf, dtype=dtype), alpha)
    assert top.dtype == dtype
    assert float(top) <= h
    up = torch.nextafter(top, torch.tensor(math.inf, dtype=dtype))
    assert float(up) > h
