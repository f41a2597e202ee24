"""distkl.functional: KL and JS on raw logits/probabilities, against scipy and the definitions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon
from scipy.stats import entropy
from torch.distributions import Categorical, kl_divergence

import distkl.rules.categorical  # noqa: F401  (registers the categorical rules)
from distkl._logspace import binary_entropy
from distkl.functional import (
    REDUCTIONS,
    js_divergence,
    js_from_log_probs,
    kl_from_log_probs,
    log_probs,
)
from distkl.functional import (
    kl_divergence as fkl,
)

INF = math.inf


def rand_probs(*shape: int, seed: int, zeros: float = 0.0) -> np.ndarray:
    """Random probabilities in float64 along the last axis, a fraction ``zeros`` set to 0."""
    rng = np.random.default_rng(seed)
    x = rng.gamma(0.7, size=shape)
    if zeros:
        x[rng.random(shape) < zeros] = 0.0
        x[..., 0] += x.sum(-1) == 0  # keep every row valid
    return x / x.sum(-1, keepdims=True)


def lp(x: np.ndarray, device="cpu", dtype=torch.float64) -> torch.Tensor:
    with np.errstate(divide="ignore"):
        return torch.as_tensor(np.log(x), device=device, dtype=dtype)


def tol(dtype: torch.dtype) -> dict:
    return (
        {"rtol": 1e-11, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    )


def js_reference(p: np.ndarray, q: np.ndarray, a: float) -> np.ndarray:
    """The definition: a KL(p || m) + (1 - a) KL(q || m), m = a p + (1 - a) q, per row (scipy)."""
    m = a * p + (1 - a) * q
    return np.array([a * entropy(x, z) + (1 - a) * entropy(y, z) for x, y, z in zip(p, q, m)])


# ---- kl_from_log_probs -----------------------------------------------------------------------


def test_kl_from_log_probs_vs_scipy(device, dtype):
    p, q = rand_probs(64, 7, seed=1, zeros=0.2), rand_probs(64, 7, seed=2)
    kl = kl_from_log_probs(lp(p, device, dtype), lp(q, device, dtype))
    expected = [entropy(a, b) for a, b in zip(p, q)]
    assert kl.shape == (64,) and kl.dtype == dtype
    np.testing.assert_allclose(kl.cpu().double().numpy(), expected, **tol(dtype))


def test_kl_from_log_probs_infinite_and_zero(device, dtype):
    log_p = lp(np.array([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]), device, dtype)
    log_q = lp(np.array([[0.5, 0.0, 0.5], [0.2, 0.8, 0.0], [0.0, 0.0, 1.0]]), device, dtype)
    log_p.requires_grad_()
    log_q.requires_grad_()
    kl = kl_from_log_probs(log_p, log_q)
    assert kl[0].item() == INF
    assert kl[1].item() == pytest.approx(entropy([0.5, 0.5, 0], [0.2, 0.8, 0]), rel=1e-6)
    assert kl[2].item() == 0.0
    kl[1:].sum().backward(retain_graph=True)
    assert torch.isfinite(log_p.grad).all() and torch.isfinite(log_q.grad).all()
    log_p.grad = log_q.grad = None
    kl[0].backward()
    assert not torch.isnan(log_p.grad).any() and not torch.isnan(log_q.grad).any()


def test_kl_from_log_probs_dim_and_broadcast():
    p = rand_probs(2, 1, 5, seed=3).transpose(0, 2, 1)  # (2, 5, 1): categories on dim=1
    q = rand_probs(3, 5, seed=4).T  # (5, 3)
    kl = kl_from_log_probs(lp(p), lp(q), dim=-2)
    assert kl.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert kl[i, j].item() == pytest.approx(entropy(p[i, :, 0], q[:, j]), rel=1e-12)
    with pytest.raises(ValueError, match="got 5 and 4"):
        kl_from_log_probs(lp(q.T), lp(rand_probs(3, 4, seed=5)))


def test_kl_from_log_probs_gradcheck():
    p, q = rand_probs(3, 4, seed=6), rand_probs(3, 4, seed=7)
    a, b = lp(p).requires_grad_(), lp(q).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: kl_from_log_probs(x.log_softmax(-1), y.log_softmax(-1)), (a, b)
    )


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(st.floats(0.0, 10.0), min_size=2, max_size=8),
    st.lists(st.floats(0.0, 10.0), min_size=2, max_size=8),
)
def test_kl_property_against_scipy(a, b):
    k = min(len(a), len(b))
    x, y = np.array(a[:k]), np.array(b[:k])
    assume(x.sum() > 1e-3 and y.sum() > 1e-3)
    p, q = x / x.sum(), y / y.sum()
    kl = fkl(p_probs=torch.as_tensor(p), q_probs=torch.as_tensor(q)).item()
    expected = entropy(p, q)
    if math.isinf(expected):
        assert kl == INF
    else:
        assert kl == pytest.approx(expected, rel=1e-9, abs=1e-12)


# ---- js_from_log_probs -----------------------------------------------------------------------


def test_js_vs_scipy_jensenshannon(device, dtype):
    p, q = rand_probs(50, 6, seed=8, zeros=0.3), rand_probs(50, 6, seed=9, zeros=0.3)
    js = js_from_log_probs(lp(p, device, dtype), lp(q, device, dtype))
    expected = jensenshannon(p, q, axis=-1) ** 2  # natural log by default
    np.testing.assert_allclose(js.cpu().double().numpy(), expected, **tol(dtype))


@pytest.mark.parametrize("skew", [0.1, 0.3, 0.5, 0.77, 0.95])
def test_js_skew_vs_definition(skew, dtype):
    p, q = rand_probs(40, 5, seed=10, zeros=0.25), rand_probs(40, 5, seed=11, zeros=0.25)
    js = js_from_log_probs(lp(p, dtype=dtype), lp(q, dtype=dtype), skew=skew)
    np.testing.assert_allclose(js.double().numpy(), js_reference(p, q, skew), **tol(dtype))
    # JS_a(p, q) = JS_(1-a)(q, p) and 0 <= JS_a <= H(a).
    swapped = js_from_log_probs(lp(q, dtype=dtype), lp(p, dtype=dtype), skew=1 - skew)
    np.testing.assert_allclose(js.numpy(), swapped.numpy(), **tol(dtype))
    assert torch.all(js >= 0) and torch.all(js <= binary_entropy(skew))


@pytest.mark.parametrize("skew", [0.5, 0.2, 0.9])
def test_js_disjoint_supports(skew, device, dtype):
    p = torch.tensor([[0.3, 0.7, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]], device=device, dtype=dtype)
    q = torch.tensor([[0.0, 0.0, 0.4, 0.6], [0.0, 0.0, 0.0, 1.0]], device=device, dtype=dtype)
    js = js_from_log_probs(_log(p), _log(q), skew=skew)
    h = binary_entropy(skew)
    assert torch.all((js - h).abs() <= 4 * torch.finfo(dtype).eps * h), (js, h)
    if skew == 0.5:
        assert torch.all((js - math.log(2)).abs() <= 4 * torch.finfo(dtype).eps)


def _log(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).log(), -INF)


def test_js_identical_is_zero_and_never_inf(device, dtype):
    p = torch.tensor([[0.2, 0.0, 0.8], [1.0, 0.0, 0.0]], device=device, dtype=dtype)
    assert torch.all(js_from_log_probs(_log(p), _log(p)) == 0)
    q = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.5, 0.5]], device=device, dtype=dtype)
    assert torch.isfinite(js_from_log_probs(_log(p), _log(q))).all()


def test_js_gradients_finite_with_zeros(device, dtype):
    p = torch.tensor([[0.2, 0.0, 0.8], [0.5, 0.5, 0.0]], device=device, dtype=dtype)
    q = torch.tensor([[0.0, 1.0, 0.0], [0.25, 0.25, 0.5]], device=device, dtype=dtype)
    a, b = _log(p).requires_grad_(), _log(q).requires_grad_()
    js_from_log_probs(a.log_softmax(-1), b.log_softmax(-1), skew=0.3).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("skew", [0.5, 0.25])
def test_js_gradcheck(skew):
    a = lp(rand_probs(3, 4, seed=12)).requires_grad_()
    b = lp(rand_probs(3, 4, seed=13)).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, y: js_from_log_probs(x.log_softmax(-1), y.log_softmax(-1), skew=skew), (a, b)
    )


def test_js_gradcheck_with_zero():
    # A -inf logit stays -inf under finite differences; the gradient there must be 0, not NaN.
    a = torch.tensor([[0.3, -INF, 1.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.1, 0.4, -INF]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, y: js_from_log_probs(x.log_softmax(-1), y.log_softmax(-1)), (a, b)
    )


@pytest.mark.parametrize("skew", [0.0, 1.0, -0.1, 1.5, math.nan])
def test_js_bad_skew(skew):
    x = torch.zeros(3).log_softmax(-1)
    with pytest.raises(ValueError, match="skew"):
        js_from_log_probs(x, x, skew=skew)
    with pytest.raises(ValueError, match="skew"):
        js_divergence(p_logits=x, q_logits=x, skew=skew)


# ---- kl_divergence / js_divergence front end -------------------------------------------------


def test_logits_and_probs_agree(device, dtype):
    p, q = rand_probs(8, 6, seed=14), rand_probs(8, 6, seed=15)
    pt = torch.as_tensor(p, device=device, dtype=dtype)
    qt = torch.as_tensor(q, device=device, dtype=dtype)
    by_probs = fkl(p_probs=pt * 3.0, q_probs=qt)  # unnormalised weights are normalised
    by_logits = fkl(p_logits=pt.log() + 1.0, q_logits=qt.log())
    mixed = fkl(p_probs=pt, q_logits=qt.log() - 2.0)
    expected = [entropy(a, b) for a, b in zip(p, q)]
    for got in (by_probs, by_logits, mixed):
        np.testing.assert_allclose(got.cpu().double().numpy(), expected, **tol(dtype))
    torch_value = kl_divergence(Categorical(logits=pt.log()), Categorical(logits=qt.log()))
    torch.testing.assert_close(by_logits, torch_value)


def test_reductions_vs_manual(device, dtype):
    p = torch.as_tensor(rand_probs(4, 3, 6, seed=16), device=device, dtype=dtype)
    q = torch.as_tensor(rand_probs(4, 3, 6, seed=17), device=device, dtype=dtype)
    none = fkl(p_probs=p, q_probs=q, reduction="none")
    assert none.shape == (4, 3)
    manual = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(none, manual)
    torch.testing.assert_close(fkl(p_probs=p, q_probs=q, reduction="sum"), manual.sum())
    torch.testing.assert_close(fkl(p_probs=p, q_probs=q, reduction="mean"), manual.sum() / 12)
    torch.testing.assert_close(fkl(p_probs=p, q_probs=q, reduction="batchmean"), manual.sum() / 4)
    # A single distribution: batchmean divides by 1.
    one = fkl(p_probs=p[0, 0], q_probs=q[0, 0], reduction="batchmean")
    torch.testing.assert_close(one, manual[0, 0])
    js = js_divergence(p_probs=p, q_probs=q, reduction="none")
    torch.testing.assert_close(js_divergence(p_probs=p, q_probs=q, reduction="mean"), js.mean())
    torch.testing.assert_close(js_divergence(p_probs=p, q_probs=q, reduction="sum"), js.sum())


def test_against_torch_kl_div_and_its_mean_pitfall():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    # F.kl_div(input=log q, target=p) computes KL(p || q): reversed argument order.
    log_q, p = student.log_softmax(-1), teacher.softmax(-1)
    ours = fkl(p_logits=teacher, q_logits=student, reduction="batchmean")
    torch.testing.assert_close(ours, F.kl_div(log_q, p, reduction="batchmean"))
    torch.testing.assert_close(
        fkl(p_logits=teacher, q_logits=student, reduction="sum"),
        F.kl_div(log_q, p, reduction="sum"),
    )
    # 'mean' in F.kl_div divides by every element (16 * 10), here by the 16 distributions.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about its own 'mean'
        theirs_mean = F.kl_div(log_q, p, reduction="mean")
    ours_mean = fkl(p_logits=teacher, q_logits=student, reduction="mean")
    torch.testing.assert_close(theirs_mean * 10, ours_mean)
    assert not torch.isclose(theirs_mean, ours_mean)


def test_dim_argument():
    p = torch.as_tensor(rand_probs(3, 4, 5, seed=18))  # categories last
    q = torch.as_tensor(rand_probs(3, 4, 5, seed=19))
    expected = fkl(p_probs=p, q_probs=q)
    got = fkl(p_probs=p.movedim(-1, 0), q_probs=q.movedim(-1, 0), dim=0)
    torch.testing.assert_close(got, expected)
    got = fkl(p_probs=p.movedim(-1, 1), q_probs=q.movedim(-1, 1), dim=1)
    torch.testing.assert_close(got, expected)
    # Non-negative dim indexes the broadcast shape, so a 1-D q lines up with a 2-D p.
    got = fkl(p_probs=p[0], q_probs=q[0, 0], dim=1)
    torch.testing.assert_close(got, fkl(p_probs=p[0], q_probs=q[0, 0]))
    # batchmean divides by the first dimension of the result (input shape without dim).
    torch.testing.assert_close(
        fkl(p_probs=p.movedim(-1, 0), q_probs=q.movedim(-1, 0), dim=0, reduction="batchmean"),
        expected.sum() / 3,
    )


def test_broadcasting():
    p = torch.as_tensor(rand_probs(2, 1, 5, seed=20))
    q = torch.as_tensor(rand_probs(3, 5, seed=21))
    out = fkl(p_probs=p, q_probs=q)
    assert out.shape == (2, 3)
    assert out[1, 2].item() == pytest.approx(entropy(p[1, 0].numpy(), q[2].numpy()), rel=1e-12)
    with pytest.raises(ValueError, match="must broadcast"):
        fkl(p_probs=torch.ones(2, 5), q_probs=torch.ones(3, 5))


def test_integer_counts_are_probabilities():
    p = torch.tensor([[3, 1, 0]])
    q = torch.tensor([[1, 1, 2]])
    assert fkl(p_probs=p, q_probs=q).item() == pytest.approx(
        entropy([3, 1, 0], [1, 1, 2]), rel=1e-6
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"p_probs": torch.tensor([0.5, -0.1, 0.6])}, "non-negative.*-0.1"),
        ({"p_probs": torch.tensor([0.5, math.nan, 0.5])}, "p_probs contains NaN"),
        ({"p_probs": torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]])}, "all zero"),
        ({"p_probs": torch.tensor([0.5, INF, 0.5])}, "infinite"),
        ({"p_logits": torch.tensor([0.5, math.nan, 0.5])}, "p_logits contains NaN"),
        ({"p_logits": torch.tensor([0.5, INF, 0.5])}, r"\+inf"),
        ({"p_logits": torch.tensor([-INF, -INF, -INF])}, "all -inf"),
        ({"p_logits": torch.zeros(3), "p_probs": torch.ones(3)}, "exactly one of p_logits"),
        ({}, "got neither"),
        ({"p_logits": torch.zeros(4)}, "same number of categories, got 4 and 3"),
    ],
)
def test_invalid_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fkl(q_probs=torch.ones(3), **kwargs)
    with pytest.raises(ValueError, match=message):
        js_divergence(q_probs=torch.ones(3), **kwargs)


def test_invalid_reduction_lists_valid_ones():
    with pytest.raises(
        ValueError, match="reduction must be one of 'none', 'sum', 'mean', 'batchmean', got 'avg'"
    ):
        fkl(p_logits=torch.zeros(3), q_logits=torch.zeros(3), reduction="avg")
    assert REDUCTIONS == ("none", "sum", "mean", "batchmean")


def test_not_a_tensor():
    with pytest.raises(TypeError, match="p_probs must be a torch.Tensor, got list"):
        fkl(p_probs=[0.5, 0.5], q_probs=torch.ones(2))  # type: ignore[arg-type]


def test_keyword_only():
    with pytest.raises(TypeError):
        fkl(torch.zeros(3), torch.zeros(3))  # type: ignore[misc]


def test_log_probs_exact_zeros_and_gradient():
    probs = torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64, requires_grad=True)
    out = log_probs(probs=probs)
    assert out[1].item() == -INF
    torch.testing.assert_close(out[[0, 2]], torch.tensor([0.25, 0.75], dtype=torch.float64).log())
    fkl(p_probs=probs, q_probs=torch.ones(3, dtype=torch.float64)).backward()
    assert torch.isfinite(probs.grad).all()


def test_functional_matches_distribution_rules():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    from torch.distributions import OneHotCategorical

    torch.testing.assert_close(
        fkl(p_logits=a, q_logits=b),
        kl_divergence(Categorical(logits=a), OneHotCategorical(logits=b)),
    )


# ---- silent wrong values and side effects (issue 11) ------------------------------------------


@pytest.mark.parametrize("fn", [fkl, js_divergence])
@pytest.mark.parametrize("dim", [2, 5, -3])
def test_dim_out_of_range_is_index_error_naming_the_dim(fn, dim):
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(IndexError, match=f"dim={dim} is out of range"):
        fn(p_logits=x, q_logits=y, dim=dim)
    with pytest.raises(IndexError, match=f"dim={dim} is out of range"):
        log_probs(logits=x, dim=dim)


@pytest.mark.parametrize("which", ["p_logits", "p_probs", "q_logits", "q_probs"])
@pytest.mark.parametrize("switch", ["keyword", "torch_default"])
def test_nan_in_gives_nan_out_without_validation(which, switch, monkeypatch):
    side = which[0]
    other = "q" if side == "p" else "p"
    bad = torch.tensor([[0.2, math.nan, 0.3], [0.2, 0.5, 0.3]])
    kwargs = {which: bad, f"{other}_probs": torch.tensor([0.1, 0.5, 0.4])}
    if switch == "keyword":
        kwargs["validate_args"] = False
    else:
        monkeypatch.setattr(torch.distributions.Distribution, "_validate_args", False)
    for fn in (fkl, js_divergence):
        out = fn(**kwargs)
        assert out[0].isnan() and torch.isfinite(out[1]), (fn.__name__, out)
        assert fn(reduction="sum", **kwargs).isnan()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"p_probs": torch.tensor([0.5, -0.1, 0.6])},
        {"p_probs": torch.tensor([0.0, 0.0, 0.0])},
        {"p_probs": torch.tensor([0.5, INF, 0.5])},
        {"p_logits": torch.tensor([0.5, INF, 0.5])},
        {"p_logits": torch.tensor([-INF, -INF, -INF])},
    ],
)
def test_invalid_values_give_nan_without_validation(kwargs):
    assert fkl(q_probs=torch.ones(3), validate_args=False, **kwargs).isnan()
    assert js_divergence(q_probs=torch.ones(3), validate_args=False, **kwargs).isnan()
    with pytest.raises(ValueError):
        fkl(q_probs=torch.ones(3), validate_args=True, **kwargs)


def test_validate_args_false_makes_no_host_sync(monkeypatch):
    calls: list[str] = []
    original_bool, original_item = torch.Tensor.__bool__, torch.Tensor.item

    def counting_bool(self: torch.Tensor) -> bool:
        calls.append("bool")
        return original_bool(self)

    def counting_item(self: torch.Tensor) -> object:
        calls.append("item")
        return original_item(self)

    monkeypatch.setattr(torch.Tensor, "__bool__", counting_bool)
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    x, y = torch.randn(4, 5), torch.rand(4, 5)
    fkl(p_logits=x, q_probs=y, validate_args=True)
    assert calls.count("bool") >= 4  # the value checks are there ...
    calls.clear()
    fkl(p_logits=x, q_probs=y, validate_args=False, reduction="mean")
    assert calls == []  # ... and gated off


def test_meta_tensors_give_meta_results():
    x = torch.empty(4, 5, device="meta")
    for fn in (fkl, js_divergence):
        out = fn(p_logits=x, q_probs=x)
        assert out.device.type == "meta" and out.shape == (4,)
        assert fn(p_logits=x, q_logits=x, reduction="batchmean").device.type == "meta"


@pytest.mark.parametrize("name", ["p_logits", "p_probs"])
def test_zero_categories_named(name):
    with pytest.raises(ValueError, match=f"{name} must have at least one category"):
        fkl(**{name: torch.zeros(3, 0)}, q_probs=torch.ones(3, 0))


def test_bad_skew_names_skew():
    with pytest.raises(TypeError, match="skew must be a Python float.*NoneType"):
        js_divergence(p_logits=torch.zeros(3), q_logits=torch.zeros(3), skew=None)  # type: ignore[arg-type]
