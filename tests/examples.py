"""THE table of (p, q) pairs the tests draw from: the package's rows plus test-only cases.

Rows shared with ``distkl verify`` live in :mod:`distkl.examples`; this module re-exports them and
adds pairs whose divergence is infinite, and numerical edge cases.
"""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    OneHotCategorical,
)

from distkl._torch_compat import built_from_probs
from distkl.examples import EXAMPLES, Example, by_family

__all__ = [
    "EXAMPLES",
    "Example",
    "by_family",
    "by_id",
    "params",
    "INFINITE",
    "EDGE",
    "ADVERSARIAL",
    "TABLE",
    "rebuild",
    "copy_of",
    "element",
    "broadcast",
]


def params(rows: list[Example]) -> list:
    """``pytest.param`` list with the rows' ids, for ``@pytest.mark.parametrize("ex", ...)``."""
    return [pytest.param(e, id=e.id) for e in rows]


def by_id(id: str) -> Example:
    """The row named ``id`` in :data:`TABLE` (never select rows by position: rows get added)."""
    for e in TABLE:
        if e.id == id:
            return e
    raise KeyError(f"no example row with id {id!r}; ids: {[e.id for e in TABLE]}")


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
                logits=torch.cat([torch.zeros(1), torch.full((999,), -60.0)]).to(
                    device=device, dtype=dtype
                )
            ),
            OneHotCategorical(logits=torch.zeros(1000, device=device, dtype=dtype)),
        ),
    ),
]


def _normal(loc: list[float], scale: list[float], device, dtype) -> Normal:
    return Normal(
        torch.tensor(loc, device=device, dtype=dtype),
        torch.tensor(scale, device=device, dtype=dtype),
    )


def _mixture_1d(weights: list[float], loc: list[float], scale: list[float], device, dtype):
    w = torch.tensor(weights, device=device, dtype=dtype)
    return MixtureSameFamily(Categorical(probs=w), _normal(loc, scale, device, dtype))


#: (id, make(device, dtype) -> (p, q)): pairs from the adversarial campaign (issue 11), each a
#: case that broke once. Every property in ``tests/test_properties.py`` runs on them.
ADVERSARIAL = [
    (
        # issue 11 item 3: the weight-0 component must not count (true KL 0).
        "MixtureSameFamily(Normal)-Normal:zero-weight-component",
        lambda device, dtype: (
            _mixture_1d([1.0, 0.0], [0.0, 100.0], [1.0, 1.0], device, dtype),
            _normal([0.0], [1.0], device, dtype),
        ),
    ),
    (
        # issue 11 item 5: a far component of weight 1e-10 dominates the MC variance.
        "MixtureSameFamily(Normal)-Normal:tiny-far-component",
        lambda device, dtype: (
            _mixture_1d([1.0 - 1e-10, 1e-10], [0.0, 30.0], [1.0, 1.0], device, dtype),
            _normal([0.0], [1.0], device, dtype),
        ),
    ),
    (
        # issue 11 item 4: log q has a near-kink where q's dominant component switches.
        "Normal-MixtureSameFamily(Normal):switching-components",
        lambda device, dtype: (
            _normal([0.0], [4.0], device, dtype),
            _mixture_1d([0.5, 0.5], [0.0, 9.0], [1.0, 1.0], device, dtype),
        ),
    ),
    (
        # issue 11 item 7: a factor row dominating its diagonal (||w||^2 / d = 1e8).
        "Independent(Normal)-LowRankMultivariateNormal:dominant-factor",
        lambda device, dtype: (
            Independent(_normal([0.0], [1.0], device, dtype), 1),
            LowRankMultivariateNormal(
                torch.zeros(1, device=device, dtype=dtype),
                torch.tensor([[1e4]], device=device, dtype=dtype),
                torch.ones(1, device=device, dtype=dtype),
            ),
        ),
    ),
]


def _rows(family: str, cases: list) -> list[Example]:
    return [Example(id, make, family) for id, make in cases]


