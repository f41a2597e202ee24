"""The standing adversarial campaign (issue 11): properties every row of the example table has.

Every property runs on every row of ``tests.examples.TABLE`` (``distkl.examples.EXAMPLES`` plus
the test-only infinite, edge and adversarial rows), through every entry point that accepts the
pair: ``kl_divergence`` (the registered rule, under the method in force), ``kl_mc``,
``js_divergence``, ``jsd_mc`` and ``bounded_kl``. A new row gets all of them for free.

Properties:

1. ``KL >= 0``: exact values exactly, estimates at most ``Z`` standard errors below 0.
2. ``KL(p, p') = 0`` and ``JS(p, p') = 0`` for ``p'`` an equal copy of ``p`` built afresh (new
   objects, new tensors, another memory layout), so the ``p is q`` shortcuts are not what is tested.
3. ``JS_a(p, q) = JS_{1-a}(q, p)`` and ``0 <= JS_a <= H(a)`` (binary entropy of the skew).
4. A batch of pairs gives what each pair gives alone (exact values to rounding, estimates by
   z-score).
5. Finite gradients wherever the value is finite (float64).
6. NaN in, NaN out: a NaN parameter (validation off) gives NaN where it reaches, never a number.
7. An empty batch gives an empty result of the right shape.
8. Estimates lie within ``Z`` standard errors of a reference (the exact rule, quadrature, or a
   large-sample estimate), and their 95% intervals cover it at the stated rate over seeds.
9. Under random elementwise jitter of a row's parameters (hypothesis), 1-3 still hold.

Known failures are strict xfails naming the issue item and the owner (``KNOWN`` below), so they
turn into failures (and get removed) when the fix lands.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable, Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.distributions import (
    Categorical,
    Distribution,
    MixtureSameFamily,
    OneHotCategorical,
    kl_divergence,
)

import distkl
from distkl._reverse import reverse_applies
from distkl.montecarlo import kl_mc_value
from tests.conftest import Z
from tests.examples import TABLE, Example, broadcast, copy_of, element, rebuild

#: Samples per Monte Carlo estimate in the cheap properties, and in the reference/coverage ones.
N_SMALL = 256
N_REF = 1024
#: Seeds (batched as a leading batch dimension) for the coverage of the 95% interval.
COVERAGE_SEEDS = 64
#: Quadrature accuracy the docs promise (1e-8), with room for float64 rounding of the terms.
QUAD_TOL = 1e-7

# ---------------------------------------------------------------------------------------------
# What the table's rows are.

_CATEGORICAL = (Categorical, OneHotCategorical)


def is_categorical(d: Distribution) -> bool:
    if isinstance(d, MixtureSameFamily):
        return isinstance(d.component_distribution, _CATEGORICAL)
    return isinstance(d, _CATEGORICAL)


def is_gaussian_mixture(d: Distribution) -> bool:
    return isinstance(d, MixtureSameFamily) and not is_categorical(d)


def kl_is_exact(p: Distribution, q: Distribution) -> bool:
    """A closed-form KL (distkl's or torch's) rather than an estimate by the method in force."""
    return not (is_gaussian_mixture(p) or is_gaussian_mixture(q))


def kl_is_mc(p: Distribution, q: Distribution) -> bool:
    """The registered rule estimates by Monte Carlo under ``method="auto"`` (multivariate event)."""
    return not kl_is_exact(p, q) and len(p.event_shape) > 0


def jsd_is_exact(p: Distribution, q: Distribution) -> bool:
    return is_categorical(p) and is_categorical(q)


def jsd_is_mc(p: Distribution, q: Distribution) -> bool:
    return not jsd_is_exact(p, q) and len(p.event_shape) > 0


def binary_entropy(a: float) -> float:
    return -a * math.log(a) - (1.0 - a) * math.log1p(-a)


def batch_of(p: Distribution, q: Distribution) -> torch.Size:
    return torch.broadcast_shapes(p.batch_shape, q.batch_shape)


def tol(dtype: torch.dtype) -> float:
    """Rounding allowance for exact values (and quadrature) in ``dtype``."""
    return 1e-4 if dtype == torch.float32 else QUAD_TOL


# ---------------------------------------------------------------------------------------------
# Entry points. Each returns (value, stderr); stderr is 0 for deterministic values. A rule that
# estimates by Monte Carlo is ``kl_mc`` / ``jsd_mc`` with the options' settings
# (``test_rule_under_mc_is_the_estimator``), so the statistical properties check the estimators
# and use the rules only where they are deterministic.

Op = Callable[..., tuple[Tensor, Tensor]]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextmanager
def seeded(seed: int, n: int, method: str = "auto") -> Iterator[None]:
    with distkl.options(method=method, num_samples=n, generator=_gen(seed)):
        yield


def op_kl(p: Distribution, q: Distribution, seed: int, n: int) -> tuple[Tensor, Tensor]:
    with seeded(seed, n):
        value = kl_divergence(p, q)
    return value, torch.zeros_like(value)


def op_kl_mc(p: Distribution, q: Distribution, seed: int, n: int) -> tuple[Tensor, Tensor]:
    est = distkl.kl_mc(p, q, num_samples=n, generator=_gen(seed))
    return est.value, est.stderr


def op_jsd(
    p: Distribution, q: Distribution, seed: int, n: int, skew: float = 0.5
) -> tuple[Tensor, Tensor]:
    with seeded(seed, n):
        value = distkl.js_divergence(p, q, skew=skew)
    return value, torch.zeros_like(value)


def op_jsd_mc(
    p: Distribution, q: Distribution, seed: int, n: int, skew: float = 0.5
) -> tuple[Tensor, Tensor]:
    est = distkl.jsd_mc(p, q, skew=skew, num_samples=n, generator=_gen(seed))
    return est.value, est.stderr


def op_bounded_kl(p: Distribution, q: Distribution, seed: int, n: int) -> tuple[Tensor, Tensor]:
    with seeded(seed, n):
        value = distkl.bounded_kl(p, q, bound=2.0)
    return value, torch.zeros_like(value)


OPS: dict[str, Op] = {
    "kl": op_kl,
    "kl_mc": op_kl_mc,
    "jsd": op_jsd,
    "jsd_mc": op_jsd_mc,
    "bounded_kl": op_bounded_kl,
}
MC_OPS = ("kl_mc", "jsd_mc")
JSD_OPS = ("jsd", "jsd_mc")


def deterministic(op: str, p: Distribution, q: Distribution) -> bool:
    """The op's value has no sampling noise for this pair (exact rule or quadrature)."""
    if op in MC_OPS:
        return False
    return not (jsd_is_mc(p, q) if op == "jsd" else kl_is_mc(p, q))


