"""The table of example `(p, q)` pairs that `distkl verify` checks and every test draws from.

Each [`Example`][distkl.examples.Example] builds its pair on a requested device and dtype from a
fixed seed, so a row is the same numbers everywhere. Batch shapes are chosen to exercise
broadcasting (`p.batch_shape` and `q.batch_shape` differ but broadcast). Adding a rule means adding
rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    OneHotCategoricalStraightThrough,
)

__all__ = ["Example", "EXAMPLES", "example", "random_spd"]

Maker = Callable[[torch.device, torch.dtype], tuple[Distribution, Distribution]]


@dataclass(frozen=True)
class Example:
    """One row: `id` names the pair as `"P-Q"`; `make(device, dtype)` returns `(p, q)`."""

    id: str
    make: Maker
    #: "categorical", "normal" or "mixture": the distkl module that owns the KL rule; "torch" for
    #: pairs whose KL torch answers itself (kept for the JSD rules and as a check of torch).
    family: str

    def build(
        self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64
    ) -> tuple[Distribution, Distribution]:
        return self.make(torch.device(device), dtype)


class _Params:
    """Seeded parameter factory: tensors made in float64 on CPU, then moved."""

    def __init__(self, seed: int, device: torch.device, dtype: torch.dtype) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.device = device
        self.dtype = dtype

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    def normal(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return self._to(scale * torch.randn(*shape, generator=self.g, dtype=torch.float64))

    def positive(self, *shape: int, low: float = 0.5, high: float = 1.5) -> torch.Tensor:
        u = torch.rand(*shape, generator=self.g, dtype=torch.float64)
        return self._to(low + (high - low) * u)

    def spd(self, *batch: int, d: int) -> torch.Tensor:
        return self._to(random_spd(*batch, d=d, generator=self.g))


def random_spd(*batch: int, d: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A well-conditioned random SPD matrix of shape `batch + (d, d)` in float64."""
    a = torch.randn(*batch, d, d, generator=generator, dtype=torch.float64) / d**0.5
    return a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=torch.float64)


def _diag_normal(pr: _Params, *batch: int, d: int, spread: float = 1.0) -> Independent:
    return Independent(Normal(pr.normal(*batch, d, scale=spread), pr.positive(*batch, d)), 1)


def _mvn(pr: _Params, *batch: int, d: int, spread: float = 1.0) -> MultivariateNormal:
    return MultivariateNormal(
        pr.normal(*batch, d, scale=spread), covariance_matrix=pr.spd(*batch, d=d)
    )


def _lowrank(pr: _Params, *batch: int, d: int, rank: int = 2, spread: float = 1.0):
    return LowRankMultivariateNormal(
        pr.normal(*batch, d, scale=spread),
        pr.normal(*batch, d, rank, scale=0.5),
        pr.positive(*batch, d),
    )


def _weights(pr: _Params, *batch: int, k: int) -> Categorical:
    return Categorical(logits=pr.normal(*batch, k))


EXAMPLES: list[Example] = []


def example(id: str, family: str) -> Callable[[Maker], Maker]:
    """Decorator adding a row to [`EXAMPLES`][distkl.examples.EXAMPLES]."""

    def deco(make: Maker) -> Maker:
        EXAMPLES.append(Example(id, make, family))
        return make

    return deco


# ---- Categorical family ------------------------------------------------------------------
K = 5


@example("Categorical-OneHotCategorical", "categorical")
def _(device, dtype):
    pr = _Params(1, device, dtype)
    return Categorical(logits=pr.normal(2, 3, K)), OneHotCategorical(logits=pr.normal(3, K))


@example("OneHotCategorical-Categorical", "categorical")
def _(device, dtype):
    pr = _Params(2, device, dtype)
    return OneHotCategorical(logits=pr.normal(3, K)), Categorical(logits=pr.normal(2, 1, K))


@example("OneHotCategoricalStraightThrough-Categorical", "categorical")
def _(device, dtype):
    pr = _Params(3, device, dtype)
    return OneHotCategoricalStraightThrough(logits=pr.normal(4, K)), Categorical(
        logits=pr.normal(4, K)
    )


@example("MixtureSameFamily(Categorical)-Categorical", "categorical")
def _(device, dtype):
    pr = _Params(4, device, dtype)
    p = MixtureSameFamily(_weights(pr, 3, k=4), Categorical(logits=pr.normal(3, 4, K)))
    return p, Categorical(logits=pr.normal(3, K))