#: Every row the tests know: the package's :data:`EXAMPLES`, then the infinite, edge and
#: adversarial cases above as :class:`Example` rows (family ``"categorical"`` or ``"mixture"``
#: / ``"normal"`` as for the package rows).
TABLE: list[Example] = [
    *EXAMPLES,
    *_rows("categorical", INFINITE),
    *_rows("categorical", EDGE),
    *_rows("mixture", ADVERSARIAL[:3]),
    *_rows("normal", ADVERSARIAL[3:]),
]


# ---- Rebuilding a distribution from (transformed) parameters ---------------------------------

Transform = Callable[[torch.Tensor], torch.Tensor]


def _categorical_like(d: Distribution, fn: Transform, validate: bool | None) -> Distribution:
    cat = d._categorical if isinstance(d, OneHotCategorical) else d
    if built_from_probs(cat):  # exact zeros stay exact (logits are clamped at log(eps))
        return type(d)(probs=fn(d.probs), validate_args=validate)
    return type(d)(logits=fn(d.logits), validate_args=validate)


def rebuild(d: Distribution, fn: Transform, *, validate_args: bool | None = None) -> Distribution:
    """``d`` of the same type, built afresh from ``fn`` applied to each of its parameter tensors.

    Parameters are read at ``d``'s (possibly expanded) batch shape, so ``fn`` sees tensors whose
    leading dimensions are ``d.batch_shape``. A ``MultivariateNormal`` is rebuilt from its
    ``scale_tril`` (no new Cholesky), a categorical from the parameter it was built with.
    """
    v = validate_args
    if isinstance(d, (Categorical, OneHotCategorical)):
        return _categorical_like(d, fn, v)
    if isinstance(d, Normal):
        return type(d)(fn(d.loc), fn(d.scale), validate_args=v)
    if isinstance(d, Independent):
        base = rebuild(d.base_dist, fn, validate_args=v)
        return Independent(base, d.reinterpreted_batch_ndims, validate_args=v)
    if isinstance(d, MultivariateNormal):
        return type(d)(fn(d.loc), scale_tril=fn(d.scale_tril), validate_args=v)
    if isinstance(d, LowRankMultivariateNormal):
        return type(d)(fn(d.loc), fn(d.cov_factor), fn(d.cov_diag), validate_args=v)
    if isinstance(d, MixtureSameFamily):
        mix = rebuild(d.mixture_distribution, fn, validate_args=v)
        comp = rebuild(d.component_distribution, fn, validate_args=v)
        return MixtureSameFamily(mix, comp, validate_args=v)
    raise NotImplementedError(f"rebuild does not know {type(d).__name__}; add it here")


def _relaid(t: torch.Tensor) -> torch.Tensor:
    """Same values in new memory with another layout (transposed strides where 2-D+)."""
    if t.dim() < 2:
        return t.detach().clone()
    return t.detach().transpose(0, -1).contiguous().transpose(0, -1)


def copy_of(d: Distribution, *, new_layout: bool = False) -> Distribution:
    """An equal but distinct ``d``: new objects, new tensors (so no ``p is q`` shortcut applies).

    With ``new_layout`` the tensors also get transposed strides: reductions over them may round
    differently, so divergences are then 0 only to rounding.
    """
    return rebuild(d, _relaid if new_layout else (lambda t: t.detach().clone()))


def broadcast(
    d: Distribution, shape: torch.Size, *, validate_args: bool | None = None
) -> Distribution:
    """``d`` rebuilt at batch shape ``shape`` (``d.batch_shape`` must broadcast to it).

    Unlike ``d.expand``, this keeps how each categorical was built (``probs`` vs ``logits``),
    so exact zeros stay exact.
    """
    own, lead = len(d.batch_shape), len(shape) - len(d.batch_shape)

    def widen(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape((1,) * lead + tuple(t.shape))
        return t.expand(*shape, *t.shape[lead + own :]).clone()

    return rebuild(d, widen, validate_args=validate_args)


def element(d: Distribution, batch_shape: torch.Size, index: tuple[int, ...]) -> Distribution:
    """Batch element ``index`` of ``d`` broadcast to ``batch_shape``, alone (batch shape ``()``)."""
    own, lead = len(d.batch_shape), len(batch_shape) - len(d.batch_shape)
    mine = tuple(0 if s == 1 else i for i, s in zip(index[lead:], d.batch_shape))
    assert own == len(mine)
    return rebuild(d, lambda t: t[mine].clone())
