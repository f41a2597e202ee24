"""Streaming count, mean and co-moment matrix per (stratum, group) of the engine's columns."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["StratumMoments"]


class StratumMoments:
    """Streaming count / mean / co-moment per (stratum, group) of vectors `z`.

    The rows of a chunk fall into different strata (`s` gives each row's), so the merge is a
    scatter over strata of Chan, Golub & LeVeque's (1979) pairwise update, on vectors
    (co-moments, not only variances). Means keep their autograd graph (the estimate is
    differentiable); co-moments are detached. `distkl._stats.StreamingMoments` is the
    plain, unstratified case.
    """

    def __init__(
        self, strata: int, groups: int, width: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.shape = (strata, groups)
        #: Nothing merged yet: the first chunk's moments are taken as they are (`update`).
        self.empty = True
        self.n = torch.zeros(strata, groups, dtype=dtype, device=device)
        self.mean = torch.zeros(strata, groups, width, dtype=dtype, device=device)
        self.m2 = torch.zeros(strata, groups, width, width, dtype=dtype, device=device)

    def update(self, s: Tensor, z: Tensor) -> None:
        """Merge the rows `z` (c, G, width) whose strata are `s` (c, G)."""
        c, g, v = z.shape
        sv = s.unsqueeze(-1).expand(c, g, v)
        cnt = torch.zeros_like(self.n).scatter_add_(0, s, torch.ones_like(s, dtype=self.n.dtype))
        total = torch.zeros(self.mean.shape, dtype=z.dtype, device=z.device).scatter_add(0, sv, z)
        mu = total / cnt.clamp_min(1.0).unsqueeze(-1)
        dev = z.detach() - mu.detach().gather(0, sv)
        outer = dev.unsqueeze(-1) * dev.unsqueeze(-2)
        m2 = torch.zeros_like(self.m2).scatter_add_(
            0, s.reshape(c, g, 1, 1).expand(c, g, v, v), outer
        )
        if self.empty:  # merging into zeros changes nothing: skip the arithmetic
            self.n, self.mean, self.m2, self.empty = cnt, mu, m2, False
            return
        n_new = self.n + cnt
        frac = torch.where(n_new > 0, cnt / n_new.clamp_min(1.0), torch.zeros_like(cnt))
        delta = mu - self.mean
        self.mean = self.mean + delta * frac.unsqueeze(-1)
        d = delta.detach()
        self.m2 = (
            self.m2
            + m2
            + d.unsqueeze(-1) * d.unsqueeze(-2) * (self.n * frac).reshape(*self.shape, 1, 1)
        )
        self.n = n_new
