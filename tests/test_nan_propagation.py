"""NaN in, NaN out for Gaussian mixtures, through every method (issue 11 item 2), per batch element.

``tests/test_properties.py`` poisons the first entry of each parameter of its rows; here a batch
of three pairs gets a NaN in the middle element only, in the mixture weights (logits or probs),
the component parameters, or the single Normal-family side, and every entry point on Gaussian
families must give NaN in that element (value and standard error) while the other two keep the
values they have without the NaN. Element 0 holds a component of weight exactly 0 (probs 0 or
logit ``-inf``): a legitimate zero weight, which must keep a finite, correct value.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import pytest
import torch
from torch import Tensor
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

import distkl
from distkl._gaussian import allocation_log_weights
from distkl.montecarlo._strata import IntervalStrata, allocate
from tests.conftest import Z
from tests.examples import rebuild

F64 = torch.float64
B, K, D = 3, 3, 2
#: The batch element that gets the NaN; the others must not notice it.
BAD = 1
GOOD = [0, 2]
N = 256
#: Quadrature accuracy the docs promise (1e-8), with room for float64 rounding of the terms.
QUAD_TOL = 1e-7
#: Rounding allowance for the same in float32 (as `tests/test_properties.py`'s `tol`).
F32_TOL = 1e-4
#: The same computation on the other elements of the batch: equal up to rounding (a few ulps:
#: torch's vectorised reductions may round a batch differently once it holds a NaN).
SAME = {torch.float64: dict(rtol=1e-9, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-6)}


# ---- the pairs -------------------------------------------------------------------------------


class _Maker:
    """Random, well-conditioned parameters on one device (a fixed seed per pair)."""

    def __init__(self, device: torch.device, dtype: torch.dtype, seed: int) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.device, self.dtype = device, dtype

    def _to(self, t: Tensor) -> Tensor:
        return t.to(self.device, self.dtype)

    def normal(self, *shape: int) -> Tensor:
        return self._to(torch.randn(*shape, generator=self.g, dtype=F64))

    def positive(self, *shape: int) -> Tensor:
        return self._to(torch.rand(*shape, generator=self.g, dtype=F64) + 0.5)

    def spd(self, *batch: int) -> Tensor:
        a = torch.randn(*batch, D, D, generator=self.g, dtype=F64) / D**0.5
        return self._to(a @ a.transpose(-1, -2) + torch.eye(D, dtype=F64))

    def weights(self, from_probs: bool) -> Categorical:
        """Mixture weights with component K-1 of element 0 at weight exactly 0."""
        if from_probs:
            w = self.positive(B, K)
            w[0, -1] = 0.0
            return Categorical(probs=w / w.sum(-1, keepdim=True))
        logits = self.normal(B, K)
        logits[0, -1] = -math.inf
        return Categorical(logits=logits)


FAMILIES: dict[str, Callable[[_Maker], Distribution]] = {
    "Normal": lambda m: Normal(m.normal(B), m.positive(B)),
    "Mix(Normal)": lambda m: MixtureSameFamily(
        m.weights(True), Normal(m.normal(B, K), m.positive(B, K))
    ),
    "Mix(Normal):logits": lambda m: MixtureSameFamily(
        m.weights(False), Normal(m.normal(B, K), m.positive(B, K))
    ),
    "Independent(Normal)": lambda m: Independent(Normal(m.normal(B, D), m.positive(B, D)), 1),
    "MultivariateNormal": lambda m: MultivariateNormal(m.normal(B, D), m.spd(B)),
    "LowRank": lambda m: LowRankMultivariateNormal(
        m.normal(B, D), 0.5 * m.normal(B, D, 2), m.positive(B, D)
    ),
    "Mix(Independent(Normal))": lambda m: MixtureSameFamily(
        m.weights(True), Independent(Normal(m.normal(B, K, D), m.positive(B, K, D)), 1)
    ),
    "Mix(MultivariateNormal):logits": lambda m: MixtureSameFamily(
        m.weights(False), MultivariateNormal(m.normal(B, K, D), m.spd(B, K))
    ),
    "Mix(LowRank)": lambda m: MixtureSameFamily(
        m.weights(True),
        LowRankMultivariateNormal(
            m.normal(B, K, D), 0.5 * m.normal(B, K, D, 2), m.positive(B, K, D)
        ),
    ),
}

#: (p, q): scalar events (quadrature under "auto") and multivariate ones (Monte Carlo).
PAIRS_1D = [
    ("Normal", "Mix(Normal)"),
    ("Mix(Normal)", "Normal"),
    ("Mix(Normal)", "Mix(Normal):logits"),
    ("Mix(Normal):logits", "Mix(Normal)"),
]
PAIRS_ND = [
    ("Mix(Independent(Normal))", "MultivariateNormal"),
    ("Mix(MultivariateNormal):logits", "LowRank"),
    ("Mix(Independent(Normal))", "Mix(LowRank)"),
    ("Independent(Normal)", "Mix(Independent(Normal))"),
    ("LowRank", "Mix(MultivariateNormal):logits"),
]
PAIRS = PAIRS_1D + PAIRS_ND


def build(
    pair: tuple[str, str], device: torch.device, dtype: torch.dtype = F64
) -> tuple[Distribution, Distribution]:
    m = _Maker(device, dtype, seed=sum(map(ord, "-".join(pair))))
    return FAMILIES[pair[0]](m), FAMILIES[pair[1]](m)


def single_gaussian_p(p: Distribution) -> bool:
    """kl_mc takes `distkl._pathwise` for one Normal-family p (its fit pools the batch)."""
    return not isinstance(p, MixtureSameFamily)


# ---- the entry points ------------------------------------------------------------------------

#: One entry point's answer: (value, stderr or None, whether the value is deterministic).
Result = tuple[Tensor, Optional[Tensor], bool]


def _gen(device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(5)


def _under(method: str, f: Callable[[], Tensor], device: torch.device) -> Tensor:
    with distkl.options(method=method, num_samples=N, generator=_gen(device)):
        return f()


def entry_points(p: Distribution, q: Distribution, device: torch.device) -> dict[str, Result]:
    """Every Gaussian-family entry point that takes the pair, computed."""
    scalar = len(p.event_shape) == 0
    out: dict[str, Result] = {}
    methods = ["mc", "variational", "unscented"] + (["quadrature"] if scalar else [])
    for method in methods:
        value = _under(method, lambda: kl_divergence(p, q), device)
        out[f"kl[{method}]"] = (value, None, method != "mc")
        if method in ("mc", "quadrature"):
            value = _under(method, lambda: distkl.js_divergence(p, q), device)
            out[f"jsd[{method}]"] = (value, None, method != "mc")
    value = _under("auto", lambda: distkl.bounded_kl(p, q, bound=2.0), device)
    out["bounded_kl"] = (value, None, scalar)
    value = _under("auto", lambda: distkl.js_distance(p, q), device)
    out["js_distance"] = (value, None, scalar)
    for n in (N, 4):  # stratified, and interval strata (fewer than 2 draws per component)
        est = distkl.kl_mc(p, q, num_samples=n, generator=_gen(device))
        out[f"kl_mc[{n}]"] = (est.value, est.stderr, False)
        est = distkl.jsd_mc(p, q, num_samples=n, generator=_gen(device))
        out[f"jsd_mc[{n}]"] = (est.value, est.stderr, False)
    bounds = distkl.kl_bounds(p, q)
    out["kl_bounds.lower"] = (bounds.lower, None, True)
    out["kl_bounds.upper"] = (bounds.upper, None, True)
    return out


@functools.cache
def _clean(pair: tuple[str, str], device: str, dtype: torch.dtype) -> dict[str, Result]:
    return entry_points(*build(pair, torch.device(device), dtype), torch.device(device))


# ---- poisoning -------------------------------------------------------------------------------


def _parameters(d: Distribution) -> list[str]:
    """Names of `d`'s parameter tensors, in `rebuild`'s order."""
    names: list[str] = []

    def name(t: Tensor) -> Tensor:
        names.append(f"parameter {len(names)} {tuple(t.shape)}")
        return t

    rebuild(d, name)
    return names


def poisoned(d: Distribution, which: int) -> Distribution:
    """`d` with the first entry of batch element `BAD` of its `which`-th parameter set to NaN."""
    seen = [0]

    def poison(t: Tensor) -> Tensor:
        t = t.detach().clone(memory_format=torch.contiguous_format)
        if seen[0] == which:
            t[BAD].view(-1)[0] = math.nan
        seen[0] += 1
        return t

    return rebuild(d, poison, validate_args=False)


def poison_cases(pairs: list[tuple[str, str]]) -> list:
    """(pair, side, which parameter, dtype): every parameter in float64, the mixture weights
    (parameter 0 of a mixture) in float32 too."""
    out = []
    for pair in pairs:
        p, q = build(pair, torch.device("cpu"))
        for side, d in (("p", p), ("q", q)):
            for which, name in enumerate(_parameters(d)):
                try:
                    poisoned(d, which)
                except RuntimeError:  # torch factorises a LowRank's NaN factor: refused there
                    continue
                weights = isinstance(d, MixtureSameFamily) and which == 0
                for dtype in (F64, torch.float32) if weights else (F64,):
                    id = f"{'-'.join(pair)}-{side}-{name}-{dtype}".replace("torch.", "")
                    out.append(pytest.param(pair, side, which, dtype, id=id))
    return out


@pytest.fixture
def no_validation():
    before = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    yield
    Distribution.set_default_validate_args(before)


def _check_element_alone(name: str, bad: Result, clean: Result, where: str) -> None:
    value, se, deterministic = bad
    ref, ref_se, _ = clean
    assert value.shape == (B,), f"{where} {name}: shape {value.shape}"
    assert value[BAD].isnan(), f"{where} {name}: NaN in, {value[BAD]} out ({value})"
    if se is not None:
        assert se[BAD].isnan(), f"{where} {name}: stderr {se[BAD]} for a NaN value"
    good = torch.tensor(GOOD, device=value.device)
    v, r = value[good], ref[good]
    assert torch.isfinite(v).all(), f"{where} {name}: the NaN reached other elements: {value}"
    if deterministic:
        torch.testing.assert_close(v, r, **SAME[v.dtype], msg=f"{where} {name}")
    elif se is not None and ref_se is not None and name.endswith(f"[{N}]"):
        # Another draw of the same estimate (the plan of draws may differ). The rules under
        # "mc" are these estimators; 4 draws give no honest stderr: finite is what is checked.
        spread = (se[good].square() + ref_se[good].square()).sqrt()
        assert ((v - r).abs() <= Z * spread).all(), f"{where} {name}: {v} vs {r} without NaN"


@pytest.mark.parametrize("pair, side, which, dtype", poison_cases(PAIRS))
def test_nan_parameter_gives_nan_in_its_element(
    pair: tuple[str, str],
    side: str,
    which: int,
    device: torch.device,
    dtype: torch.dtype,
    no_validation: None,
) -> None:
    """A NaN weight (logit or prob), location or scale: NaN in its batch element, from every
    method, and the other elements as without it."""
    p, q = build(pair, device, dtype)
    clean = _clean(pair, device.type, dtype)
    bad_p, bad_q = (poisoned(p, which), q) if side == "p" else (p, poisoned(q, which))
    bad = entry_points(bad_p, bad_q, device)
    where = f"{'-'.join(pair)}: NaN in parameter {which} of {side}"
    for name in clean:
        _check_element_alone(name, bad[name], clean[name], where)


@pytest.mark.parametrize(
    "pair",
    [pytest.param(pr, id="-".join(pr)) for pr in PAIRS if single_gaussian_p(build(pr, "cpu")[0])],
)
def test_pathwise_nan_stays_in_its_element(
    pair: tuple[str, str], device: torch.device, no_validation: None
) -> None:
    p, q = build(pair, device)
    est = distkl.kl_mc(poisoned(p, 0), q, num_samples=N, generator=_gen(device))
    assert est.value[BAD].isnan() and est.stderr[BAD].isnan()
    assert torch.isfinite(est.value[GOOD]).all(), f"{est.value}"


# ---- a weight of exactly 0 is a weight, not a NaN -------------------------------------------


def _dropped_last(d: Distribution) -> Distribution:
    """Element 0 of mixture `d` without its last component (the one of weight 0)."""
    assert isinstance(d, MixtureSameFamily)
    mix = d.mixture_distribution
    logits = mix.logits[0, :-1]
    comp = d.component_distribution
    if isinstance(comp, Normal):
        return MixtureSameFamily(
            Categorical(logits=logits), Normal(comp.loc[0, :-1], comp.scale[0, :-1])
        )
    assert isinstance(comp, Independent)
    base = comp.base_dist
    return MixtureSameFamily(
        Categorical(logits=logits), Independent(Normal(base.loc[0, :-1], base.scale[0, :-1]), 1)
    )


@pytest.mark.parametrize(
    "pair",
    [
        pytest.param(pr, id="-".join(pr))
        for pr in [("Mix(Normal)", "Normal"), ("Mix(Normal):logits", "Mix(Normal)")]
        + [("Mix(Independent(Normal))", "MultivariateNormal")]
    ],
)
def test_zero_weight_is_a_weight(
    pair: tuple[str, str], device: torch.device, dtype: torch.dtype
) -> None:
    """Element 0's component of weight exactly 0 gives what the mixture without it gives (the
    guaranteed bounds, whose cells depend on where the components are: bounds on that KL)."""
    p, q = build(pair, device, dtype)
    tol = QUAD_TOL if dtype == F64 else F32_TOL
    with_zero = entry_points(p, q, device)
    q0 = rebuild(q, lambda t: t[0].clone())
    without = entry_points(_dropped_last(p), q0, device)
    for name, (value, se, deterministic) in with_zero.items():
        ref, ref_se, _ = without[name]
        assert torch.isfinite(value[0]), f"{'-'.join(pair)} {name}: {value[0]} for a zero weight"
        if name.startswith("kl_bounds"):
            if "kl[quadrature]" in without:  # 1-D: the truth to quadrature accuracy
                truth = without["kl[quadrature]"][0]
                lower = with_zero["kl_bounds.lower"][0][0]
                upper = with_zero["kl_bounds.upper"][0][0]
                inside = lower - tol <= truth <= upper + tol
                assert inside, f"{name}: {truth} not in [{lower}, {upper}]"
        elif deterministic:
            torch.testing.assert_close(value[0], ref, rtol=tol, atol=tol, msg=name)
        elif name.endswith(f"[{N}]") and se is not None and ref_se is not None:
            spread = (se[0].square() + ref_se.square()).sqrt()
            assert (value[0] - ref).abs() <= Z * spread, f"{name}: {value[0]} vs {ref}"


# ---- the allocation of draws -----------------------------------------------------------------


def test_allocation_weights_replace_nan_rows_only(device: torch.device) -> None:
    log_w = torch.tensor(
        [[0.0, -math.inf, -1.0], [math.nan, -1.0, -2.0], [math.nan] * 3], device=device
    ).log_softmax(-1)
    planned = allocation_log_weights(log_w)
    assert torch.equal(planned[0], log_w[0])  # the -inf (weight 0) stays
    one = torch.tensor([0.0, -math.inf, -math.inf], device=device)
    assert torch.equal(planned[1:], one.expand(2, 3))


@pytest.mark.parametrize("num_samples", [64, 3], ids=["strata", "interval-strata"])
def test_allocation_of_nan_weights(num_samples: int, device: torch.device) -> None:
    """Every row NaN (was: ZeroDivisionError), or one row NaN (was: counts from NaN cast to an
    integer): valid components are drawn, and the other rows get the plan they get alone."""
    nan_row = torch.full((1, 3), math.nan, device=device)
    good = torch.tensor([[0.5, 0.5, 0.0]], device=device).log()

    def plan(log_w: Tensor) -> Tensor:
        """Each draw's component `(N, rows)`; interval strata below 2 draws per component (the
        choice reads the shape only, so that it is static under torch.compile)."""
        strata = allocate(log_w, num_samples, False, torch.Generator(device).manual_seed(0))
        assert isinstance(strata, IntervalStrata) == (num_samples < 2 * log_w.shape[-1])
        return strata.assign(0, num_samples)[0]

    alone = plan(nan_row)  # planned as one component
    assert ((alone >= 0) & (alone < 3)).all()
    both = plan(torch.cat([good, nan_row]))
    assert torch.equal(both[:, 0], plan(good)[:, 0])
    assert (both[:, 0] != 2).all()  # the zero-weight component is never drawn
