"""The registry: distkl adds pairs, never changes torch's, and dispatch stays unambiguous."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.distributions import (
    Categorical,
    Distribution,
    Normal,
    kl_divergence,
)
from torch.distributions import kl as torch_kl

import distkl
from distkl.registry import (
    PerCallKind,
    RuleInfo,
    kl_rules,
    lookup_jsd,
    lookup_kl,
    preserved_registries,
    register_jsd,
    register_kl,
    registered_jsd,
    registered_kl,
    skipped_kl_rules,
)
from distkl.rules.categorical import kl_categorical_mixture_pair
from tests.examples import EXAMPLES, params


def _run(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def _skip_without_pyro() -> None:
    # Not importorskip: importing Pyro here would re-register its (Independent,
    # MultivariateNormal) rule over distkl's for the rest of the session. The checks run in
    # subprocesses.
    if importlib.util.find_spec("pyro") is None:
        pytest.skip("pyro-ppl is not installed")


def test_every_distkl_rule_is_in_torch_registry():
    rules = kl_rules()
    assert rules, "distkl registered no KL rule"
    for rule in rules:
        assert isinstance(rule, RuleInfo)
        assert torch_kl._KL_REGISTRY[rule.type_p, rule.type_q] is rule.fn
        assert rule.kind in ("exact", "estimate")
        assert rule.kind_summary.startswith(("exact", "estimate"))
        assert rule.module.startswith("distkl.")


def test_refuses_to_overwrite_torch_pair():
    before = torch_kl._KL_REGISTRY[Normal, Normal]
    with pytest.raises(ValueError, match="Normal .. Normal.* already registered"):

        @register_kl(Normal, Normal)
        def _kl_normal_normal(p, q):  # pragma: no cover - never registered
            return torch.zeros(())

    assert torch_kl._KL_REGISTRY[Normal, Normal] is before


def test_refuses_to_overwrite_distkl_pair_with_another_function():
    rule = kl_rules()[0]
    with pytest.raises(ValueError, match="already registered"):

        @register_kl(rule.type_p, rule.type_q)
        def _another(p, q):  # pragma: no cover - never registered
            return torch.zeros(())

    assert torch_kl._KL_REGISTRY[rule.type_p, rule.type_q] is rule.fn


@pytest.mark.parametrize("bad", [int, "Normal", torch.Tensor, None])
def test_register_rejects_non_distribution_types(bad):
    with pytest.raises(TypeError, match="Distribution subclass"):
        register_kl(bad, Normal)
    with pytest.raises(TypeError, match="Distribution subclass"):
        register_kl(Normal, bad)


def test_register_rejects_unknown_kind():
    class _P(Distribution):
        pass

    with pytest.raises(ValueError, match="kind must be one of"):
        register_kl(_P, _P, kind="approximate")
    assert lookup_kl(_P, _P) == (None, None)


def test_reimporting_rule_modules_is_harmless():
    """``importlib.reload`` re-registers the reloaded functions instead of raising."""
    for module in {r.module for r in kl_rules()}:
        importlib.reload(importlib.import_module(module))
    importlib.reload(distkl)
    for rule in kl_rules():
        assert torch_kl._KL_REGISTRY[rule.type_p, rule.type_q] is rule.fn


@pytest.mark.parametrize("ex", params(EXAMPLES))
def test_dispatch_has_no_ambiguity_warning(ex):
    """Dispatch over the example table warns about nothing (pytest also runs warnings-as-errors)."""
    p, q = ex.build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn = torch_kl._dispatch_kl(type(p), type(q))
        value = kl_divergence(p, q)
    assert fn is not NotImplemented
    owner = "torch." if ex.family == "torch" else "distkl."
    assert fn.__module__.startswith(owner), fn.__module__
    assert value.shape == torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    assert not [str(w.message) for w in caught]


def test_missing_pair_still_raises_torchs_error():
    class _Unknown(Categorical):
        pass

    class _Other(Distribution):
        arg_constraints: dict = {}

    with pytest.raises(NotImplementedError):
        kl_divergence(_Other(validate_args=False), _Unknown(logits=torch.zeros(3)))


def test_pyro_first_then_distkl():
    """Importing distkl after Pyro changes none of Pyro's KL answers or registrations, and
    distkl skips the pair Pyro registered itself, (Independent, MultivariateNormal), quietly."""
    _skip_without_pyro()
    out = _run(
        """
        import warnings
        warnings.simplefilter("error")
        import torch
        import pyro.distributions as dist
        import pyro.distributions.kl as pyro_kl
        from torch.distributions import Independent, MultivariateNormal, kl
        pairs = [
            (dist.Normal(0.3, 1.2), dist.Normal(-0.1, 0.7)),
            (dist.Normal(torch.zeros(3), 1.0).to_event(1),
             dist.Normal(torch.ones(3), 2.0).to_event(1)),
            (dist.Delta(torch.tensor(0.5)), dist.Normal(0.0, 1.0)),
            (dist.Categorical(logits=torch.tensor([0.1, 0.2, 0.3])),
             dist.Categorical(logits=torch.tensor([0.3, 0.0, -1.0]))),
            (dist.MultivariateNormal(torch.zeros(2), torch.eye(2)),
             dist.MultivariateNormal(torch.ones(2), 2 * torch.eye(2))),
        ]
        before_table = dict(kl._KL_REGISTRY)
        before = [kl.kl_divergence(p, q) for p, q in pairs]
        import distkl
        from distkl.registry import skipped_kl_rules
        after = [kl.kl_divergence(p, q) for p, q in pairs]
        same_values = all(torch.equal(a, b) for a, b in zip(before, after))
        same_table = all(kl._KL_REGISTRY[k] is f for k, f in before_table.items())
        kept = kl._KL_REGISTRY[Independent, MultivariateNormal] is pyro_kl._kl_independent_mvn
        print(same_values, same_table, kept, [r.name for r in skipped_kl_rules()])
        """
    )
    assert out.split() == ["True", "True", "True", "['Independent-MultivariateNormal']"]


def test_import_distkl_in_a_fresh_interpreter():
    """One fresh interpreter: `import distkl` (and `distkl list`) changes no entry of torch's KL
    table and imports no sympy; then `import pyro` replaces distkl's (Independent, MVN) rule, and
    `kl_rules()`, `skipped_kl_rules()`, `lookup_kl` and `distkl list` say so (issue 11.10)."""
    out = _run(
        """
        import contextlib, importlib.util, io, sys
        from torch.distributions import Independent, MultivariateNormal, kl
        before = dict(kl._KL_REGISTRY)
        import distkl
        from distkl.cli import main
        from distkl.registry import kl_rules, lookup_kl, skipped_kl_rules
        after = kl._KL_REGISTRY
        changed = [k for k, f in before.items() if after[k] is not f]
        added = {k for k in after if k not in before}
        ours = {(r.type_p, r.type_q) for r in kl_rules()}
        with contextlib.redirect_stdout(io.StringIO()):
            main(["list"])
        print(len(before) > 0, len(added) > 0, changed, added == ours, "sympy" in sys.modules)
        if importlib.util.find_spec("pyro") is None:
            sys.exit(0)
        import pyro.distributions.kl as pyro_kl
        fn, info = lookup_kl(Independent, MultivariateNormal)
        listed = [r.name for r in kl_rules()]
        skipped = [(r.name, r.fn is pyro_kl._kl_independent_mvn) for r in skipped_kl_rules()]
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            main(["list"])
        lines = buf.getvalue().splitlines()
        line = [l for l in lines if "Independent-MultivariateNormal" in l
                or l.split()[:3] == ["KL", "Independent", "MVN"]]
        print(fn is pyro_kl._kl_independent_mvn, info is None,
              "Independent-MultivariateNormal" in listed, skipped)
        print(repr(line))
        """
    )
    lines = out.splitlines()
    assert lines[0] == "True True [] True False"
    if importlib.util.find_spec("pyro") is None:
        pytest.skip("pyro-ppl is not installed: the Pyro half did not run")
    assert lines[1] == "True True False [('Independent-MultivariateNormal', True)]"
    assert "pyro" in lines[2] and "rules.normal" not in lines[2]


def test_on_conflict_must_be_valid():
    with pytest.raises(ValueError, match="on_conflict must be 'raise' or 'skip'"):
        register_kl(Normal, Normal, on_conflict="overwrite")


class _P(Normal):
    """A pair no one has registered."""


class _Q(Normal):
    pass


def _zero_kl(p, q):
    return torch.zeros(torch.broadcast_shapes(p.batch_shape, q.batch_shape))


@pytest.mark.parametrize("ex", params(EXAMPLES))
def test_lookup_kl_is_torchs_dispatch(ex):
    """`lookup_kl` finds the function torch's own dispatch calls, for every example pair."""
    p, q = ex.build()
    fn, info = lookup_kl(type(p), type(q))
    assert fn is torch_kl._dispatch_kl(type(p), type(q))
    if info is not None:
        assert info.fn is fn and issubclass(type(p), info.type_p)
        assert issubclass(type(q), info.type_q)
    assert (info is None) == (ex.family == "torch")


