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
from distkl.registry import RuleInfo, kl_rules, register_kl
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


def test_torch_registry_unchanged_by_import():
    """Every entry of torch's KL table is the same function object after ``import distkl``."""
    out = _run(
        """
        from torch.distributions import kl
        before = dict(kl._KL_REGISTRY)
        import distkl
        after = kl._KL_REGISTRY
        changed = [(p, q) for (p, q), f in before.items() if after[p, q] is not f]
        added = [(p, q) for (p, q) in after if (p, q) not in before]
        ours = {(r.type_p, r.type_q) for r in distkl.kl_rules()}
        print(len(before), len(added), len(changed), set(added) == ours)
        """
    )
    n_before, n_added, n_changed, same = out.split()
    assert int(n_before) > 0
    assert int(n_added) > 0
    assert int(n_changed) == 0
    assert same == "True"


def test_import_does_not_import_sympy():
    out = _run(
        """
        import sys
        import distkl
        print("sympy" in sys.modules)
        """
    )
    assert out.strip() == "False"


def test_every_distkl_rule_is_in_torch_registry():
    rules = kl_rules()
    assert rules, "distkl registered no KL rule"
    for rule in rules:
        assert isinstance(rule, RuleInfo)
        assert torch_kl._KL_REGISTRY[rule.type_p, rule.type_q] is rule.fn
        assert rule.kind in ("exact", "estimate")
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


def test_pyro_answers_unchanged():
    """Importing distkl next to Pyro changes none of Pyro's KL answers or registrations."""
    _skip_without_pyro()
    out = _run(
        """
        import torch
        import pyro.distributions as dist
        from torch.distributions import kl
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
        after = [kl.kl_divergence(p, q) for p, q in pairs]
        same_values = all(torch.equal(a, b) for a, b in zip(before, after))
        same_table = all(kl._KL_REGISTRY[k] is f for k, f in before_table.items())
        print(same_values, same_table)
        """
    )
    assert out.split() == ["True", "True"]


def test_pyro_first_then_distkl_keeps_pyros_rule():
    """Pyro registers (Independent, MultivariateNormal) itself: distkl skips that pair, quietly."""
    _skip_without_pyro()
    out = _run(
        """
        import warnings
        warnings.simplefilter("error")
        import pyro.distributions.kl as pyro_kl
        from torch.distributions import Independent, MultivariateNormal, kl
        import distkl
        from distkl.registry import skipped_kl_rules
        kept = kl._KL_REGISTRY[Independent, MultivariateNormal] is pyro_kl._kl_independent_mvn
        print(kept, [r.name for r in skipped_kl_rules()])
        """
    )
    assert out.split() == ["True", "['Independent-MultivariateNormal']"]


def test_on_conflict_must_be_valid():
    with pytest.raises(ValueError, match="on_conflict must be 'raise' or 'skip'"):
        register_kl(Normal, Normal, on_conflict="overwrite")
