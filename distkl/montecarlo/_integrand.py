r"""Integrands: $\log p(x) - \log q(x)$ with its matched-component controls, and the bounded
per-point JSD terms.

For KL against a Gaussian-family `q` the extra controls of a row drawn from component `k` of
`p` are $\log q_j(x) - \mathbb{E}_{p_k}[\log q_j]$ for the `MATCHES` components `j` of `q`
that best match `p_k` (the expectation is a Gaussian cross-entropy, in closed form).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.distributions import Distribution, MixtureSameFamily

from distkl._gaussian import (
    GaussianMixture,
    as_gaussian_mixture,
    expected_log_density,
    is_gaussian_family,
    same_parameters,
)
from distkl._logspace import log_ratio_to_mix
from distkl.density import gaussian_scorer, logsumexp_last
from distkl.montecarlo._samplers import Draw, GaussianSampler, Sampler

__all__ = ["KLIntegrand", "same_distribution", "bounded_terms", "log_density", "MATCHES"]

#: Components of q used as controls for each component of p (the best-matching ones).
MATCHES = 3


class KLIntegrand:
    """`f = log p(x) - log q(x)` on a chunk of draws, and the matched-component controls."""

    def __init__(
        self, p: Distribution, q: Distribution, sampler: Sampler, batch: torch.Size
    ) -> None:
        self.p, self.q, self.sampler, self.batch = p, q, sampler, batch
        self.gp = sampler.gm if isinstance(sampler, GaussianSampler) else None
        self.gq = as_gaussian_mixture(q, role="q") if is_gaussian_family(q) else None
        self.scorer_p = gaussian_scorer(self.gp, precise=True) if self.gp is not None else None
        self.scorer_q = gaussian_scorer(self.gq, precise=True) if self.gq is not None else None
        # x comes as (c, *p.batch_shape, *event): left-pad p's batch dims to align with q's.
        self.pad = (1,) * (len(batch) - len(sampler.batch_shape))
        # Matched components of q, computed on first use (never when no stratum fits controls).
        self._matches: Optional[tuple[Tensor, Tensor]] = None

    def row_elements(self) -> int:
        """Tensor elements one sample row needs (the memory model behind the chunk size)."""
        s = self.sampler
        d = max(1, self.p.event_shape.numel())
        kq = self.gq.num_components if self.gq is not None else 1
        per_out = 4 * d + 4 * kq + 4 * s.num_components + 48
        return s.row_elements() * max(1, s.batch_shape.numel()) + max(1, self.batch.numel()) * (
            per_out
        )

    def __call__(self, draw: Draw, idx: Tensor, controls: bool) -> tuple[Tensor, Optional[Tensor]]:
        c = idx.shape[0]
        x = draw.x.reshape(c, *self.pad, *draw.x.shape[1:])
        lp = self.scorer_p.log_prob(x) if self.scorer_p is not None else self.p.log_prob(x)
        if self.scorer_q is None:
            return lp - self.q.log_prob(x), None
        comp_q = self.scorer_q.component_log_prob(x)  # (c, *batch, Kq)
        lq = logsumexp_last(comp_q + self.scorer_q.log_weights.to(comp_q.dtype))
        extra = self._extra(comp_q, idx) if controls and self.gp is not None else None
        return lp - lq, extra

    def _extra(self, comp_q: Tensor, idx: Tensor) -> Tensor:
        """`log q_j(x) - E_{p_k}[log q_j]` for the matched `j` of each row's `k`."""
        assert self.gp is not None and self.gq is not None
        if self._matches is None:
            self._matches = best_matches(self.gp, self.gq, self.batch)
        j_map, e_best = self._matches  # (*batch, Kp, M)
        c, batch = idx.shape[0], self.batch
        kp, nm = j_map.shape[-2:]
        idx_b = idx.reshape(c, *self.pad, *self.sampler.batch_shape).expand(c, *batch)
        idx_b = idx_b.reshape(c, *batch, 1, 1).expand(c, *batch, 1, nm)
        j = j_map.expand(c, *batch, kp, nm).gather(-2, idx_b).squeeze(-2)  # (c, *batch, M)
        e = e_best.expand(c, *batch, kp, nm).gather(-2, idx_b).squeeze(-2)
        return comp_q.expand(c, *batch, comp_q.shape[-1]).gather(-1, j) - e


