"""Streaming sample statistics shared by the estimators and the verifier."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["StreamingMoments"]


class StreamingMoments:
    """Running mean and sum of squared deviations over dim 0, merged chunk by chunk in float64.

    The pairwise merge of Chan, Golub and LeVeque (1979), "Updating formulae and a pairwise
    algorithm for computing sample variances", so that no chunk's values need be kept.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def add(self, values: Tensor) -> None:
        """Merge the rows of `values` (shape `(m, *shape)`)."""
        v = values.to(torch.float64)
        m = v.shape[0]
        if m == 0:
            return
        mean = v.mean(0)
        m2 = (v - mean).square().sum(0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = m, mean, m2
            return
        n = self.n + m
        delta = mean - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * m / n)
        self.n = n

    def result(self) -> tuple[Tensor, Tensor]:
        """`(mean, standard error of the mean)`; the error is 0 where the mean is infinite."""
        if self.mean is None or self.m2 is None:
            raise ValueError("StreamingMoments.result() called before any values were added.")
        var = self.m2 / max(self.n - 1, 1)
        stderr = torch.sqrt(var / self.n)
        stderr = torch.where(torch.isinf(self.mean), torch.zeros_like(stderr), stderr)
        return self.mean, stderr
