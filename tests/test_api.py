"""The public surface: what `import distkl` offers, and the names that moved."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.distributions import Categorical as Cat
from torch.distributions import MixtureSameFamily, Normal

import distkl
import distkl.latent
import distkl.montecarlo
import distkl.verify


def test_every_exported_name_exists():
    for name in distkl.__all__:
        assert getattr(distkl, name) is not None, name
    assert len(set(distkl.__all__)) == len(distkl.__all__)


def test_return_types_are_exported():
    rule = distkl.kl_rules()[0]
    assert isinstance(rule, distkl.RuleInfo)
    p = MixtureSameFamily(Cat(logits=torch.zeros(2)), Normal(torch.tensor([-1.0, 1.0]), 1.0))
    assert isinstance(distkl.kl_bounds(p, Normal(0.0, 2.0)), distkl.KLBounds)


@pytest.mark.parametrize(
    "name, module",
    [
        ("check_jsd", distkl.verify),
        ("expectation", distkl.montecarlo),
        ("kl_annealing", distkl.latent),
        ("kl_free_bits", distkl.latent),
    ],
)
def test_moved_names_still_resolve_with_a_deprecation_warning(name, module):
    assert name not in distkl.__all__
    with pytest.warns(DeprecationWarning, match=f"distkl.{name} moved to {module.__name__}"):
        assert getattr(distkl, name) is getattr(module, name)


def test_unknown_attribute_is_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'kl_magic'"):
        distkl.kl_magic  # noqa: B018


def test_module_attributes_are_the_modules_of_that_name():
    # ``from distkl.rules import categorical as _categorical`` once shadowed distkl/_categorical.py.
    for name, value in vars(distkl).items():
        if isinstance(value, types.ModuleType) and value.__name__.startswith("distkl."):
            full = f"distkl.{name}"
            if full in sys.modules:
                assert value is sys.modules[full], (name, value.__name__)