def test_lookup_kl_for_subclasses_and_misses():
    fn, info = lookup_kl(_P, _Q)  # subclasses of Normal: torch's Normal-Normal rule
    assert fn is torch_kl._kl_normal_normal and info is None
    assert lookup_kl(Distribution, Normal) == (None, None)


def test_lookup_jsd_picks_the_most_specific_pair():
    from torch.distributions import MixtureSameFamily, OneHotCategorical

    fn, cat = lookup_jsd(MixtureSameFamily, OneHotCategorical)
    _, mix = lookup_jsd(MixtureSameFamily, Normal)
    assert cat is not None and mix is not None and fn is cat.fn
    assert (cat.type_p, cat.type_q) == (MixtureSameFamily, OneHotCategorical)
    assert cat.kind == "exact" and mix.kind == "estimate"
    assert lookup_jsd(Distribution, Normal) == (None, None)


def test_lookup_jsd_warns_on_ambiguity_like_torch():
    class _A(Normal):
        pass

    class _B(Normal):
        pass

    def jsd(p, q, skew):
        return torch.zeros(())

    with registered_jsd(_A, Normal, jsd), registered_jsd(Normal, _B, lambda p, q, s: jsd(p, q, s)):
        with pytest.warns(RuntimeWarning, match="Ambiguous js_divergence"):
            lookup_jsd(_A, _B)