def applies(op: str, p: Distribution, q: Distribution) -> bool:
    """Monte Carlo scores each side's samples under the other, so the event shapes must agree
    (a Categorical against a OneHotCategorical has the exact rule only)."""
    return op not in MC_OPS or p.event_shape == q.event_shape


def with_stderr(op: str, p: Distribution, q: Distribution) -> bool:
    """Ops whose value comes with an honest error: deterministic ones, and the estimators."""
    return applies(op, p, q) and (op in MC_OPS or deterministic(op, p, q))


# ---------------------------------------------------------------------------------------------
# Parametrization: one test per (property, row) running every variant (op, dtype) that applies;
# a variant known to fail is split out as its own strict xfail, naming the issue item and owner.
# When the fix lands the xfail turns into a failure: delete its KNOWN entry.

F32, F64 = torch.float32, torch.float64
DT_NAME = {F32: "float32", F64: "float64"}
Variant = tuple[str, torch.dtype]

#: (property, row id, op) or (property, row id, op, dtype name) -> reason.
KNOWN: dict[tuple[str, ...], str] = {}


def _xfail(reason: str, block: str) -> None:
    """Add ``KNOWN`` entries: one ``property row-id op [dtype]`` per line of ``block``."""
    for line in block.strip().splitlines():
        KNOWN[tuple(line.split())] = reason


