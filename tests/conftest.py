"""Shared fixtures: devices (cpu always, cuda skipped with a reason when absent) and dtypes."""

from __future__ import annotations

import pytest
import torch

import distkl  # noqa: F401  (registers the rules)

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
def _seeded_global_rng():
    """Tests that draw from torch's global generator see the same numbers in any order."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_options():
    """Every test starts from distkl's default options and leaves them so."""
    with distkl.options(**distkl.Options().__dict__):
        yield
