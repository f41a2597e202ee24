"""Exact KL rules between Independent(Normal, 1) and (LowRank)MultivariateNormal, both directions.

References are torch's own closed forms on the densified pair (the diagonal side rewritten as a
``MultivariateNormal`` with ``scale_tril = diag_embed(sigma)``), computed in float64 on CPU, and
an mpmath evaluation of the textbook formula at 50 digits for the ill-conditioned cases.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Callable

import mpmath
import pytest
import torch
from torch.distributions import (
    Distribution,
    Independent,
    Laplace,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    kl_divergence,
)
from torch.distributions import kl as torch_kl

import distkl.rules.normal as normal_rules
from distkl.registry import kl_rules
from tests.conftest import F64
from tests.examples import by_family, params

ROWS = by_family("normal")
ROOT = Path(__file__).resolve().parents[1]

R = normal_rules
OUR_PAIRS = {
    (Independent, MultivariateNormal): R._kl_independent_multivariatenormal,
    (MultivariateNormal, Independent): R._kl_multivariatenormal_independent,
    (Independent, LowRankMultivariateNormal): R._kl_independent_lowrankmultivariatenormal,
    (LowRankMultivariateNormal, Independent): R._kl_lowrankmultivariatenormal_independent,
}
TORCH_PAIRS = [
    (Independent, Independent),
    (Normal, Normal),
    (MultivariateNormal, MultivariateNormal),
    (MultivariateNormal, LowRankMultivariateNormal),
    (LowRankMultivariateNormal, MultivariateNormal),
    (LowRankMultivariateNormal, LowRankMultivariateNormal),
]


# ---- helpers -------------------------------------------------------------------------------


def densify(d: Distribution) -> Distribution:
    """The diagonal side as a MultivariateNormal; the others unchanged."""
    if isinstance(d, Independent):
        return MultivariateNormal(d.mean, scale_tril=torch.diag_embed(d.base_dist.scale))
    return d


def full_mvn(d: Distribution) -> MultivariateNormal:
    """Any side as a dense MultivariateNormal (low rank via its covariance matrix)."""
    if isinstance(d, LowRankMultivariateNormal):
        return MultivariateNormal(d.loc, covariance_matrix=d.covariance_matrix)
    return densify(d)  # type: ignore[return-value]


def parts(d: Distribution) -> tuple[str, list[torch.Tensor]]:
    """The family and parameter tensors of ``d`` (unbroadcast where torch keeps them so)."""
    if isinstance(d, Independent):
        return "diag", [d.base_dist.loc, d.base_dist.scale]
    if isinstance(d, MultivariateNormal):
        return "mvn", [d.loc, d._unbroadcasted_scale_tril]
    assert isinstance(d, LowRankMultivariateNormal)
    return "lowrank", [d.loc, d._unbroadcasted_cov_factor, d._unbroadcasted_cov_diag]


def make(kind: str, ts: list[torch.Tensor]) -> Distribution:
    if kind == "diag":
        return Independent(Normal(ts[0], ts[1], validate_args=False), 1)
    if kind == "mvn":
        return MultivariateNormal(ts[0], scale_tril=ts[1], validate_args=False)
    return LowRankMultivariateNormal(ts[0], ts[1], ts[2], validate_args=False)


def reference(p: Distribution, q: Distribution) -> torch.Tensor:
    """torch's own rule on the densified pair, in float64 on CPU."""
    kp, tp = parts(p)
    kq, tq = parts(q)
    p64 = make(kp, [t.detach().to("cpu", torch.float64) for t in tp])
    q64 = make(kq, [t.detach().to("cpu", torch.float64) for t in tq])
    return kl_divergence(densify(p64), densify(q64))


def diag_normal(*batch: int, d: int, g: torch.Generator) -> Independent:
    loc = torch.randn(*batch, d, generator=g, dtype=torch.float64)
    scale = 0.5 + torch.rand(*batch, d, generator=g, dtype=torch.float64)
    return Independent(Normal(loc, scale), 1)


def mvn(*batch: int, d: int, g: torch.Generator) -> MultivariateNormal:
    a = torch.randn(*batch, d, d, generator=g, dtype=torch.float64) / d**0.5
    cov = a @ a.mT + 0.5 * torch.eye(d, dtype=torch.float64)
    return MultivariateNormal(torch.randn(*batch, d, generator=g, dtype=torch.float64), cov)