def test_registered_kl_restores_torchs_table_and_memo_exactly():
    table, memo = dict(torch_kl._KL_REGISTRY), dict(torch_kl._KL_MEMOIZE)
    rules = kl_rules()
    with registered_kl(_P, _Q, _zero_kl) as fn:
        assert fn is _zero_kl
        assert kl_divergence(_P(0.0, 1.0), _Q(1.0, 2.0)).item() == 0.0
        assert lookup_kl(_P, _Q)[1].kind == "exact"  # type: ignore[union-attr]
    assert torch_kl._KL_REGISTRY == table and all(
        torch_kl._KL_REGISTRY[k] is f for k, f in table.items()
    )
    assert torch_kl._KL_MEMOIZE == memo  # the planted rule is not memoised for (_P, _Q)
    assert kl_rules() == rules
    assert kl_divergence(_P(0.0, 1.0), _Q(1.0, 2.0)).item() > 0  # torch's Normal rule again


def test_registered_kl_refuses_a_pair_torch_has_and_changes_nothing():
    table = dict(torch_kl._KL_REGISTRY)
    with pytest.raises(ValueError, match="already registered"):
        with registered_kl(Normal, Normal, _zero_kl):
            pass  # pragma: no cover - never entered
    assert torch_kl._KL_REGISTRY == table


def test_registered_kl_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="inside"):
        with registered_kl(_P, _Q, _zero_kl):
            raise RuntimeError("inside")
    assert lookup_kl(_P, _Q)[0] is torch_kl._kl_normal_normal


def test_preserved_registries_undoes_every_registration():
    jsd_before = {(r.type_p, r.type_q) for r in distkl.jsd_rules()}
    with preserved_registries():
        register_kl(_P, _Q)(_zero_kl)
        register_jsd(_P, _Q)(lambda p, q, skew: torch.zeros(()))
        assert lookup_jsd(_P, _Q)[1] is not None
    _, info = lookup_jsd(_P, _Q)
    assert info is not None and (info.type_p, info.type_q) == (Normal, Normal)
    assert {(r.type_p, r.type_q) for r in distkl.jsd_rules()} == jsd_before
    assert lookup_kl(_P, _Q)[1] is None


def test_per_call_kind_labels_categorical_mixtures_exact():
    """Issue 11.12: the kind describes what was computed for the actual components."""
    from torch.distributions import MixtureSameFamily

    def mix(components):
        return MixtureSameFamily(Categorical(probs=torch.tensor([0.3, 0.7])), components)

    cats = mix(Categorical(probs=torch.tensor([[0.2, 0.8], [0.5, 0.5]])))
    cats2 = mix(Categorical(probs=torch.tensor([[0.6, 0.4], [0.1, 0.9]])))
    gauss = mix(Normal(torch.tensor([0.0, 1.0]), 1.0))
    fn, info = lookup_kl(MixtureSameFamily, MixtureSameFamily)
    assert info is not None
    assert info.kind_for(cats, cats2) == "exact"
    assert info.kind_for(gauss, gauss) == "estimate"
    assert info.kind == "estimate"  # at type level: some calls estimate
    assert info.kind_summary == "exact for categorical components, estimate otherwise"
    torch.testing.assert_close(fn(cats, cats2), kl_categorical_mixture_pair(cats, cats2))


def test_per_call_kind_must_return_a_kind():
    bad = PerCallKind(lambda p, q: "approximate", "never")
    with registered_kl(_P, _Q, _zero_kl, kind=bad):
        _, info = lookup_kl(_P, _Q)
        assert info is not None and info.kind_summary == "never"
        with pytest.raises(ValueError, match="returned 'approximate'"):
            info.kind_for(_P(0.0, 1.0), _Q(0.0, 1.0))


def test_skipped_rules_list_what_torch_dispatches_to():
    """A distkl rule someone replaced after import is listed as skipped, not as distkl's."""
    rule = next(r for r in kl_rules() if r.kind == "exact")
    with preserved_registries():
        torch_kl._KL_REGISTRY[rule.type_p, rule.type_q] = _zero_kl  # as a later library would
        assert rule.name not in [r.name for r in kl_rules()]
        skipped = {r.name: r for r in skipped_kl_rules()}
        assert skipped[rule.name].fn is _zero_kl and skipped[rule.name].kind == "external"
        assert lookup_kl(rule.type_p, rule.type_q) == (_zero_kl, None)
    assert rule in kl_rules()