@example("Categorical-MixtureSameFamily(Categorical)", "categorical")
def _(device, dtype):
    pr = _Params(5, device, dtype)
    q = MixtureSameFamily(_weights(pr, 2, 1, k=3), Categorical(logits=pr.normal(2, 1, 3, K)))
    return Categorical(logits=pr.normal(4, K)), q


@example("MixtureSameFamily(Categorical)-MixtureSameFamily(Categorical)", "categorical")
def _(device, dtype):
    pr = _Params(6, device, dtype)
    p = MixtureSameFamily(_weights(pr, 3, k=2), Categorical(logits=pr.normal(3, 2, K)))
    q = MixtureSameFamily(_weights(pr, 3, k=4), Categorical(logits=pr.normal(3, 4, K)))
    return p, q


@example("MixtureSameFamily(OneHotCategorical)-OneHotCategorical", "categorical")
def _(device, dtype):
    pr = _Params(7, device, dtype)
    p = MixtureSameFamily(_weights(pr, 2, k=3), OneHotCategorical(logits=pr.normal(2, 3, K)))
    return p, OneHotCategorical(logits=pr.normal(2, K))


@example("OneHotCategorical-MixtureSameFamily(OneHotCategorical)", "categorical")
def _(device, dtype):
    pr = _Params(8, device, dtype)
    q = MixtureSameFamily(_weights(pr, 2, k=3), OneHotCategorical(logits=pr.normal(2, 3, K)))
    return OneHotCategorical(logits=pr.normal(2, K)), q


# ---- Normal family -----------------------------------------------------------------------
D = 3


@example("Independent(Normal)-MultivariateNormal", "normal")
def _(device, dtype):
    pr = _Params(11, device, dtype)
    return _diag_normal(pr, 2, 1, d=D), _mvn(pr, 3, d=D)


@example("MultivariateNormal-Independent(Normal)", "normal")
def _(device, dtype):
    pr = _Params(12, device, dtype)
    return _mvn(pr, 3, d=D), _diag_normal(pr, 2, 1, d=D)


@example("Independent(Normal)-LowRankMultivariateNormal", "normal")
def _(device, dtype):
    pr = _Params(13, device, dtype)
    return _diag_normal(pr, 2, d=D), _lowrank(pr, 2, d=D)


@example("LowRankMultivariateNormal-Independent(Normal)", "normal")
def _(device, dtype):
    pr = _Params(14, device, dtype)
    return _lowrank(pr, 4, 1, d=D), _diag_normal(pr, 2, d=D)


# ---- Gaussian mixtures (estimates by the method in force) ---------------------------------


@example("MixtureSameFamily(Normal)-MixtureSameFamily(Normal)", "mixture")
def _(device, dtype):
    pr = _Params(21, device, dtype)
    p = MixtureSameFamily(_weights(pr, 2, k=3), Normal(pr.normal(2, 3, scale=2), pr.positive(2, 3)))
    q = MixtureSameFamily(_weights(pr, 1, k=2), Normal(pr.normal(1, 2, scale=2), pr.positive(1, 2)))
    return p, q


@example("Normal-MixtureSameFamily(Normal)", "mixture")
def _(device, dtype):
    pr = _Params(22, device, dtype)
    q = MixtureSameFamily(_weights(pr, 3, k=3), Normal(pr.normal(3, 3, scale=2), pr.positive(3, 3)))
    return Normal(pr.normal(3), pr.positive(3)), q


@example("MixtureSameFamily(Normal)-Normal", "mixture")
def _(device, dtype):
    pr = _Params(23, device, dtype)
    p = MixtureSameFamily(_weights(pr, 2, k=4), Normal(pr.normal(2, 4, scale=2), pr.positive(2, 4)))
    return p, Normal(pr.normal(2), pr.positive(2, low=1.0, high=3.0))


@example("Independent(Normal)-MixtureSameFamily(Independent(Normal))", "mixture")
def _(device, dtype):
    pr = _Params(24, device, dtype)
    q = MixtureSameFamily(_weights(pr, k=4), _diag_normal(pr, 4, d=D, spread=2.0))
    return _diag_normal(pr, 2, d=D), q