def lowrank(*batch: int, d: int, g: torch.Generator, rank: int = 2) -> LowRankMultivariateNormal:
    return LowRankMultivariateNormal(
        torch.randn(*batch, d, generator=g, dtype=torch.float64),
        0.5 * torch.randn(*batch, d, rank, generator=g, dtype=torch.float64),
        0.5 + torch.rand(*batch, d, generator=g, dtype=torch.float64),
    )


OTHER: dict[str, Callable[..., Distribution]] = {"mvn": mvn, "lowrank": lowrank}
DIRECTIONS = [
    pytest.param("mvn", False, id="Independent(Normal)-MultivariateNormal"),
    pytest.param("mvn", True, id="MultivariateNormal-Independent(Normal)"),
    pytest.param("lowrank", False, id="Independent(Normal)-LowRankMultivariateNormal"),
    pytest.param("lowrank", True, id="LowRankMultivariateNormal-Independent(Normal)"),
]


def pair(other: str, reverse: bool, a: Distribution, b: Distribution):
    """``(diag, other)`` or ``(other, diag)``."""
    return (b, a) if reverse else (a, b)


def tol(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    return {"rtol": 2e-5, "atol": 1e-5}


# ---- values against torch's closed forms ---------------------------------------------------


@pytest.mark.parametrize("ex", params(ROWS))
def test_matches_torch_dense(ex, device, dtype):
    p, q = ex.build(device, dtype)
    out = kl_divergence(p, q)
    assert out.shape == torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert out.dtype == dtype and out.device.type == device.type
    ref = reference(p, q)
    torch.testing.assert_close(out.cpu().double(), ref, **tol(dtype))


@pytest.mark.parametrize("ex", params(ROWS))
def test_matches_all_mvn_reference(ex):
    """A second reference: both sides as dense MultivariateNormal (torch's MVN-MVN rule)."""
    p, q = ex.build("cpu", torch.float64)
    torch.testing.assert_close(kl_divergence(p, q), kl_divergence(full_mvn(p), full_mvn(q)))


BROADCASTS = [
    ((), ()),
    ((5,), ()),
    ((), (5,)),
    ((2, 1), (3,)),
    ((4, 3), (1, 3)),
    ((2, 1, 1), (3, 1)),
]


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
@pytest.mark.parametrize("bd,bo", BROADCASTS, ids=str)
def test_broadcasting(other, reverse, bd, bo, device):
    g = torch.Generator().manual_seed(7)
    a = diag_normal(*bd, d=4, g=g)
    b = OTHER[other](*bo, d=4, g=g)
    p, q = pair(other, reverse, a, b)
    p, q = make(*parts_to(p, device)), make(*parts_to(q, device))
    out = kl_divergence(p, q)
    assert out.shape == torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    torch.testing.assert_close(out.cpu(), reference(p, q), **tol(torch.float64))


def parts_to(d: Distribution, device: torch.device) -> tuple[str, list[torch.Tensor]]:
    kind, ts = parts(d)
    return kind, [t.to(device) for t in ts]


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
def test_unbroadcast_parameters_and_expand(other, reverse):
    """A q whose covariance is shared by a batch of means, and expanded distributions."""
    g = torch.Generator().manual_seed(8)
    a = diag_normal(2, 1, d=3, g=g)
    if other == "mvn":
        b: Distribution = MultivariateNormal(
            torch.randn(3, 3, generator=g, dtype=torch.float64), scale_tril=mvn(d=3, g=g).scale_tril
        )
    else:
        lr = lowrank(d=3, g=g)
        b = LowRankMultivariateNormal(
            torch.randn(3, 3, generator=g, dtype=torch.float64), lr.cov_factor, lr.cov_diag
        )
    p, q = pair(other, reverse, a, b)
    out = kl_divergence(p, q)
    assert out.shape == (2, 3)
    torch.testing.assert_close(out, reference(p, q))
    pe, qe = p.expand((4, 2, 3)), q.expand((2, 3))
    torch.testing.assert_close(kl_divergence(pe, qe), out.expand(4, 2, 3))


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
def test_larger_dimension_float32(other, reverse):
    """D = 48 in float32 agrees with the float64 reference to float32 accuracy."""
    g = torch.Generator().manual_seed(9)
    a, b = diag_normal(6, d=48, g=g), OTHER[other](d=48, g=g)
    p, q = pair(other, reverse, a, b)
    kp, tp = parts(p)
    kq, tq = parts(q)
    out = kl_divergence(make(kp, [t.float() for t in tp]), make(kq, [t.float() for t in tq]))
    torch.testing.assert_close(out.double(), reference(p, q), rtol=2e-5, atol=1e-4)


# ---- zero at p == q ------------------------------------------------------------------------


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
def test_zero_for_the_same_distribution(other, reverse, device, dtype):
    g = torch.Generator().manual_seed(10)
    a = diag_normal(3, d=5, g=g)
    loc = a.mean.to(device, dtype)
    scale = a.base_dist.scale.to(device, dtype)
    diag = Independent(Normal(loc, scale), 1)
    if other == "mvn":
        same: Distribution = MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))
    else:
        same = LowRankMultivariateNormal(loc, torch.zeros_like(loc).unsqueeze(-1), scale.square())
    p, q = pair(other, reverse, diag, same)
    out = kl_divergence(p, q)
    assert out.shape == (3,)
    limit = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.abs().max().item() <= limit, out


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
def test_nonnegative(other, reverse):
    g = torch.Generator().manual_seed(11)
    for _ in range(5):
        p, q = pair(other, reverse, diag_normal(8, d=6, g=g), OTHER[other](8, d=6, g=g))
        assert (kl_divergence(p, q) >= 0).all()


