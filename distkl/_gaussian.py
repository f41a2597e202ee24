"""One canonical form for every Normal-family distribution and Gaussian mixture.

Every supported family (Normal, Independent(Normal, 1), MultivariateNormal,
LowRankMultivariateNormal, and MixtureSameFamily of any of them) is viewed as a mixture

    f(x) = sum_k w_k N(x; mu_k, Sigma_k),    k = 1..K

with ``log_weights`` of shape ``(*batch, K)``, ``loc`` of shape ``(*batch, K, D)`` and either a
diagonal scale ``scale_diag`` (``(*batch, K, D)``) or a lower-triangular ``scale_tril``
(``(*batch, K, D, D)``). A single Gaussian has K = 1. A scalar event (``Normal``) has D = 1 and
``event_shape == ()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from distkl._checks import unsupported

__all__ = ["GaussianMixture", "as_gaussian_mixture", "is_gaussian_family", "SUPPORTED_COMPONENTS"]

SUPPORTED_COMPONENTS = (
    "Normal",
    "Independent(Normal, 1)",
    "MultivariateNormal",
    "LowRankMultivariateNormal",
)


@dataclass
class GaussianMixture:
    """A (possibly one-component) Gaussian mixture in canonical form. See the module docstring."""

    log_weights: Tensor  # (*batch, K), normalised: logsumexp over K is 0
    loc: Tensor  # (*batch, K, D)
    scale_diag: Optional[Tensor]  # (*batch, K, D) when every component is diagonal
    scale_tril: Optional[Tensor]  # (*batch, K, D, D) otherwise
    event_shape: torch.Size

    @property
    def batch_shape(self) -> torch.Size:
        return self.log_weights.shape[:-1]

    @property
    def num_components(self) -> int:
        return self.log_weights.shape[-1]

    @property
    def dim(self) -> int:
        return self.loc.shape[-1]

    @property
    def is_diagonal(self) -> bool:
        return self.scale_diag is not None

    def tril(self) -> Tensor:
        """Dense lower-triangular scale ``(*batch, K, D, D)`` (diagonal embedded if needed)."""
        if self.scale_tril is not None:
            return self.scale_tril
        assert self.scale_diag is not None
        return torch.diag_embed(self.scale_diag)

    def covariance(self) -> Tensor:
        """Dense covariance ``(*batch, K, D, D)``."""
        if self.scale_diag is not None:
            return torch.diag_embed(self.scale_diag.square())
        assert self.scale_tril is not None
        return self.scale_tril @ self.scale_tril.transpose(-1, -2)

    def log_det_cov(self) -> Tensor:
        """``log det Sigma_k`` of shape ``(*batch, K)``."""
        diag = self.scale_diag
        if diag is None:
            assert self.scale_tril is not None
            diag = self.scale_tril.diagonal(dim1=-2, dim2=-1)
        return 2.0 * diag.log().sum(-1)

    def rsample_components(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``n`` reparameterized draws from every component: shape ``(n, *batch, K, D)``.

        The base noise is generated on the parameters' device with ``generator`` (or torch's
        global generator), so a seeded generator reproduces the draws exactly.
        """
        shape = (n, *self.loc.shape)
        eps = torch.randn(shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        if self.scale_diag is not None:
            return self.loc + self.scale_diag * eps
        assert self.scale_tril is not None
        return self.loc + (self.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)

    def expand(self, batch_shape: torch.Size) -> GaussianMixture:
        """Broadcast the batch dimensions to ``batch_shape``."""
        k, d = self.num_components, self.dim
        return GaussianMixture(
            self.log_weights.expand(*batch_shape, k),
            self.loc.expand(*batch_shape, k, d),
            None if self.scale_diag is None else self.scale_diag.expand(*batch_shape, k, d),
            None if self.scale_tril is None else self.scale_tril.expand(*batch_shape, k, d, d),
            self.event_shape,
        )

    def moment_match(self) -> tuple[Tensor, Tensor]:
        """Mean ``(*batch, D)`` and covariance ``(*batch, D, D)`` of the whole mixture."""
        w = self.log_weights.exp()
        mean = (w.unsqueeze(-1) * self.loc).sum(-2)
        dev = self.loc - mean.unsqueeze(-2)
        cov = (
            w[..., None, None] * (self.covariance() + dev.unsqueeze(-1) * dev.unsqueeze(-2))
        ).sum(-3)
        return mean, cov


def is_gaussian_family(d: Distribution) -> bool:
    """True when :func:`as_gaussian_mixture` accepts ``d``."""
    if isinstance(d, MixtureSameFamily):
        return _is_gaussian_component(d.component_distribution)
    return _is_gaussian_component(d)


def _is_gaussian_component(d: Distribution) -> bool:
    if isinstance(d, (Normal, MultivariateNormal, LowRankMultivariateNormal)):
        return True
    return (
        isinstance(d, Independent)
        and type(d.base_dist) is Normal
        and d.reinterpreted_batch_ndims == 1
    )


def _component_params(
    d: Distribution,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], torch.Size]:
    """(loc (*b, D), scale_diag (*b, D) | None, scale_tril (*b, D, D) | None, event_shape)."""
    if isinstance(d, Normal):
        loc, scale = torch.broadcast_tensors(d.loc, d.scale)
        return loc.unsqueeze(-1), scale.unsqueeze(-1), None, torch.Size()
    if isinstance(d, Independent) and isinstance(d.base_dist, Normal):
        base = d.base_dist
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        return loc, scale, None, d.event_shape
    if isinstance(d, MultivariateNormal):
        return d.loc, None, d.scale_tril, d.event_shape
    if isinstance(d, LowRankMultivariateNormal):
        # Dense Cholesky of W W^T + diag(D): mixtures need the full factor anyway.
        return d.loc, None, torch.linalg.cholesky(d.covariance_matrix), d.event_shape
    raise AssertionError("unreachable: checked by is_gaussian_family")


def as_gaussian_mixture(d: Distribution, *, role: str = "distribution") -> GaussianMixture:
    """Canonical :class:`GaussianMixture` view of a Normal-family distribution or mixture.

    Raises:
        NotImplementedError: for any other family, listing the supported ones.
    """
    if not is_gaussian_family(d):
        raise unsupported(
            role,
            d,
            [*SUPPORTED_COMPONENTS, *(f"MixtureSameFamily({c})" for c in SUPPORTED_COMPONENTS)],
        )
    if isinstance(d, MixtureSameFamily):
        log_w = d.mixture_distribution.logits
        log_w = log_w - log_w.logsumexp(-1, keepdim=True)
        loc, sd, st, ev = _component_params(d.component_distribution)
        gm = GaussianMixture(log_w, loc, sd, st, ev)
        # MixtureSameFamily lets the weights' and the components' batch shapes merely broadcast
        # (weights (K,) with components (B, K)): give every field the one broadcast batch shape.
        batch = torch.broadcast_shapes(log_w.shape[:-1], loc.shape[:-2])
        if log_w.shape[:-1] == batch and loc.shape[:-2] == batch:
            return gm
        return gm.expand(batch)
    loc, sd, st, ev = _component_params(d)
    log_w = torch.zeros(loc.shape[:-1] + (1,), dtype=loc.dtype, device=loc.device)
    return GaussianMixture(
        log_w,
        loc.unsqueeze(-2),
        None if sd is None else sd.unsqueeze(-2),
        None if st is None else st.unsqueeze(-3),
        ev,
    )
