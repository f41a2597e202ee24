"""One canonical form for every Normal-family distribution and Gaussian mixture.

Every supported family (Normal, Independent(Normal, 1), MultivariateNormal,
LowRankMultivariateNormal, and MixtureSameFamily of any of them) is viewed as a mixture

    f(x) = sum_k w_k N(x; mu_k, Sigma_k),    k = 1..K

with `log_weights` of shape `(*batch, K)`, `loc` of shape `(*batch, K, D)` and either a
diagonal scale `scale_diag` (`(*batch, K, D)`) or a lower-triangular `scale_tril`
(`(*batch, K, D, D)`). A single Gaussian has K = 1. A scalar event (`Normal`) has D = 1 and
`event_shape == ()`.
"""

from __future__ import annotations

import math
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

from distkl._checks import batch_shape_of, broadcast_shape, check_same_event_shape, unsupported
from distkl._torch_compat import exact_log_probs, validated

__all__ = [
    "GaussianMixture",
    "SUPPORTED_COMPONENTS",
    "allocation_log_weights",
    "as_gaussian_mixture",
    "broadcast_mixtures",
    "diagonal_params",
    "entropies",
    "expected_log_density",
    "half_log_det",
    "invalid_elements",
    "is_gaussian_family",
    "loc_scale_1d",
    "mixture_log_density",
    "neutralize",
    "pairwise_kl",
    "pairwise_log_overlap",
    "pairwise_log_product",
    "same_parameters",
    "to_float64",
]

LOG_2PI = math.log(2.0 * math.pi)

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
        """Dense lower-triangular scale `(*batch, K, D, D)` (diagonal embedded if needed)."""
        if self.scale_tril is not None:
            return self.scale_tril
        assert self.scale_diag is not None
        return torch.diag_embed(self.scale_diag)

    def covariance(self) -> Tensor:
        """Dense covariance `(*batch, K, D, D)`."""
        if self.scale_diag is not None:
            return torch.diag_embed(self.scale_diag.square())
        assert self.scale_tril is not None
        return self.scale_tril @ self.scale_tril.transpose(-1, -2)

    def log_det_cov(self) -> Tensor:
        """`log det Sigma_k` of shape `(*batch, K)`."""
        return 2.0 * half_log_det(self)

    def rsample_components(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """`n` reparameterized draws from every component: shape `(n, *batch, K, D)`.

        The base noise is generated on the parameters' device with `generator` (or torch's
        global generator), so a seeded generator reproduces the draws exactly.
        """
        shape = (n, *self.loc.shape)
        eps = torch.randn(shape, generator=generator, dtype=self.loc.dtype, device=self.loc.device)
        if self.scale_diag is not None:
            return self.loc + self.scale_diag * eps
        assert self.scale_tril is not None
        return self.loc + (self.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)

    def expand(self, batch_shape: torch.Size) -> GaussianMixture:
        """Broadcast the batch dimensions to `batch_shape`."""
        k, d = self.num_components, self.dim
        return GaussianMixture(
            self.log_weights.expand(*batch_shape, k),
            self.loc.expand(*batch_shape, k, d),
            None if self.scale_diag is None else self.scale_diag.expand(*batch_shape, k, d),
            None if self.scale_tril is None else self.scale_tril.expand(*batch_shape, k, d, d),
            self.event_shape,
        )

    def moment_match(self) -> tuple[Tensor, Tensor]:
        """Mean `(*batch, D)` and covariance `(*batch, D, D)` of the whole mixture."""
        w = self.log_weights.exp()
        mean = (w.unsqueeze(-1) * self.loc).sum(-2)
        dev = self.loc - mean.unsqueeze(-2)
        cov = (
            w[..., None, None] * (self.covariance() + dev.unsqueeze(-1) * dev.unsqueeze(-2))
        ).sum(-3)
        return mean, cov


def is_gaussian_family(d: Distribution) -> bool:
    """True when `as_gaussian_mixture` accepts `d`."""
    if isinstance(d, MixtureSameFamily):
        return _is_gaussian_component(d.component_distribution)
    return _is_gaussian_component(d)


def _is_gaussian_component(d: Distribution) -> bool:
    return isinstance(d, (MultivariateNormal, LowRankMultivariateNormal)) or is_diagonal_gaussian(d)


def is_diagonal_gaussian(d: Distribution) -> bool:
    """True for `Normal` and `Independent(Normal, 1)` (the families with a diagonal scale)."""
    if isinstance(d, Normal):
        return True
    # isinstance throughout: subclasses (Pyro's Normal, its .to_event(1)) are supported too.
    return (
        isinstance(d, Independent)
        and isinstance(d.base_dist, Normal)
        and d.reinterpreted_batch_ndims == 1
    )


def _nan_where_negative(scale: Tensor) -> Tensor:
    """`scale` with negative entries replaced by NaN.

    With validation off torch accepts a negative scale; every method reading `|scale|` (or a
    squared scale) would then silently compute the KL of another distribution. NaN propagates
    instead, as torch's own `log_prob` does. Zero scales are kept (degenerate, not invalid here).
    """
    return torch.where(scale < 0, torch.full_like(scale, math.nan), scale)


def _nan_where_negative_diagonal(tril: Tensor) -> Tensor:
    """A lower-triangular factor with a negative diagonal entry becomes NaN (see above)."""
    bad = (tril.diagonal(dim1=-2, dim2=-1) < 0).any(-1)
    return torch.where(bad[..., None, None], torch.full_like(tril, math.nan), tril)


def _component_params(
    d: Distribution,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], torch.Size]:
    """(loc (*b, D), scale_diag (*b, D) | None, scale_tril (*b, D, D) | None, event_shape)."""
    if isinstance(d, Normal):
        loc, scale = _loc_scale(d)
        return loc.unsqueeze(-1), scale.unsqueeze(-1), None, torch.Size()
    if isinstance(d, Independent) and isinstance(d.base_dist, Normal):
        loc, scale = _loc_scale(d.base_dist)
        return loc, scale, None, d.event_shape
    if isinstance(d, MultivariateNormal):
        return d.loc, None, _nan_where_negative_diagonal(d.scale_tril), d.event_shape
    if isinstance(d, LowRankMultivariateNormal):
        # Dense Cholesky of W W^T + diag(D): mixtures need the full factor anyway.
        return d.loc, None, torch.linalg.cholesky(d.covariance_matrix), d.event_shape
    raise AssertionError("unreachable: checked by is_gaussian_family")