# ---- ill-conditioned and nearly equal pairs against mpmath -----------------------------------


def mp_kl(p: Distribution, q: Distribution) -> float:
    """The textbook formula at 50 digits (unbatched p and q)."""
    with mpmath.workdps(50):

        def mat(t: torch.Tensor) -> mpmath.matrix:
            return mpmath.matrix(t.tolist())

        m0, m1 = mat(full_mvn(p).loc), mat(full_mvn(q).loc)
        s0 = _mp_cov(p, mat)
        s1 = _mp_cov(q, mat)
        s1_inv = s1**-1
        delta = m1 - m0
        n = s0.rows
        tr = sum((s1_inv * s0)[i, i] for i in range(n))
        maha = (delta.T * s1_inv * delta)[0, 0]
        kl = 0.5 * (tr + maha - n + mpmath.log(mpmath.det(s1)) - mpmath.log(mpmath.det(s0)))
        return float(kl)


def _mp_cov(d: Distribution, mat: Callable[[torch.Tensor], mpmath.matrix]) -> mpmath.matrix:
    """The covariance in exact arithmetic from the parameters (not from float64 products)."""
    if isinstance(d, Independent):
        s = mat(d.base_dist.scale)
        return mpmath.diag([s[i] ** 2 for i in range(s.rows)])
    if isinstance(d, MultivariateNormal):
        L = mat(d.scale_tril)
        return L * L.T
    assert isinstance(d, LowRankMultivariateNormal)
    W, dd = mat(d.cov_factor), mat(d.cov_diag)
    return W * W.T + mpmath.diag([dd[i] for i in range(dd.rows)])


def _nearly_equal(other: str, eps: float):
    """A diagonal p and a q equal to it up to an off-diagonal coupling of size eps."""
    s = torch.tensor([0.7, 1.3, 2.0, 0.4], dtype=torch.float64)
    loc = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)
    p = Independent(Normal(loc, s), 1)
    if other == "mvn":
        L = torch.diag(s) + eps * torch.ones(4, 4, dtype=torch.float64).tril(-1)
        return p, MultivariateNormal(loc + eps, scale_tril=L)
    W = eps * torch.tensor([[1.0], [-1.0], [0.5], [2.0]], dtype=torch.float64)
    return p, LowRankMultivariateNormal(loc + eps, W, s.square())


def _ill_conditioned(other: str):
    """q's covariance with condition number ~1e8: strong factor / tiny diagonal."""
    s = torch.tensor([0.7, 1.3, 2.0, 0.4], dtype=torch.float64)
    p = Independent(Normal(torch.zeros(4, dtype=torch.float64), s), 1)
    if other == "mvn":
        L = torch.tensor(
            [[1.0, 0, 0, 0], [0.999, 1e-4, 0, 0], [0.5, 0.2, 0.3, 0], [2.0, -1.0, 0.5, 1e-3]],
            dtype=torch.float64,
        )
        return p, MultivariateNormal(torch.ones(4, dtype=torch.float64), scale_tril=L)
    W = torch.tensor([[3.0, 0.0], [2.9, 0.1], [1.0, 2.0], [0.5, -1.0]], dtype=torch.float64)
    d = torch.tensor([1e-6, 1e-5, 1e-3, 0.2], dtype=torch.float64)
    return p, LowRankMultivariateNormal(torch.ones(4, dtype=torch.float64), W, d)