EMPTY_TORCH = (
    "torch's own KL rule for this pair crashes on an empty batch (torch, not distkl: distkl "
    "never changes what torch answers)"
)
TORCH_LR32 = (
    "torch's LowRank-LowRank rule gives KL(p, copy of p) = -0.5 in float32 for a factor of 1e4 "
    "(cancellation; torch's answer), and bounded_kl passes the negative value through"
)

# ruff: noqa: E501  (the generated table below names long row ids)
# ---- known failures (generated from a run) ----
_xfail(
    TORCH_LR32,
    """
copy_is_zero Independent(Normal)-LowRankMultivariateNormal:dominant-factor kl float32
copy_is_zero Independent(Normal)-LowRankMultivariateNormal:dominant-factor bounded_kl float32
""",
)
_xfail(
    EMPTY_TORCH,
    """
empty_batch Independent(Normal)-Independent(Normal) kl float64
empty_batch Independent(Normal)-Independent(Normal) bounded_kl float64
empty_batch MultivariateNormal-MultivariateNormal kl float64
empty_batch MultivariateNormal-MultivariateNormal bounded_kl float64
empty_batch MultivariateNormal-LowRankMultivariateNormal kl float64
empty_batch MultivariateNormal-LowRankMultivariateNormal bounded_kl float64
empty_batch LowRankMultivariateNormal-MultivariateNormal kl float64
empty_batch LowRankMultivariateNormal-MultivariateNormal bounded_kl float64
empty_batch LowRankMultivariateNormal-LowRankMultivariateNormal kl float64
empty_batch LowRankMultivariateNormal-LowRankMultivariateNormal bounded_kl float64
""",
)
# ---- end of known failures ----


@functools.cache
def _built(row_id: str) -> tuple[Distribution, Distribution]:
    return next(e for e in TABLE if e.id == row_id).build("cpu", F64)


def _known(prop: str, ex: Example, v: Variant) -> Optional[str]:
    op, dt = v
    return KNOWN.get((prop, ex.id, op, DT_NAME[dt])) or KNOWN.get((prop, ex.id, op))


def cases(
    prop: str,
    select: Callable[[str, Distribution, Distribution], bool] = applies,
    ops: tuple[str, ...] = tuple(OPS),
    dtypes: tuple[torch.dtype, ...] = (F64,),
) -> list:
    """``pytest.param(ex, variants)`` per row: the passing variants together, each known failure
    alone with its strict xfail."""
    out = []
    for e in TABLE:
        p, q = _built(e.id)
        variants = [(o, dt) for o in ops if select(o, p, q) for dt in dtypes]
        good = [v for v in variants if not _known(prop, e, v)]
        if good:
            out.append(pytest.param(e, good, id=e.id))
        for v in variants:
            reason = _known(prop, e, v)
            if reason:
                mark = pytest.mark.xfail(strict=True, reason=reason)
                out.append(pytest.param(e, [v], id=f"{e.id}-{v[0]}-{DT_NAME[v[1]]}", marks=mark))
    return out


# ---------------------------------------------------------------------------------------------
# 1. KL >= 0 (JSD and bounded KL too).


@pytest.mark.parametrize("ex, variants", cases("nonnegative", with_stderr, dtypes=(F32, F64)))
def test_nonnegative(ex: Example, variants: list[Variant], device: torch.device) -> None:
    for op, dtype in variants:
        p, q = ex.build(device, dtype)
        value, se = OPS[op](p, q, 1, N_SMALL)
        where = f"{ex.id} {op} {DT_NAME[dtype]}"
        assert value.shape == batch_of(p, q), where
        assert not value.isnan().any(), f"{where}: NaN for a valid pair: {value}"
        assert (value >= -Z * se).all(), f"{where}: {value} below 0 by more than Z * {se}"


# ---------------------------------------------------------------------------------------------
# 2. Divergence from an equal copy is 0.