def _loc_scale(d: Normal) -> tuple[Tensor, Tensor]:
    """A Normal's `loc` and `scale`, of one shape (no copy when they already have it)."""
    loc, scale = d.loc, d.scale
    if loc.shape != scale.shape:  # torch broadcasts them; a subclass might not
        loc, scale = torch.broadcast_tensors(loc, scale)
    return loc, scale if validated(d) else _nan_where_negative(scale)


def diagonal_params(d: Distribution) -> tuple[Tensor, Tensor]:
    """`(loc, scale)` of shape `(*batch, D)` of a `Normal` (D = 1) or `Independent(Normal, 1)`:
    the distribution's own tensors (or views of them), as `as_gaussian_mixture` reads them."""
    loc, scale, _, _ = _component_params(d)
    if scale is None:
        raise AssertionError("diagonal_params needs a diagonal Gaussian (is_diagonal_gaussian)")
    return loc, scale


def as_gaussian_mixture(d: Distribution, *, role: str = "distribution") -> GaussianMixture:
    """Canonical `GaussianMixture` view of a Normal-family distribution or mixture.

    Mixture weights are read exactly (a zero weight gives a log-weight of `-inf`, never a
    clamped `log eps`); a negative scale (possible with validation off) becomes NaN, so every
    method gives NaN for it rather than the value for `|scale|`. Subclasses of the supported
    families (e.g. Pyro's) are accepted.

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
        # Exact log-weights: torch's `logits` of a Categorical built from probs clamp a zero
        # weight to eps (a weight-0 component would be counted with weight ~1e-7 in float32).
        log_w = exact_log_probs(d.mixture_distribution)
        loc, sd, st, ev = _component_params(d.component_distribution)
        gm = GaussianMixture(log_w, loc, sd, st, ev)
        # MixtureSameFamily lets the weights' and the components' batch shapes merely broadcast
        # (weights (K,) with components (B, K)): give every field the one broadcast batch shape.
        batch = broadcast_shape(log_w.shape[:-1], loc.shape[:-2])
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


def broadcast_mixtures(p: Distribution, q: Distribution) -> tuple[GaussianMixture, GaussianMixture]:
    """Canonical mixtures of `p` and `q`, expanded to their broadcast batch shape.

    Raises:
        NotImplementedError: `p` or `q` is not a Normal-family distribution or mixture.
        ValueError: different event shapes, or batch shapes that do not broadcast.
    """
    check_same_event_shape(p, q)
    mp = as_gaussian_mixture(p, role="p")
    mq = as_gaussian_mixture(q, role="q")
    shape = batch_shape_of(p, q)
    return mp.expand(shape), mq.expand(shape)


def to_float64(m: GaussianMixture) -> GaussianMixture:
    """`m` with every field cast to float64, log-weights renormalised there (differentiable).

    Float32 weights such as `[1, 1e-10]` sum to 1 only in float32; renormalising in float64
    keeps a tiny component's contribution from being off by its own weight.
    """

    def up(t: Optional[Tensor]) -> Optional[Tensor]:
        return None if t is None else t.to(torch.float64)

    log_w = m.log_weights.to(torch.float64)
    if m.log_weights.dtype != torch.float64:
        log_w = log_w - log_w.logsumexp(-1, keepdim=True)
    return GaussianMixture(
        log_w,
        m.loc.to(torch.float64),
        up(m.scale_diag),
        up(m.scale_tril),
        m.event_shape,
    )


def loc_scale_1d(m: GaussianMixture) -> tuple[Tensor, Tensor]:
    """`(loc, scale)` of every component of a scalar-event mixture, each `(*batch, K)`."""
    scale = m.scale_diag if m.scale_diag is not None else m.tril()[..., 0]
    return m.loc[..., 0], scale[..., 0]


def half_log_det(m: GaussianMixture) -> Tensor:
    r"""$\tfrac12 \log\det\Sigma_k = \sum_i \log L_{k,ii}$ of every component: `(*batch, K)`."""
    diag = m.scale_diag if m.scale_diag is not None else m.tril().diagonal(dim1=-2, dim2=-1)
    return diag.log().sum(-1)


def invalid_elements(m: GaussianMixture) -> Tensor:
    """Boolean mask `(*batch,)` of the batch elements with a NaN weight, location or scale."""
    bad = m.log_weights.isnan().any(-1) | m.loc.isnan().flatten(-2).any(-1)
    scale = m.scale_diag if m.scale_diag is not None else m.tril()
    return bad | scale.isnan().flatten(len(m.batch_shape)).any(-1)


def allocation_log_weights(log_weights: Tensor) -> Tensor:
    """`log_weights` `(*batch, K)` for planning draws: all on component 0 in a row with a NaN.

    Deciding how many draws each component gets needs numbers: a NaN weight would count as no
    component at all (a division by zero when every row has one, garbage counts from a NaN cast
    to an integer otherwise). Such a row is planned as one component of weight 1, which never
    raises the number of components the plan must serve, so the other rows get the plan they
    would get without it; the estimate keeps the NaN weights, so it is NaN there (NaN in, NaN
    out). A zero weight (log-weight `-inf`) is a legitimate weight and is kept.
    """
    bad = log_weights.isnan().any(-1, keepdim=True)
    k = torch.arange(log_weights.shape[-1], device=log_weights.device)
    first = torch.where(k == 0, 0.0, -math.inf).to(log_weights.dtype)
    return torch.where(bad, first, log_weights)


def neutralize(m: GaussianMixture, mask: Tensor) -> GaussianMixture:
    """`m` with the batch elements in `mask` replaced by standard normals of equal weight.

    For algorithms that would raise on NaN parameters (a Cholesky factorisation): compute on the
    neutralised mixture, then put NaN back where `mask` is set. `mask` has `m`'s batch shape.
    """
    k = m.num_components
    flat = mask[..., None]
    log_w = torch.where(flat, torch.full_like(m.log_weights, -math.log(k)), m.log_weights)
    loc = torch.where(flat[..., None], torch.zeros_like(m.loc), m.loc)
    if m.scale_diag is not None:
        sd = torch.where(flat[..., None], torch.ones_like(m.scale_diag), m.scale_diag)
        return GaussianMixture(log_w, loc, sd, None, m.event_shape)
    tril = m.tril()
    eye = torch.eye(m.dim, dtype=tril.dtype, device=tril.device).expand_as(tril)
    return GaussianMixture(
        log_w, loc, None, torch.where(flat[..., None, None], eye, tril), m.event_shape
    )


def same_parameters(mp: GaussianMixture, mq: GaussianMixture) -> Tensor:
    """Boolean mask `(*batch,)` (broadcast batch) of elements where every parameter is equal.

    Equal weights, locations and scales, component by component (a permutation of the
    components is not recognised). All `False` when the numbers of components or the
    dimensions differ.
    """
    batch = broadcast_shape(mp.batch_shape, mq.batch_shape)
    if mp.num_components != mq.num_components or mp.dim != mq.dim:
        return torch.zeros(batch, dtype=torch.bool, device=mp.loc.device)
    mp, mq = mp.expand(batch), mq.expand(batch)
    same = (mp.log_weights == mq.log_weights).all(-1) & (mp.loc == mq.loc).all(-1).all(-1)
    if mp.scale_diag is not None and mq.scale_diag is not None:
        return same & (mp.scale_diag == mq.scale_diag).all(-1).all(-1)
    return same & (mp.tril() == mq.tril()).flatten(-3).all(-1)


def pairwise_kl(mp: GaussianMixture, mq: GaussianMixture) -> Tensor:
    r"""`KL(p_a || q_b)` in nats for every pair of components: shape `(*batch, Ka, Kb)`.

    $$
    \mathrm{KL}(p_a \| q_b) = \tfrac12\bigl(\|L_b^{-1} L_a\|_F^2
    + \|L_b^{-1}(\mu_a - \nu_b)\|^2 - D\bigr) + \log\det L_b - \log\det L_a
    $$

    with Cholesky factors $L$. Identical components give exactly 0.

    Source: Rasmussen & Williams (2006), GPML, eq. (A.23).
    """
    d = mp.dim
    half_ld = half_log_det(mq).unsqueeze(-2) - half_log_det(mp).unsqueeze(-1)
    half_ld = torch.where(half_ld == 0, torch.zeros_like(half_ld), half_ld)
    diff = mp.loc.unsqueeze(-2) - mq.loc.unsqueeze(-3)  # (*b, Ka, Kb, D)
    if mp.scale_diag is not None and mq.scale_diag is not None:
        sp = mp.scale_diag.unsqueeze(-2)
        sq = mq.scale_diag.unsqueeze(-3)
        trace = (sp / sq).square().sum(-1)
        maha = (diff / sq).square().sum(-1)
    else:
        lp = mp.tril().unsqueeze(-3)  # (*b, Ka, 1, D, D)
        lq = mq.tril().unsqueeze(-4)  # (*b, 1, Kb, D, D)
        lp, lq = torch.broadcast_tensors(lp, lq)
        s = torch.linalg.solve_triangular(lq, lp, upper=False)
        trace = s.square().sum((-2, -1))
        m = torch.linalg.solve_triangular(lq, diff.unsqueeze(-1), upper=False).squeeze(-1)
        maha = m.square().sum(-1)
    return 0.5 * ((trace - d) + maha) + half_ld


def pairwise_log_overlap(mp: GaussianMixture, mq: GaussianMixture, alpha: float = 0.5) -> Tensor:
    r"""`log int p_a^alpha q_b^(1-alpha) dx` for every pair: shape `(*batch, Ka, Kb)`.

    Minus the Chernoff $\alpha$-divergence $C_\alpha(p_a \| q_b)$:

    $$
    \log\!\int p_a^{\alpha} q_b^{1-\alpha}\,dx
    = -\tfrac{\alpha(1-\alpha)}{2}\, \delta^\top \Sigma_\alpha^{-1} \delta
    - \tfrac12 \log\det\Sigma_\alpha + \tfrac{1-\alpha}{2}\log\det\Sigma_a
    + \tfrac{\alpha}{2}\log\det\Gamma_b,
    $$

    $\Sigma_\alpha = (1-\alpha)\Sigma_a + \alpha\Gamma_b$, $\delta = \mu_a - \nu_b$.
    `alpha=0.5` gives minus the Bhattacharyya distance.

    Source: Kolchinsky & Tracey (2017), "Estimating mixture entropy with pairwise distances",
    Entropy 19(7):361, sec. 4 (Chernoff alpha-divergence between Gaussians).
    """
    a = alpha
    cov = (1.0 - a) * mp.covariance().unsqueeze(-3) + a * mq.covariance().unsqueeze(-4)
    chol = torch.linalg.cholesky(cov)
    diff = (mp.loc.unsqueeze(-2) - mq.loc.unsqueeze(-3)).unsqueeze(-1)
    m = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
    half_ld = chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return (
        -0.5 * a * (1.0 - a) * m.square().sum(-1)
        - half_ld
        + (1.0 - a) * half_log_det(mp).unsqueeze(-1)
        + a * half_log_det(mq).unsqueeze(-2)
    )


def pairwise_log_product(mp: GaussianMixture, mq: GaussianMixture) -> Tensor:
    r"""`log int p_a q_b dx = log N(mu_a; nu_b, Sigma_a + Gamma_b)`: `(*batch, Ka, Kb)`.

    Source: Petersen & Pedersen (2012), "The Matrix Cookbook", eq. (371) (product of Gaussians).
    """
    cov = mp.covariance().unsqueeze(-3) + mq.covariance().unsqueeze(-4)
    chol = torch.linalg.cholesky(cov)
    diff = (mp.loc.unsqueeze(-2) - mq.loc.unsqueeze(-3)).unsqueeze(-1)
    m = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
    return (
        -0.5 * m.square().sum(-1)
        - chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        - 0.5 * mp.dim * LOG_2PI
    )


def entropies(m: GaussianMixture) -> Tensor:
    r"""Entropy of every component in nats, $\tfrac12\log\det(2\pi e\Sigma_k)$: `(*batch, K)`."""
    return 0.5 * m.dim * (1.0 + LOG_2PI) + half_log_det(m)


def expected_log_density(gp: GaussianMixture, gq: GaussianMixture) -> Tensor:
    r"""`E_{x ~ p_k}[log q_j(x)]` in nats for every pair of components: `(*batch, Kp, Kq)`.

    The Gaussian cross-entropy, negated:

    $$
    -\tfrac{D}{2}\log 2\pi - \tfrac12 \log|S_j|
    - \tfrac12\big[\operatorname{tr}(S_j^{-1}\Sigma_k)
    + (\mu_k - m_j)^\top S_j^{-1} (\mu_k - m_j)\big]
    $$

    Batch shapes of `gp` and `gq` need only broadcast.

    Source: Rasmussen & Williams (2006), GPML, eq. (A.23) (the cross term of the Gaussian KL).
    """
    d = gp.dim
    diff = gp.loc.unsqueeze(-2) - gq.loc.unsqueeze(-3)  # (*b, Kp, Kq, D)
    if gq.scale_diag is not None:
        prec = gq.scale_diag.square().reciprocal().unsqueeze(-3)  # (*bq, 1, Kq, D)
        if gp.scale_diag is not None:
            var_p = gp.scale_diag.square()
        else:
            var_p = gp.covariance().diagonal(dim1=-2, dim2=-1)
        trace = (var_p.unsqueeze(-2) * prec).sum(-1)
        mahal = (diff.square() * prec).sum(-1)
    else:
        tril_q = gq.tril()
        eye = torch.eye(d, dtype=tril_q.dtype, device=tril_q.device)
        linv = torch.linalg.solve_triangular(tril_q, eye, upper=False).unsqueeze(-4)
        prod = linv @ gp.tril().unsqueeze(-3)  # (*b, Kp, Kq, D, D)
        trace = prod.square().sum((-1, -2))
        mahal = (linv @ diff.unsqueeze(-1)).squeeze(-1).square().sum(-1)
    log_det_q = 2.0 * half_log_det(gq).unsqueeze(-2)  # (*bq, 1, Kq)
    return -0.5 * (d * LOG_2PI + log_det_q + trace + mahal)


def mixture_log_density(x: Tensor, m: GaussianMixture) -> Tensor:
    """`log m(x)` in nats for points `x` of shape `(*batch, N, D)`: shape `(*batch, N)`."""
    diff = x.unsqueeze(-2) - m.loc.unsqueeze(-3)  # (*b, N, K, D)
    if m.scale_diag is not None:
        z = diff / m.scale_diag.unsqueeze(-3)
    else:
        tril = m.tril()
        eye = torch.eye(m.dim, dtype=tril.dtype, device=tril.device).expand_as(tril)
        inv = torch.linalg.solve_triangular(tril, eye, upper=False)  # (*b, K, D, D)
        z = torch.einsum("...kij,...nkj->...nki", inv, diff)
    comp = -0.5 * z.square().sum(-1) - half_log_det(m).unsqueeze(-2) - 0.5 * m.dim * LOG_2PI
    return (m.log_weights.unsqueeze(-2) + comp).logsumexp(-1)
