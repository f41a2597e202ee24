"""Shared fixtures: devices (cpu always, cuda skipped with a reason when absent) and dtypes."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Distribution

import distkl  # noqa: F401  (registers the rules)
from distkl._torch_compat import default_validate_args

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device present"),
    ),
]
DTYPES = [torch.float32, torch.float64]
F64 = torch.float64

#: z-score at which a statistical test fails: a two-sided normal tail of 7e-6, so a correct
#: estimator fails about once in 150,000 runs of one test (seeds are fixed: in practice never).
Z = 4.5


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(params=DTYPES, ids=["float32", "float64"])
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture(autouse=True)
def _restore_default_validation():
    """A test that leaves torch's default argument validation off cannot leak that to the next
    one (the first `torch.compile` of code that builds distributions in a process turns it off
    as a side effect in torch 2.13; a docs page that compiles must not change what a later
    page's error examples print)."""
    before = default_validate_args()
    yield
    Distribution.set_default_validate_args(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (tiny matrices: faster, as the examples' CLIs do)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Tests that draw from torch's global generator see the same numbers in any order."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_options():
    """Every test starts from distkl's default options and leaves them so."""
    with distkl.options(**distkl.Options().__dict__):
        yield