@pytest.mark.parametrize("ex, variants", cases("copy_is_zero", dtypes=(F32, F64)))
def test_divergence_from_a_copy_is_zero(
    ex: Example, variants: list[Variant], device: torch.device
) -> None:
    for op, dtype in variants:
        for d in ex.build(device, dtype):  # both sides of the row
            twin = copy_of(d, new_layout=True)
            if not with_stderr(op, d, twin):
                continue
            value, se = OPS[op](d, twin, 2, N_SMALL)
            assert value.shape == d.batch_shape
            limit = tol(dtype) + Z * se
            where = f"{ex.id} {op} {DT_NAME[dtype]}: {op}({type(d).__name__}, its copy)"
            assert (value.abs() <= limit).all(), f"{where} = {value}, limit {limit}"


# ---------------------------------------------------------------------------------------------
# 3. JSD: symmetric under swapping p, q and the skew; within [0, H(skew)].

SKEWS = st.one_of(
    st.sampled_from([0.5, 1e-3]),
    st.floats(min_value=1e-6, max_value=1.0 - 1e-6, allow_nan=False),
)


@pytest.mark.parametrize(
    "ex, variants", cases("jsd_symmetric", with_stderr, JSD_OPS, dtypes=(F32, F64))
)
def test_jsd_symmetric_and_in_range(
    ex: Example, variants: list[Variant], device: torch.device
) -> None:
    built = {dt: ex.build(device, dt) for _, dt in variants}

    @settings(max_examples=3, deadline=None, derandomize=True, database=None)
    @given(skew=SKEWS)
    def check(skew: float) -> None:
        upper = binary_entropy(skew)
        for op, dtype in variants:
            p, q = built[dtype]
            a, se_a = OPS[op](p, q, 3, N_SMALL, skew=skew)
            b, se_b = OPS[op](q, p, 4, N_SMALL, skew=1.0 - skew)
            where = f"{ex.id} {op} {DT_NAME[dtype]} skew={skew}"
            for v in (a, b):
                assert v.shape == batch_of(p, q), where
                assert ((v >= 0) & (v <= upper)).all(), f"{where}: {v} not in [0, {upper}]"
            limit = tol(dtype) + Z * (se_a.square() + se_b.square()).sqrt()
            assert ((a - b).abs() <= limit).all(), f"{where}: {a} vs swapped {b}"

    check()


@pytest.mark.parametrize("ex, variants", cases("jsd_tiny_skew", ops=JSD_OPS))
def test_jsd_tiny_skew(ex: Example, variants: list[Variant]) -> None:
    """A skew of 1e-17 is valid (issue 11 item 9): a value in [0, H(skew)], no crash."""
    skew = 1e-17
    for op, dtype in variants:
        p, q = ex.build("cpu", dtype)
        v, _ = OPS[op](p, q, 5, N_SMALL, skew=skew)
        assert ((v >= 0) & (v <= binary_entropy(skew))).all(), f"{ex.id} {op}: {v}"


@pytest.mark.parametrize(
    "ex",
    [
        pytest.param(e, id=e.id)
        for e in TABLE
        if kl_is_mc(*_built(e.id)) or not jsd_is_exact(*_built(e.id))
    ],
)
def test_rule_under_mc_is_the_estimator(ex: Example) -> None:
    """Under ``method="mc"`` the estimate rules return ``kl_mc`` / ``jsd_mc`` with the options'
    samples and generator: the estimators' properties below are the rules' properties. A
    diagonal mixture against one Gaussian returns ``kl_mc_value`` instead (the value-only
    estimator with the cross term exact, `tests/test_reverse.py`)."""
    p, q = ex.build("cpu", F64)
    if not kl_is_exact(p, q):
        with seeded(11, N_SMALL, method="mc"):
            rule = kl_divergence(p, q)
        if reverse_applies(p, q, N_SMALL):
            expected = kl_mc_value(p, q, num_samples=N_SMALL, generator=_gen(11))
        else:
            expected = op_kl_mc(p, q, 11, N_SMALL)[0]
        assert torch.equal(rule, expected)
    if not jsd_is_exact(p, q):
        with seeded(12, N_SMALL, method="mc"):
            rule = distkl.js_divergence(p, q)
        assert torch.equal(rule, op_jsd_mc(p, q, 12, N_SMALL)[0])