def cast(d: Distribution, dtype: torch.dtype) -> Distribution:
    kind, ts = parts(d)
    return make(kind, [t.to(dtype) for t in ts])


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
@pytest.mark.parametrize("which", [0, 1], ids=["eps-moderate", "eps-small"])
def test_nearly_equal_against_mpmath(other, reverse, which, dtype):
    """KL ~ eps^2: the split into non-negative terms keeps the *relative* error at rounding level.

    (torch's dense rules lose up to ~3e-5 relative in float64 and ~1e-2 in float32 here.) The
    exact value is for the parameters as rounded to ``dtype``.
    """
    # KL ~ 1e-11 in float64; ~1e-6 in float32, about as small as float32 parameters resolve
    eps = {torch.float64: (1e-3, 1e-6), torch.float32: (1e-2, 1e-3)}[dtype][which]
    p, q = (cast(d, dtype) for d in pair(other, reverse, *_nearly_equal(other, eps)))
    exact = mp_kl(cast(p, torch.float64), cast(q, torch.float64))
    got = kl_divergence(p, q).item()
    assert 0 < exact < 1e-2
    limit = 1e-12 if dtype == torch.float64 else 2e-6
    assert abs(got - exact) <= limit * exact, (got, exact)


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
def test_ill_conditioned_against_mpmath(other, reverse):
    """cond(Sigma_q) ~ 1e8 (and a KL of 1e14 for the MVN pair)."""
    p, q = pair(other, reverse, *_ill_conditioned(other))
    exact = mp_kl(p, q)
    got = kl_divergence(p, q).item()
    assert abs(got - exact) <= 1e-10 * abs(exact), (got, exact)


# ---- gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("ex", params(ROWS))
def test_gradcheck(ex):
    p, q = ex.build("cpu", torch.float64)
    kp, tp = parts(p)
    kq, tq = parts(q)
    leaves = [t.detach().clone().requires_grad_() for t in tp + tq]
    n = len(tp)

    def fn(*ts: torch.Tensor) -> torch.Tensor:
        return kl_divergence(make(kp, list(ts[:n])), make(kq, list(ts[n:])))

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("ex", params(ROWS))
def test_gradients_match_torch_dense(ex, device, dtype):
    """Gradients w.r.t. every parameter equal those through torch's rule on the dense pair."""
    p, q = ex.build(device, dtype)
    kp, tp = parts(p)
    kq, tq = parts(q)
    ours = [t.detach().clone().requires_grad_() for t in tp + tq]
    ref = [t.detach().cpu().double().requires_grad_() for t in tp + tq]
    n = len(tp)
    kl_divergence(make(kp, ours[:n]), make(kq, ours[n:])).sum().backward()
    kl_divergence(densify(make(kp, ref[:n])), densify(make(kq, ref[n:]))).sum().backward()
    for a, b in zip(ours, ref):
        assert a.grad is not None and b.grad is not None
        assert torch.isfinite(a.grad).all()
        # torch's rules read only the lower triangle of scale_tril; so do ours
        torch.testing.assert_close(a.grad.cpu().double(), b.grad, **tol(dtype))


# ---- errors --------------------------------------------------------------------------------


def _unsupported_independents(d: int) -> list[tuple[str, Independent]]:
    return [
        ("Independent(Laplace, 1)", Independent(Laplace(torch.zeros(d), torch.ones(d)), 1)),
        ("Independent(Normal, 2)", Independent(Normal(torch.zeros(2, d), torch.ones(2, d)), 2)),
        ("Independent(Normal, 0)", Independent(Normal(torch.zeros(d), torch.ones(d)), 0)),
    ]


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
def test_unsupported_independent_raises(other, reverse):
    g = torch.Generator().manual_seed(12)
    b = OTHER[other](d=3, g=g)
    b = make(parts(b)[0], [t.float() for t in parts(b)[1]])
    for name, bad in _unsupported_independents(3):
        p, q = pair(other, reverse, bad, b)
        with pytest.raises(NotImplementedError) as info:
            kl_divergence(p, q)
        msg = str(info.value)
        assert name in msg and "supported: Independent(Normal, 1)" in msg, msg
        assert type(b).__name__ in msg


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
def test_event_shape_mismatch_raises(other, reverse):
    g = torch.Generator().manual_seed(13)
    p, q = pair(other, reverse, diag_normal(2, d=3, g=g), OTHER[other](d=4, g=g))
    with pytest.raises(ValueError, match=re.escape("(3,)")) as info:
        kl_divergence(p, q)
    assert "(4,)" in str(info.value)