def best_matches(
    gp: GaussianMixture, gq: GaussianMixture, batch: torch.Size
) -> tuple[Tensor, Tensor]:
    """For each component k of p, the `M` components j of q maximising `log v_j + E_k[log q_j]`.

    Returns `(j (*batch, Kp, M) long, E_{p_k}[log q_j] (*batch, Kp, M))`, `M = min(3, Kq)`.
    """
    e = expected_log_density(gp, gq)
    kp, kq = gp.num_components, gq.num_components
    e = e.expand(*batch, kp, kq)
    score = (e + gq.log_weights.unsqueeze(-2)).detach()
    j = score.topk(min(MATCHES, kq), dim=-1).indices  # (*batch, Kp, M)
    return j, e.gather(-1, j)


def same_distribution(
    p: Distribution,
    q: Distribution,
    batch: torch.Size,
    device: torch.device,
    mixtures: Optional[tuple[GaussianMixture, GaussianMixture]] = None,
) -> Optional[Tensor]:
    """Boolean `batch` mask of elements where p and q are the same distribution, or None
    (no element can be: different families or numbers of components).

    The same object, or Gaussian families with equal parameters component by component.
    `mixtures`: p's and q's `GaussianMixture` views when the caller has them already.
    """
    if p is q:
        return torch.ones(batch, dtype=torch.bool, device=device)
    if not (is_gaussian_family(p) and is_gaussian_family(q)):
        return None
    if _num_components(p) != _num_components(q):
        return None
    if mixtures is None:
        mixtures = as_gaussian_mixture(p, role="p"), as_gaussian_mixture(q, role="q")
    return same_parameters(*mixtures).expand(batch)


def _num_components(d: Distribution) -> int:
    if isinstance(d, MixtureSameFamily):
        return d.component_distribution.batch_shape[-1]
    return 1


# --------------------------------------------------------------------------------------------
# Jensen-Shannon.


def bounded_terms(log_p: Tensor, log_q: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    r"""Per-point terms `(u, v)` in `[0, -log alpha]` and `[0, -log(1-alpha)]`.

    With the posterior $\pi(x) = \alpha p(x) / m(x)$ that `x` came from `p`,
    $L(\pi) = -\pi\log\alpha - (1-\pi)\log(1-\alpha)$ and
    $\rho = \mathrm{kl}(\pi \| \alpha) / L(\pi) = 1 - H_b(\pi)/L(\pi) \in [0, 1]$,

    $$
    u = -\log\alpha\;\rho(\pi), \qquad v = -\log(1-\alpha)\;\rho(\pi),
    \qquad \alpha\,\mathbb{E}_p[u] + (1-\alpha)\,\mathbb{E}_q[v] = \mathrm{JS}_\alpha(p, q),
    $$

    because $\pi u + (1-\pi) v = \mathrm{kl}(\pi \| \alpha)$ and
    $\mathbb{E}_m[\mathrm{kl}(\pi\|\alpha)] = \mathrm{JS}_\alpha$. At `alpha = 1/2`,
    `u = v = log 2 - H_b(pi)`. The Bernoulli KL is evaluated from
    $\delta = \log p - \log q$ as
    $\pi \log\frac{\pi}{\alpha} + (1-\pi)\log\frac{1-\pi}{1-\alpha}$ with
    $\log\frac{\pi}{\alpha} = -\log(1 + (1-\alpha)(e^{-\delta} - 1))$ and
    $\log\frac{1-\pi}{1-\alpha} = -\log(1 + \alpha(e^{\delta} - 1))$, so it is exactly 0
    where `p(x) = q(x)` (`p = q` gives exactly 0) and accurate near it.
    """
    # |delta| > 1e4 changes nothing visible (pi is 0 or 1 to any precision); +-inf (a point
    # outside one support) would give 0 * inf.
    delta = (log_p - log_q).clamp(-1e4, 1e4)
    pi = torch.sigmoid(math.log(alpha) - math.log1p(-alpha) + delta)
    kl = pi * log_ratio_to_mix(-delta, 1.0 - alpha) + (1.0 - pi) * log_ratio_to_mix(delta, alpha)
    cross = -(pi * math.log(alpha) + (1.0 - pi) * math.log1p(-alpha))  # L(pi) >= kl(pi || alpha)
    rho = (kl / cross).clamp(0.0, 1.0)
    return -math.log(alpha) * rho, -math.log1p(-alpha) * rho


def log_density(d: Distribution) -> Callable[[Tensor], Tensor]:
    """`d`'s log-density as a function of `x (n, *batch, *event)`; GEMM-based for Gaussians."""
    if is_gaussian_family(d):
        return gaussian_scorer(as_gaussian_mixture(d)).log_prob
    return d.log_prob