@example("MixtureSameFamily(Independent(Normal))-MixtureSameFamily(MultivariateNormal)", "mixture")
def _(device, dtype):
    pr = _Params(25, device, dtype)
    p = MixtureSameFamily(_weights(pr, 2, k=3), _diag_normal(pr, 2, 3, d=D, spread=2.0))
    q = MixtureSameFamily(_weights(pr, 2, k=2), _mvn(pr, 2, 2, d=D, spread=2.0))
    return p, q


@example("MixtureSameFamily(MultivariateNormal)-MultivariateNormal", "mixture")
def _(device, dtype):
    pr = _Params(26, device, dtype)
    p = MixtureSameFamily(_weights(pr, 2, k=3), _mvn(pr, 2, 3, d=D, spread=2.0))
    return p, _mvn(pr, 2, d=D)


@example("MultivariateNormal-MixtureSameFamily(LowRankMultivariateNormal)", "mixture")
def _(device, dtype):
    pr = _Params(27, device, dtype)
    q = MixtureSameFamily(_weights(pr, 2, k=3), _lowrank(pr, 2, 3, d=D, spread=2.0))
    return _mvn(pr, 2, d=D), q


@example("MixtureSameFamily(LowRankMultivariateNormal)-Independent(Normal)", "mixture")
def _(device, dtype):
    pr = _Params(28, device, dtype)
    p = MixtureSameFamily(_weights(pr, k=2), _lowrank(pr, 2, d=D, spread=2.0))
    return p, _diag_normal(pr, 3, d=D)


@example("LowRankMultivariateNormal-MixtureSameFamily(MultivariateNormal)", "mixture")
def _(device, dtype):
    pr = _Params(29, device, dtype)
    q = MixtureSameFamily(_weights(pr, k=3), _mvn(pr, 3, d=D, spread=2.0))
    return _lowrank(pr, 2, d=D), q


# ---- Pairs whose KL torch answers itself: rows for the JSD rules (and a check of torch) -------


@example("Categorical-Categorical", "torch")
def _(device, dtype):
    pr = _Params(41, device, dtype)
    return Categorical(logits=pr.normal(3, K)), Categorical(logits=pr.normal(2, 1, K))


@example("OneHotCategorical-OneHotCategorical", "torch")
def _(device, dtype):
    pr = _Params(42, device, dtype)
    return OneHotCategorical(logits=pr.normal(3, K)), OneHotCategorical(logits=pr.normal(3, K))


@example("Normal-Normal", "torch")
def _(device, dtype):
    pr = _Params(43, device, dtype)
    return Normal(pr.normal(2, 3), pr.positive(2, 3)), Normal(pr.normal(3), pr.positive(3))


@example("Independent(Normal)-Independent(Normal)", "torch")
def _(device, dtype):
    pr = _Params(44, device, dtype)
    return _diag_normal(pr, 2, d=D), _diag_normal(pr, 2, d=D)


@example("MultivariateNormal-MultivariateNormal", "torch")
def _(device, dtype):
    pr = _Params(45, device, dtype)
    return _mvn(pr, 2, d=D), _mvn(pr, 1, d=D)


@example("MultivariateNormal-LowRankMultivariateNormal", "torch")
def _(device, dtype):
    pr = _Params(46, device, dtype)
    return _mvn(pr, 2, d=D), _lowrank(pr, 2, d=D)


@example("LowRankMultivariateNormal-MultivariateNormal", "torch")
def _(device, dtype):
    pr = _Params(47, device, dtype)
    return _lowrank(pr, 2, d=D), _mvn(pr, 2, d=D)


@example("LowRankMultivariateNormal-LowRankMultivariateNormal", "torch")
def _(device, dtype):
    pr = _Params(48, device, dtype)
    return _lowrank(pr, 2, d=D), _lowrank(pr, 2, d=D)


@example("MixtureSameFamily(MultivariateNormal)-LowRankMultivariateNormal", "mixture")
def _(device, dtype):
    pr = _Params(30, device, dtype)
    p = MixtureSameFamily(_weights(pr, 2, k=2), _mvn(pr, 2, 2, d=D, spread=2.0))
    return p, _lowrank(pr, 2, d=D)


def by_family(family: str) -> list[Example]:
    """The rows whose rule lives in `family`'s module."""
    return [e for e in EXAMPLES if e.family == family]
