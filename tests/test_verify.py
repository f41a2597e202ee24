"""The verifier itself: it passes on the real registry and catches planted wrong rules.

Statistical checks use fixed seeds and the verifier's own z threshold (Bonferroni over the
elements checked, false-failure rate 1e-3 unless stated).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, Independent, Normal

import distkl
import distkl.rules.categorical  # noqa: F401
import distkl.rules.mixture  # noqa: F401
import distkl.rules.normal  # noqa: F401
from distkl.examples import EXAMPLES, Example
from distkl.registry import registered_jsd, registered_kl
from distkl.verify import (
    CheckResult,
    check_jsd,
    check_kl,
    check_values,
    plan_verify,
    run_verify,
    z_threshold,
)
from tests.examples import INFINITE


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _P(Normal):
    """Throwaway Normal subclasses: a pair torch has no rule for."""


class _Q(Normal):
    pass


class _CatP(Categorical):
    pass


class _CatQ(Categorical):
    pass


def _normal_kl(p: Normal, q: Normal) -> torch.Tensor:
    var_ratio = (p.scale / q.scale) ** 2
    t1 = ((p.loc - q.loc) / q.scale) ** 2
    return 0.5 * (var_ratio + t1 - 1 - var_ratio.log())


def _ordinary_pair(dtype: torch.dtype = torch.float64, device: str = "cpu"):
    """KL between about 0.3 and 1.5 nats per element: ordinary, not tiny."""
    loc_p = torch.tensor([0.0, 0.5, -1.0, 1.0], dtype=dtype, device=device)
    scale_p = torch.tensor([1.0, 0.7, 1.3, 0.9], dtype=dtype, device=device)
    loc_q = torch.tensor([1.0, -0.5, 0.0, 0.2], dtype=dtype, device=device)
    scale_q = torch.tensor([1.5, 1.0, 0.8, 1.4], dtype=dtype, device=device)
    return _P(loc_p, scale_p), _Q(loc_q, scale_q)


def test_z_threshold():
    assert z_threshold(1, 0.05) == pytest.approx(1.959964, abs=1e-5)
    assert z_threshold(100, 1e-3) == pytest.approx(4.4172, abs=1e-3)
    assert z_threshold(1000, 1e-3) > z_threshold(100, 1e-3)
    with pytest.raises(ValueError, match="alpha"):
        z_threshold(3, 1.5)


def test_check_kl_passes_a_correct_rule(device, dtype):
    p, q = _ordinary_pair(dtype, device)
    with registered_kl(_P, _Q, _normal_kl):
        res = check_kl(p, q, generator=_gen(0))
    assert isinstance(res, CheckResult)
    assert res.passed, str(res)
    assert res.analytic.shape == res.estimate.shape == res.z.shape == (4,)
    assert res.element_passed.dtype == torch.bool and bool(res.element_passed.all())
    assert res.kind == "exact" and res.method is None
    assert res.analytic.dtype == torch.float64  # reported in float64 whatever the rule's dtype


@pytest.mark.parametrize("factor", [1.1, 0.9])
def test_check_kl_catches_a_rule_wrong_by_ten_percent(device, dtype, factor):
    p, q = _ordinary_pair(dtype, device)
    exact = _normal_kl(p, q)
    assert bool((exact > 0.3).all()), exact

    def wrong(p: Normal, q: Normal) -> torch.Tensor:
        return factor * _normal_kl(p, q)

    with registered_kl(_P, _Q, wrong):
        res = check_kl(p, q, generator=_gen(1))
    assert not res.passed, str(res)
    assert not bool(res.element_passed.any()), f"every element is 10% off:\n{res}"


def test_check_kl_broadcasts_batch_shapes():
    p = _P(torch.zeros(3, 1, dtype=torch.float64), torch.ones(3, 1, dtype=torch.float64))
    q = _Q(
        torch.linspace(-1, 1, 2, dtype=torch.float64), torch.full((2,), 1.5, dtype=torch.float64)
    )
    with registered_kl(_P, _Q, _normal_kl):
        res = check_kl(p, q, num_samples=20_000, generator=_gen(2))
    assert res.z.shape == (3, 2)
    assert res.passed, str(res)


def test_check_values_and_str():
    p, q = _ordinary_pair()
    good = check_values(p, q, _normal_kl(p, q), generator=_gen(3))
    bad = check_values(p, q, 1.1 * _normal_kl(p, q), generator=_gen(3))
    assert good.passed and not bad.passed
    text = str(bad)
    assert "FAILED" in text and "exact" in text and "estimate" in text


def test_check_kl_without_rule_is_a_clear_error():
    p = Normal(torch.zeros(2), torch.ones(2))
    q = Categorical(logits=torch.zeros(2, 3))
    with pytest.raises(NotImplementedError, match="No KL"):
        check_kl(p, q)
    with pytest.raises(NotImplementedError, match="No JSD"):
        check_jsd(p, q)


def test_check_kl_reports_infinite_pairs_as_passed():
    for name, make in INFINITE:
        p, q = make("cpu", torch.float64)
        res = check_kl(p, q, num_samples=2_000, generator=_gen(4))
        assert bool(torch.isinf(res.analytic).all()), name
        assert res.passed, f"{name}\n{res}"


def _mc_rule(p, q) -> torch.Tensor:  # a rule of kind "estimate"
    from distkl.montecarlo import kl_mc

    opts = distkl.get_options()
    return kl_mc(p, q, num_samples=opts.num_samples, generator=opts.generator).value


class _IndP(Independent):
    pass


class _IndQ(Independent):
    pass


def _ind_pair():
    g = _gen(5)
    p = _IndP(Normal(torch.randn(2, 3, generator=g, dtype=torch.float64), 1.0), 1)
    q = _IndQ(Normal(torch.randn(2, 3, generator=g, dtype=torch.float64), 1.5), 1)
    return p, q


def test_estimate_rule_is_checked_with_its_own_stderr():
    p, q = _ind_pair()
    with registered_kl(_IndP, _IndQ, _mc_rule, kind="estimate"):
        res = check_kl(p, q, num_samples=20_000, generator=_gen(6))
    assert res.kind == "estimate" and res.method == "mc"
    assert bool((res.rule_stderr > 0).all())
    assert torch.allclose(res.stderr**2, res.mc_stderr**2 + res.rule_stderr**2, rtol=1e-6)
    assert res.passed, str(res)


def test_estimate_rule_wrong_by_ten_percent_fails():
    p, q = _ind_pair()

    def wrong(p, q):
        return 1.1 * _mc_rule(p, q)

    with registered_kl(_IndP, _IndQ, wrong, kind="estimate"):
        res = check_kl(p, q, num_samples=50_000, generator=_gen(7))
    assert not res.passed, str(res)


def test_exact_rule_that_depends_on_the_seed_is_refused():
    p, q = _ind_pair()
    with registered_kl(_IndP, _IndQ, _mc_rule, kind="exact"):
        with pytest.raises(ValueError, match="kind='estimate'"):
            check_kl(p, q, num_samples=2_000, generator=_gen(8))


def _cat_jsd(p: Categorical, q: Categorical, alpha: float) -> torch.Tensor:
    m = alpha * p.probs + (1 - alpha) * q.probs
    kl_pm = (p.probs * (p.probs / m).log()).sum(-1)
    kl_qm = (q.probs * (q.probs / m).log()).sum(-1)
    return alpha * kl_pm + (1 - alpha) * kl_qm


def _cat_pair():
    g = _gen(9)
    p = _CatP(logits=torch.randn(3, 6, generator=g, dtype=torch.float64))
    q = _CatQ(logits=torch.randn(3, 6, generator=g, dtype=torch.float64))
    return p, q


@pytest.mark.parametrize("skew", [0.5, 0.2])
def test_check_jsd_passes_a_correct_rule_and_catches_a_wrong_one(skew):
    p, q = _cat_pair()
    with registered_jsd(_CatP, _CatQ, _cat_jsd):
        good = check_jsd(p, q, skew=skew, generator=_gen(10))
    assert good.passed and good.divergence == "JSD", str(good)

    def wrong(p, q, alpha):
        return 1.1 * _cat_jsd(p, q, alpha)

    with registered_jsd(_CatP, _CatQ, wrong):
        bad = check_jsd(p, q, skew=skew, generator=_gen(10))
    assert not bad.passed, str(bad)


def test_verify_passes_on_the_real_registry(device):
    """The whole table once: even rows in float32, odd rows in float64 (both dtypes covered)."""
    rows = []
    for dtype, table in ((torch.float32, EXAMPLES[0::2]), (torch.float64, EXAMPLES[1::2])):
        report = run_verify(devices=[str(device)], dtypes=[dtype], examples=table, num_samples=4096)
        assert report.passed(), report.table()
        rows += report.rows
    assert {r.pair for r in rows} == {ex.id for ex in EXAMPLES}
    kl_rows = {r.pair for r in rows if r.divergence == "KL"}
    assert "Normal-MixtureSameFamily(Normal)" in kl_rows
    assert "Categorical-OneHotCategorical" in kl_rows
    # estimate rules: quadrature in 1-D, Monte Carlo otherwise
    methods = {r.result.method for r in rows if r.result is not None}
    assert {"quadrature", "mc"} <= methods


def _planted_row() -> Example:
    def make(device, dtype):
        return _ordinary_pair(dtype, str(device))

    return Example("_P-_Q", make, "normal")


def test_verify_fails_on_a_planted_wrong_rule():
    def wrong(p, q):
        return 1.1 * _normal_kl(p, q)

    with registered_kl(_P, _Q, wrong):
        report = run_verify(devices=["cpu"], examples=[_planted_row()], num_samples=50_000)
        assert not report.passed()
        assert [r.pair for r in report.failures] == ["_P-_Q", "_P-_Q"]  # float32 and float64
        assert "FAIL" in report.table()
    # the report fits 100 columns, explains its columns and lists failures with a command
    text = report.render()
    assert max(len(line) for line in text.splitlines()) <= 100, text
    tail = text[text.index("failures") :].replace(" \\\n      ", " ")
    assert "KL _P-_Q cpu float32: z = " in tail and "KL _P-_Q cpu float64: z = " in tail
    assert "python -m distkl verify --only _P-_Q --kind kl --device cpu --dtype float64" in tail
    assert "[i/n] = that" in text  # the legend explains the index after z
    with registered_kl(_P, _Q, _normal_kl):
        report = run_verify(devices=["cpu"], examples=[_planted_row()], num_samples=50_000)
        assert report.passed(), report.table()


def test_verify_lists_rules_without_an_example_row_and_rows_without_a_rule():
    with registered_kl(_P, _Q, _normal_kl):
        report = run_verify(devices=["cpu"], dtypes=[torch.float64], only="no-such-row")
        assert any("_P-_Q" in gap for gap in report.gaps), report.gaps
    assert not report.rows and not report.passed()  # nothing checked is not a pass

    def make(device, dtype):
        return Normal(torch.zeros(2), 1.0), Categorical(logits=torch.zeros(3))

    report = run_verify(
        devices=["cpu"], dtypes=[torch.float64], examples=[Example("N-C", make, "normal")]
    )
    assert report.missing == ["example N-C: no KL rule registered for (Normal, Categorical)"]
    assert not report.rows


def test_verify_json_is_plain_data():
    import json

    report = run_verify(
        devices=["cpu"], dtypes=[torch.float64], only="MixtureSameFamily(Normal)-Normal", quick=True
    )
    data = json.loads(json.dumps(report.to_json()))
    assert data["passed"] is True
    assert {r["divergence"] for r in data["rows"]} == {"KL", "JSD"}
    row = data["rows"][0]
    assert row["kind"] == "estimate" and row["method"] == "quadrature"
    assert len(row["z"]) == len(row["analytic"]) == math.prod(row["shape"])


CATEGORICAL_MIXTURES = "MixtureSameFamily(Categorical)-MixtureSameFamily(Categorical)"


def test_mixture_of_categoricals_is_checked_as_exact():
    """Issue 11.12: the kind is what the rule computes for the actual components."""
    plan = plan_verify(only=CATEGORICAL_MIXTURES, divergences=("KL",))
    assert [(c.divergence, c.kind) for c in plan.checks] == [("KL", "exact")]
    (ex,) = [e for e in EXAMPLES if e.id == CATEGORICAL_MIXTURES]
    p, q = ex.build()
    result = check_kl(p, q, num_samples=4096, generator=_gen(11))
    assert result.kind == "exact" and result.method is None and result.passed, str(result)
    gauss = plan_verify(only="MixtureSameFamily(Normal)-MixtureSameFamily(Normal)")
    assert {c.kind for c in gauss.checks} == {"estimate"}


def test_plan_counts_the_elements_and_filters_by_kind():
    plan = plan_verify(devices=["cpu"], dtypes=[torch.float64], divergences=("JSD",))
    assert plan.checks and {c.divergence for c in plan.checks} == {"JSD"}
    assert plan.num_elements == sum(c.num_elements for c in plan.checks)
    assert plan.z_threshold == z_threshold(plan.num_elements)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 1}, "num_samples must be an int >= 2"),
        ({"alpha": 1.0}, "alpha must lie strictly between 0 and 1"),
        ({"divergences": ("KLD",)}, "divergence"),
    ],
)
def test_plan_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_verify(**kwargs)


def test_run_verify_sets_threads_for_the_run_only():
    seen: list[int] = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        report = run_verify(
            devices=["cpu"],
            dtypes=[torch.float64],
            examples=[_planted_row()],
            num_samples=64,
            threads=1,
            progress=lambda line: seen.append(torch.get_num_threads()),
        )
        assert seen and set(seen) == {1} and report.threads == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        run_verify(examples=[], threads=0)
