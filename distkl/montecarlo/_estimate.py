"""The result type of every Monte Carlo estimator: [`Estimate`][distkl.Estimate]."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Estimate"]


@dataclass(frozen=True, eq=False)
class Estimate:
    """A Monte Carlo estimate: `value` and its standard error `stderr`.

    Compared by identity (`eq=False`): `==` on tensors is elementwise, so a field-wise
    `__eq__` would raise for any batch; compare `value` and `stderr` with torch instead.

    Attributes:
        value: the estimate, differentiable, of shape `batch_shape`.
        stderr: its estimated standard error (detached), same shape. `value +- 1.96 * stderr`
            is an approximate 95% confidence interval. NaN where no standard error can be
            estimated from the draws (a single sample per batch element, see
            [`distkl.kl_mc`][distkl.kl_mc]).
        num_samples: samples drawn per batch element.
    """

    value: Tensor
    stderr: Tensor
    num_samples: int

    def interval(self, level: float = 0.95) -> tuple[Tensor, Tensor]:
        """Normal-approximation confidence interval `(low, high)` at `level`."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie strictly between 0 and 1, got {level}.")
        z = math.sqrt(2.0) * torch.special.erfinv(torch.tensor(level, dtype=torch.float64)).item()
        return self.value - z * self.stderr, self.value + z * self.stderr

    def __repr__(self) -> str:
        return (
            f"Estimate(value={self.value.detach()}, stderr={self.stderr}, "
            f"num_samples={self.num_samples})"
        )