@pytest.mark.parametrize("other,reverse", DIRECTIONS)
def test_batch_shape_mismatch_raises(other, reverse):
    g = torch.Generator().manual_seed(14)
    p, q = pair(other, reverse, diag_normal(2, d=3, g=g), OTHER[other](3, d=3, g=g))
    with pytest.raises(ValueError, match="batch shapes must broadcast"):
        kl_divergence(p, q)


# ---- registry and dispatch -----------------------------------------------------------------


def test_registered_pairs_and_kinds():
    for (tp, tq), fn in OUR_PAIRS.items():
        assert torch_kl._KL_REGISTRY[tp, tq] is fn
    ours = {(r.type_p, r.type_q): r for r in kl_rules() if r.module == normal_rules.__name__}
    assert set(ours) == set(OUR_PAIRS)
    assert all(r.kind == "exact" for r in ours.values())


def test_torch_pairs_unchanged():
    """torch's own Normal-family rules are still the functions torch defines."""
    for tp, tq in TORCH_PAIRS:
        own = getattr(torch_kl, f"_kl_{tp.__name__.lower()}_{tq.__name__.lower()}")
        assert torch_kl._KL_REGISTRY[tp, tq] is own, (tp, tq)


def test_dispatch_through_subclasses_without_ambiguity_warning():
    class MyIndependent(Independent):
        pass

    class MyMVN(MultivariateNormal):
        pass

    p = MyIndependent(Normal(torch.zeros(2, 3), torch.ones(2, 3)), 1)
    q = MyMVN(torch.zeros(3), torch.eye(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(kl_divergence(p, q), torch.zeros(2))
        torch.testing.assert_close(kl_divergence(q, p), torch.zeros(2))


# ---- the user guide page -------------------------------------------------------------------


# ---- issue 11.7: a factor row that dominates its diagonal -------------------------------------


def test_dominant_lowrank_row_is_finite_and_exact(dtype):
    """KL(N(0, 1) || LowRank(0, [[1e4]], 1)) = (1/(1 + 1e8) - 1 + log(1 + 1e8)) / 2 = 8.7103.

    ``x = w~' C^-1 w~`` rounded to 1 in float32 and ``log1p(-x)`` gave NaN; torch's LowRank-LowRank
    rule gives 8.7103 on the same pair.
    """
    w = torch.tensor([[1e4]], dtype=dtype, requires_grad=True)
    q = LowRankMultivariateNormal(torch.zeros(1, dtype=dtype), w, torch.ones(1, dtype=dtype))
    p = Independent(Normal(torch.zeros(1, dtype=dtype), torch.ones(1, dtype=dtype)), 1)
    value = kl_divergence(p, q)
    truth = 0.5 * (1.0 / (1.0 + 1e8) - 1.0 + mpmath.log(1 + mpmath.mpf(10) ** 8))
    assert abs(value.item() - float(truth)) <= 1e-6 * float(truth), value
    (grad,) = torch.autograd.grad(value, w)
    assert torch.isfinite(grad).all()
    # d/dw of the closed form (1/(1 + w^2) - 1 + log(1 + w^2)) / 2 = w^3 / (1 + w^2)^2.
    ww = 1e4
    torch.testing.assert_close(grad.double().item(), ww**3 / (1 + ww**2) ** 2, rtol=1e-4, atol=0)


def test_dominant_lowrank_row_in_a_larger_factor():
    """D = 5, r = 2, one row scaled by 1e6 (float64, cond(C) ~ 1e12) against mpmath at 50 digits.

    The capacitance's conditioning limits every Woodbury-based rule here: ours must be finite
    and no less accurate than torch's own LowRank-LowRank rule on the same pair (2.6e-5 nats off).
    """
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 2, generator=g, dtype=F64)
    W[2] *= 1e6
    q = LowRankMultivariateNormal(
        torch.randn(5, generator=g, dtype=F64), W, torch.rand(5, generator=g, dtype=F64) + 0.5
    )
    p = Independent(
        Normal(torch.randn(5, generator=g, dtype=F64), torch.rand(5, generator=g, dtype=F64) + 0.5),
        1,
    )
    got = kl_divergence(p, q).item()
    exact = mp_kl(p, q)
    as_lowrank = LowRankMultivariateNormal(p.mean, torch.zeros(5, 1, dtype=F64), p.variance)
    torch_error = abs(kl_divergence(as_lowrank, q).item() - exact)
    assert abs(got - exact) <= min(torch_error, 1e-5 * exact), (got, exact, torch_error)