# ---------------------------------------------------------------------------------------------
# 4. A batch of pairs == each pair alone.


def _indices(shape: torch.Size) -> list[tuple[int, ...]]:
    """First, middle and last element of a batch."""
    n = shape.numel()
    flat = sorted({0, n // 2, n - 1}) if n else []
    return [tuple(int(i) for i in torch.unravel_index(torch.tensor(f), shape)) for f in flat]


@pytest.mark.parametrize(
    "ex, variants", cases("batch_equals_alone", with_stderr, dtypes=(F32, F64))
)
def test_batch_equals_each_pair_alone(
    ex: Example, variants: list[Variant], device: torch.device
) -> None:
    for op, dtype in variants:
        p, q = ex.build(device, dtype)
        batch = batch_of(p, q)
        whole, se = OPS[op](p, q, 6, N_SMALL)
        for idx in _indices(batch):
            alone, se_alone = OPS[op](element(p, batch, idx), element(q, batch, idx), 7, N_SMALL)
            assert alone.shape == ()
            w = whole[idx]
            where = f"{ex.id} {op} {DT_NAME[dtype]} element {idx}: batch {w} vs alone {alone}"
            if torch.isinf(w) or torch.isinf(alone):
                assert w == alone, where
            else:
                spread = (se[idx].square() + se_alone.square()).sqrt()
                limit = tol(dtype) * (1 + w.abs()) + Z * spread
                assert (w - alone).abs() <= limit, where


# ---------------------------------------------------------------------------------------------
# 5. Finite gradients where the value is finite (float64).


def _with_grad(d: Distribution, leaves: list[Tensor]) -> Distribution:
    def leaf(t: Tensor) -> Tensor:
        x = t.detach().clone().requires_grad_(True)
        leaves.append(x)
        return x

    return rebuild(d, leaf)


@pytest.mark.parametrize("ex, variants", cases("finite_gradients"))
def test_finite_gradients(ex: Example, variants: list[Variant], device: torch.device) -> None:
    for op, dtype in variants:
        p0, q0 = ex.build(device, dtype)
        leaves: list[Tensor] = []
        p, q = _with_grad(p0, leaves), _with_grad(q0, leaves)
        value, _ = OPS[op](p, q, 8, N_SMALL)
        finite = torch.isfinite(value)
        if not finite.any():  # +inf everywhere (the infinite rows): nothing to differentiate
            assert (value == math.inf).all(), f"{ex.id} {op}: {value}"
            continue
        grads = torch.autograd.grad(value[finite].sum(), leaves, allow_unused=True)
        assert any(g is not None for g in grads), f"{ex.id} {op}: no gradient reaches a parameter"
        for x, g in zip(leaves, grads):
            if g is not None:
                assert torch.isfinite(g).all(), f"{ex.id} {op}: gradient {g} for parameter {x}"


# ---------------------------------------------------------------------------------------------
# 6. NaN in -> NaN out (validation off): every parameter tensor of either side, in turn.


@pytest.fixture
def no_validation() -> Iterator[None]:
    before = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    yield
    Distribution.set_default_validate_args(before)


def _num_parameters(d: Distribution) -> int:
    count = [0]

    def tally(t: Tensor) -> Tensor:
        count[0] += 1
        return t

    rebuild(d, tally)
    return count[0]


def _poisoned(d: Distribution, which: int) -> Distribution:
    """``d`` with the first entry of its ``which``-th parameter tensor set to NaN."""
    seen = [0]

    def poison(t: Tensor) -> Tensor:
        t = t.detach().clone(memory_format=torch.contiguous_format)
        if seen[0] == which:
            t.view(-1)[0] = math.nan
        seen[0] += 1
        return t

    return rebuild(d, poison, validate_args=False)


def _reached(d: Distribution, batch: torch.Size) -> Tensor:
    """The elements of ``batch`` that batch element 0 of ``d`` reaches once broadcast."""
    first = torch.zeros(d.batch_shape, dtype=torch.bool)
    first.view(-1)[0] = True
    return first.expand(batch)


@pytest.mark.parametrize("ex, variants", cases("nan_in_nan_out"))
def test_nan_in_nan_out(ex: Example, variants: list[Variant], no_validation: None) -> None:
    """A NaN parameter gives NaN wherever it reaches, or a loud error; never a number."""
    for op, dtype in variants:
        p, q = ex.build("cpu", dtype)
        batch = batch_of(p, q)
        for side in "pq":
            d = p if side == "p" else q
            for which in range(_num_parameters(d)):
                try:
                    bad = _poisoned(d, which)
                except RuntimeError:  # torch's constructor factorises it (LowRank): refused there
                    continue
                try:
                    value, _ = OPS[op](*((bad, q) if side == "p" else (p, bad)), 9, 64)
                except (RuntimeError, ValueError):  # loud (e.g. torch's sampler on NaN probs)
                    continue
                assert value.shape == batch
                reached = _reached(d, batch)
                where = f"{ex.id} {op}: NaN in parameter {which} of {side}"
                assert value[reached].isnan().all(), f"{where} gave {value} (reached: {reached})"


# ---------------------------------------------------------------------------------------------
# 7. Empty batch -> empty result of the right shape.


@pytest.mark.parametrize("ex, variants", cases("empty_batch"))
def test_empty_batch(
    ex: Example, variants: list[Variant], device: torch.device, no_validation: None
) -> None:
    for op, dtype in variants:
        p, q = ex.build(device, dtype)
        empty = torch.Size((0, *batch_of(p, q)))
        # torch's own argument validation cannot check an empty batch (a reshape with -1).
        pe = broadcast(p, empty, validate_args=False)
        qe = broadcast(q, empty, validate_args=False)
        value, se = OPS[op](pe, qe, 10, N_SMALL)
        assert value.shape == se.shape == empty, f"{ex.id} {op}: shape {value.shape}"
        assert value.dtype == dtype and value.device.type == device.type


def _mixture_cases(prop: str) -> list:
    return [pytest.param(e, id=e.id) for e in TABLE if any(map(is_gaussian_mixture, _built(e.id)))]


@pytest.mark.parametrize("ex", _mixture_cases("mixture_log_prob"))
def test_mixture_log_prob_matches_torch(
    ex: Example, device: torch.device, dtype: torch.dtype
) -> None:
    for m in filter(is_gaussian_mixture, ex.build(device, dtype)):
        x = m.sample((5,))
        torch.testing.assert_close(distkl.mixture_log_prob(m, x), m.log_prob(x))


EMPTY_DENSITY = (
    "issue 11 item 8: mixture_log_prob of 0 sample rows raises torch.cat(); owner mcengine"
)


@pytest.mark.parametrize("ex", _mixture_cases("mixture_log_prob"))
def test_mixture_log_prob_of_no_samples(ex: Example) -> None:
    for m in filter(is_gaussian_mixture, ex.build("cpu", F64)):
        x = m.sample((5,))
        assert distkl.mixture_log_prob(m, x[:0]).shape == (0, *m.batch_shape)


# ---------------------------------------------------------------------------------------------
# 8. Estimates agree with a reference; their 95% intervals cover it.


@functools.cache
def reference(op: str, row_id: str) -> tuple[Tensor, Tensor]:
    """The truth for ``op``'s estimator on a row (float64): the exact rule, quadrature (1-D
    events), or else the same estimator with 16 times the samples (with its standard error)."""
    p, q = _built(row_id)
    kl = op == "kl_mc"
    exact = kl_is_exact(p, q) if kl else jsd_is_exact(p, q)
    if exact or len(p.event_shape) == 0:
        with distkl.options(method="auto" if exact else "quadrature"):
            value = kl_divergence(p, q) if kl else distkl.js_divergence(p, q)
        return value, torch.zeros_like(value)
    return OPS[op](p, q, 99, 16 * N_REF)


@pytest.mark.parametrize("ex, variants", cases("estimate_near_reference", ops=MC_OPS))
def test_estimate_within_z_stderr_of_reference(ex: Example, variants: list[Variant]) -> None:
    for op, dtype in variants:
        p, q = ex.build("cpu", dtype)
        ref, se_ref = reference(op, ex.id)
        est, se = OPS[op](p, q, 13, N_REF)
        where = f"{ex.id} {op}: estimate {est} +- {se}, reference {ref} +- {se_ref}"
        infinite = torch.isinf(ref)
        assert (est[infinite] == ref[infinite]).all(), where
        err = (est - ref)[~infinite].abs()
        limit = Z * (se.square() + se_ref.square())[~infinite].sqrt() + QUAD_TOL
        assert (err <= limit).all(), where


@pytest.mark.parametrize("ex, variants", cases("interval_coverage", ops=MC_OPS))
def test_interval_coverage(ex: Example, variants: list[Variant]) -> None:
    """Over COVERAGE_SEEDS independent estimates per batch element (a leading batch dimension),
    the 95% interval covers the reference at a rate consistent with 0.95."""
    for op, dtype in variants:
        p, q = ex.build("cpu", dtype)
        batch = batch_of(p, q)
        ref, se_ref = reference(op, ex.id)
        shape = torch.Size((COVERAGE_SEEDS, *batch))
        est, se = OPS[op](broadcast(p, shape), broadcast(q, shape), 14, N_SMALL)
        finite = torch.isfinite(ref).expand(shape)
        z = ((est - ref) / (se.square() + se_ref.square()).sqrt())[finite]
        covered = ((est - ref)[finite] == 0) | (z.abs() <= 1.959964)
        n = covered.numel()
        if n == 0:
            continue
        rate = covered.double().mean().item()
        floor = 0.95 - Z * math.sqrt(0.95 * 0.05 / n)
        assert rate >= floor, f"{ex.id} {op}: 95% interval covers {rate:.3f} of {n} (< {floor:.3f})"


# ---------------------------------------------------------------------------------------------
# 9. Random elementwise jitter of a row's parameters (hypothesis): properties 1-3 still hold.


def _jittered(d: Distribution, seed: int, strength: float) -> Distribution:
    g = torch.Generator().manual_seed(seed)

    def jitter(t: Tensor) -> Tensor:
        noise = torch.randn(t.shape, generator=g, dtype=F64).to(t.dtype)
        return t * (strength * noise).exp()  # keeps signs, zeros, -inf logits, positivity

    return rebuild(d, jitter)


@pytest.mark.parametrize("ex, variants", cases("jittered_rows", with_stderr))
def test_jittered_rows(ex: Example, variants: list[Variant]) -> None:
    p0, q0 = ex.build("cpu", F64)

    @settings(max_examples=3, deadline=None, derandomize=True, database=None)
    @given(seed=st.integers(0, 2**31 - 1), strength=st.floats(0.0, 2.0))
    def check(seed: int, strength: float) -> None:
        p, q = _jittered(p0, seed, strength), _jittered(q0, seed + 1, strength)
        for op, _ in variants:
            value, se = OPS[op](p, q, 15, N_SMALL)
            where = f"{ex.id} {op} jitter(seed={seed}, strength={strength})"
            assert not value.isnan().any(), f"{where}: NaN {value}"
            assert (value >= -Z * se).all(), f"{where}: {value} below 0"
            if op in JSD_OPS:
                assert (value <= math.log(2.0)).all(), f"{where}: {value} above log 2"
            twin = copy_of(p, new_layout=True)
            if with_stderr(op, p, twin):
                same, se_same = OPS[op](p, twin, 16, N_SMALL)
                assert (same.abs() <= QUAD_TOL + Z * se_same).all(), f"{where}: vs copy {same}"

    check()
