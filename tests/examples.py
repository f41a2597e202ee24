"""THE table of (p, q) pairs the tests draw from: the package's rows plus test-only cases.

Rows shared with ``distkl verify`` live in :mod:`distkl.examples`; this module re-exports them and
adds pairs whose divergence is infinite, and numerical edge cases.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Categorical, OneHotCategorical

from distkl.examples import EXAMPLES, Example, by_family

__all__ = ["EXAMPLES", "Example", "by_family", "params", "INFINITE", "EDGE"]


def params(rows: list[Example]) -> list:
    """``pytest.param`` list with the rows' ids, for ``@pytest.mark.parametrize("ex", ...)``."""
    return [pytest.param(e, id=e.id) for e in rows]


NEG_INF = -math.inf

#: (id, make(device, dtype) -> (p, q)): pairs with KL(p || q) = +inf.
INFINITE = [
    (
        "Categorical-OneHotCategorical:q-zero-where-p-positive",
        lambda device, dtype: (
            Categorical(logits=torch.tensor([0.0, 0.0, NEG_INF], device=device, dtype=dtype)),
            OneHotCategorical(logits=torch.tensor([0.0, NEG_INF, 0.0], device=device, dtype=dtype)),
        ),
    ),
    (
        "OneHotCategorical-Categorical:q-zero-where-p-positive",
        lambda device, dtype: (
            OneHotCategorical(logits=torch.tensor([1.0, 2.0, 3.0], device=device, dtype=dtype)),
            Categorical(logits=torch.tensor([1.0, NEG_INF, 3.0], device=device, dtype=dtype)),
        ),
    ),
]

#: (id, make(device, dtype) -> (p, q)): finite but numerically delicate pairs.
EDGE = [
    (
        "Categorical-OneHotCategorical:zero-in-p",
        lambda device, dtype: (
            Categorical(logits=torch.tensor([0.0, NEG_INF, 1.0], device=device, dtype=dtype)),
            OneHotCategorical(logits=torch.tensor([0.5, -0.5, 2.0], device=device, dtype=dtype)),
        ),
    ),
    (
        "Categorical-OneHotCategorical:peaked-K1000",
        lambda device, dtype: (
            Categorical(
                logits=torch.cat(
                    [torch.zeros(1), torch.full((999,), -60.0)]
                ).to(device=device, dtype=dtype)
            ),
            OneHotCategorical(logits=torch.zeros(1000, device=device, dtype=dtype)),
        ),
    ),
]
