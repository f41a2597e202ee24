r"""Exact KL divergences between a diagonal Normal and the multivariate Normal families.

torch answers `KL(p || q)` within each Normal family (`Normal`/`Normal`,
`Independent`/`Independent`, and every pair of `MultivariateNormal` and
`LowRankMultivariateNormal`) but raises `NotImplementedError` as soon as one side is the
diagonal `Independent(Normal(mu, sigma), 1)` and the other a `MultivariateNormal` or
`LowRankMultivariateNormal` -- the everyday VAE case of a diagonal posterior against a
full-covariance prior. This module registers those four pairs, both directions, as exact closed
forms. It registers nothing torch already has.

All four rules evaluate the Gaussian KL divergence

$$
\mathrm{KL}(p \| q) = \tfrac12 \Big[\operatorname{tr}(\Sigma_q^{-1}\Sigma_p)
    + (\mu_q - \mu_p)^\top \Sigma_q^{-1} (\mu_q - \mu_p) - D
    + \log\det\Sigma_q - \log\det\Sigma_p\Big]
$$

without ever forming the dense covariance of the diagonal side, and with the `q`-only linear
algebra done once per *unbroadcast* batch element of `q` (a single prior shared by a batch of
posteriors costs one factorisation, not one per posterior). The trace, `-D` and log-determinant
terms are regrouped into sums of non-negative pieces, each computed without the cancellation of
`tr - D` against `log det`:

$$
\phi(a) = a - 1 - \log a \;\ge 0, \qquad \text{evaluated as } \operatorname{expm1}(t) - t,
\; t = \log a.
$$

Source: Rasmussen & Williams (2006), "Gaussian Processes for Machine Learning", eq. (A.23) (KL
between Gaussians) and eqs. (A.9)-(A.10) (Woodbury identity, matrix determinant lemma), as used
in `torch.distributions.lowrank_multivariate_normal`; Hadamard's inequality
($\det A \le \prod_i A_{ii}$ for SPD $A$; Horn & Johnson, "Matrix Analysis", 2nd ed.,
Thm. 7.8.1) for the non-negative splits.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from distkl._checks import batch_shape_of, check_same_event_shape, unsupported
from distkl._torch_compat import batch_mahalanobis, capacitance_tril, lowrank_factors, scale_tril
from distkl.registry import register_kl

__all__: list[str] = []

#: What the rules of this module accept on the `Independent` side.
SUPPORTED_INDEPENDENT = ("Independent(Normal, 1)",)


def _diagonal_normal(d: Distribution, side: str, other: Distribution) -> Normal:
    """The `Normal` inside `Independent(Normal, 1)`, or `NotImplementedError`."""
    if isinstance(d, Independent) and d.reinterpreted_batch_ndims == 1:
        base = d.base_dist
        if isinstance(base, Normal):
            return base
    other_side = "q" if side == "p" else "p"
    raise unsupported(
        f"KL(p || q) with {other_side} of type {type(other).__name__} and {side}",
        d,
        SUPPORTED_INDEPENDENT,
    )


def _checked_diagonal(p: Distribution, q: Distribution, diagonal: str) -> Normal:
    """Check the pair (event shapes, batch shapes) and return the `Normal` of its diagonal side.

    `diagonal` names the `Independent(Normal, 1)` side, `"p"` or `"q"`.
    """
    d, other = (p, q) if diagonal == "p" else (q, p)
    base = _diagonal_normal(d, diagonal, other)
    check_same_event_shape(p, q)
    batch_shape_of(p, q)
    return base


def _phi_of_log(t: Tensor) -> Tensor:
    r"""$\phi(a) = a - 1 - \log a \ge 0$ from $t = \log a$, as `expm1(t) - t`."""
    return torch.expm1(t) - t


def _diag(tril: Tensor) -> Tensor:
    """The diagonal of a batch of matrices, `(*batch, n)`."""
    return tril.diagonal(dim1=-2, dim2=-1)


def _log_det_capacitance(W_tilde: Tensor, C_tril: Tensor) -> Tensor:
    r"""`log det C` for `C = I + W~^T W~ = C_tril C_tril^T`, accurate when `W~` is small.

    `2 sum log diag(C_tril)` loses `~eps` absolute accuracy because `C_tril` is stored near
    the identity. The Cholesky pivots satisfy
    $(C_{\mathrm{tril}})_{kk}^2 = 1 + u_k$ with
    $u_k = (\tilde W^\top \tilde W)_{kk} - \sum_{j<k} (C_{\mathrm{tril}})_{kj}^2$, whose
    terms are all small and accurate, so `log det C = sum_k log1p(u_k)`.
    """
    u = W_tilde.square().sum(-2) - C_tril.tril(-1).square().sum(-1)
    # Where u is not small it is a difference of large numbers: the pivot itself is better then.
    small = u < 1.0
    pivot = 2.0 * torch.log(torch.where(small, torch.ones_like(u), _diag(C_tril)))
    return torch.where(small, torch.log1p(torch.where(small, u, torch.zeros_like(u))), pivot).sum(
        -1
    )


def _log1m_leverage(W_tilde: Tensor, A: Tensor, row_sq: Tensor) -> Tensor:
    r"""$\log(1 - x_i)$, $x_i = \tilde w_i^\top C^{-1} \tilde w_i$, accurate even where $x_i \to 1$.

    `A = C_tril^{-1} W~^T` gives $x_i = \|A_{:,i}\|^2$, accurate while $x_i$ is not near 1.
    A row that dominates its diagonal ($\|\tilde w_i\|^2 \gg 1/\varepsilon$) has $x_i$ rounding
    to 1 and `log1p(-x)` to $-\infty$. For those rows Sherman-Morrison gives
    $1 - x_i = 1 / (1 + s_i)$, $s_i = \tilde w_i^\top C_{-i}^{-1} \tilde w_i$ with
    $C_{-i} = I + \sum_{j \ne i} \tilde w_j \tilde w_j^\top$ formed without row `i` (no
    cancellation). Since $\sum_i x_i = r - \operatorname{tr} C^{-1} < r$, fewer than $2r$ rows
    have $x_i > 1/2$: the $\min(D, 2r)$ largest are recomputed, at $O(D r^3)$.

    Source: Sherman & Morrison (1950), Ann. Math. Statist. 21(1); the bound on $\sum_i x_i$ is
    the trace of the hat matrix $\tilde W C^{-1} \tilde W^\top$.
    """
    x = A.square().sum(-2)
    # x_i <= ||w_i||^2 / (1 + ||w_i||^2) exactly; clamp so that rounding never gives 1 - x < 0.
    x = torch.minimum(x, row_sq / (1.0 + row_sq))
    log1m_x = torch.log1p(-x.clamp(max=0.5))  # rows with x > 1/2 are replaced below
    dim, rank = W_tilde.shape[-2:]
    k = min(dim, 2 * rank)
    idx = x.detach().topk(k, dim=-1).indices  # (*b, k)
    keep = torch.ones(*idx.shape, dim, dtype=W_tilde.dtype, device=W_tilde.device)
    keep = keep.scatter(-1, idx.unsqueeze(-1), 0.0)  # (*b, k, D): row i left out
    others = W_tilde.unsqueeze(-3) * keep.unsqueeze(-1)  # (*b, k, D, r)
    eye = torch.eye(rank, dtype=W_tilde.dtype, device=W_tilde.device)
    c_minus = eye + others.mT @ others  # (*b, k, r, r)
    w_i = W_tilde.gather(-2, idx.unsqueeze(-1).expand(*idx.shape, rank))  # (*b, k, r)
    chol = torch.linalg.cholesky(c_minus)
    s = torch.linalg.solve_triangular(chol, w_i.unsqueeze(-1), upper=False).square().sum((-2, -1))
    return log1m_x.scatter(-1, idx, -torch.log1p(s))


@register_kl(Independent, MultivariateNormal, kind="exact", on_conflict="skip")
def _kl_independent_multivariatenormal(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats of a diagonal Normal `p` from a full-covariance Normal `q`.

    `p = Independent(Normal(mu_p, sigma), 1)`, `q = MultivariateNormal(mu_q, scale_tril=L)`,
    $M = L^{-1}$ (lower triangular, $M_{ii} = 1/L_{ii}$):

    $$
    \mathrm{KL}(p \| q) = \tfrac12 \Big[\sum_i \phi\!\big(\sigma_i^2 / L_{ii}^2\big)
        + \sum_i \sigma_i^2 \sum_{j > i} M_{ji}^2 + \|L^{-1}(\mu_q - \mu_p)\|^2\Big]
    $$

    since $\operatorname{tr}(\Sigma_q^{-1}\operatorname{diag}\sigma^2)
    = \|L^{-1}\operatorname{diag}\sigma\|_F^2$ and
    $\log\det\Sigma_q - \log\det\Sigma_p = -\sum_i \log(\sigma_i^2 / L_{ii}^2)$. Every
    term is non-negative. $L^{-1}$ is one triangular solve per unbroadcast batch element
    of `q`; the rest costs O(D) per pair plus the Mahalanobis solve.

    Source: Rasmussen & Williams (2006), GPML, eq. (A.23), regrouped; the same quantity as
    torch.distributions.kl._kl_multivariatenormal_multivariatenormal on the dense pair.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    assert isinstance(q, MultivariateNormal)  # dispatch is by type
    base = _checked_diagonal(p, q, "p")
    L = scale_tril(q)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
    L_inv = torch.linalg.solve_triangular(L, eye, upper=False)
    off_diag = L_inv.tril(-1).square().sum(-2)  # sum_{j>i} M_ji^2
    var = base.scale.square()
    log_ratio = 2.0 * torch.log(base.scale / _diag(L))  # log(sigma_i^2 / L_ii^2)
    spread = (_phi_of_log(log_ratio) + var * off_diag).sum(-1)
    mahalanobis = batch_mahalanobis(L, q.loc - p.mean)
    return 0.5 * (spread + mahalanobis)


@register_kl(MultivariateNormal, Independent, kind="exact", on_conflict="skip")
def _kl_multivariatenormal_independent(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats of a full-covariance Normal `p` from a diagonal Normal `q`.

    `p = MultivariateNormal(mu_p, scale_tril=L)`, `q = Independent(Normal(mu_q, sigma), 1)`.
    Only the diagonal of $\Sigma_p = L L^\top$ enters, so the cost is O(D^2) per
    unbroadcast batch element of `p` (row norms of `L`) and O(D) per pair:

    $$
    \mathrm{KL}(p \| q) = \tfrac12 \Big[\sum_i \phi\!\big(L_{ii}^2 / \sigma_i^2\big)
        + \sum_i \frac{\sum_{j < i} L_{ij}^2}{\sigma_i^2}
        + \sum_i \frac{(\mu_{q,i} - \mu_{p,i})^2}{\sigma_i^2}\Big]
    $$

    Every term is non-negative.

    Source: Rasmussen & Williams (2006), GPML, eq. (A.23), regrouped, with
    $(\Sigma_p)_{ii} = \sum_{j \le i} L_{ij}^2$.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    assert isinstance(p, MultivariateNormal)  # dispatch is by type
    base = _checked_diagonal(p, q, "q")
    L = scale_tril(p)
    off_diag = L.tril(-1).square().sum(-1)  # sum_{j<i} L_ij^2
    inv_var = base.scale.square().reciprocal()
    log_ratio = 2.0 * torch.log(_diag(L) / base.scale)  # log(L_ii^2 / sigma_i^2)
    spread = (_phi_of_log(log_ratio) + off_diag * inv_var).sum(-1)
    mahalanobis = ((q.mean - p.loc).square() * inv_var).sum(-1)
    return 0.5 * (spread + mahalanobis)


@register_kl(Independent, LowRankMultivariateNormal, kind="exact", on_conflict="skip")
def _kl_independent_lowrankmultivariatenormal(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats of a diagonal Normal `p` from a low-rank-plus-diagonal Normal `q`.

    `p = Independent(Normal(mu_p, sigma), 1)`, `q` with covariance
    $W W^\top + \operatorname{diag}(d)$, $W \in \mathbb{R}^{D \times r}$. With
    $\tilde W = \operatorname{diag}(d)^{-1/2} W$ (rows $\tilde w_i$) and the capacitance
    $C = I_r + \tilde W^\top \tilde W$, Woodbury gives
    $(\Sigma_q^{-1})_{ii} = (1 - x_i)/d_i$ with
    $x_i = \tilde w_i^\top C^{-1} \tilde w_i \in [0, 1)$, and the determinant lemma
    $\log\det\Sigma_q = \log\det C + \sum_i \log d_i$. With
    $a_i = \sigma_i^2 (1 - x_i) / d_i$:

    $$
    \mathrm{KL}(p \| q) = \tfrac12 \Big[\sum_i \phi(a_i)
        + \Big(\log\det C + \sum_i \log(1 - x_i)\Big)
        + (\mu_q - \mu_p)^\top \Sigma_q^{-1} (\mu_q - \mu_p)\Big]
    $$

    The bracketed term is $\log\det\Sigma_q - \sum_i \log(\Sigma_q^{-1})_{ii}^{-1} \ge 0$
    (Hadamard). Cost O(D r^2) per unbroadcast batch element of `q`, O(D r) per pair.

    Source: Rasmussen & Williams (2006), GPML, eq. (A.23) with the Woodbury identity and matrix
    determinant lemma, eqs. (A.9)-(A.10), as in
    torch.distributions.kl._kl_lowrankmultivariatenormal_lowrankmultivariatenormal.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    assert isinstance(q, LowRankMultivariateNormal)  # dispatch is by type
    base = _checked_diagonal(p, q, "p")
    W, d = lowrank_factors(q)
    C_tril = capacitance_tril(q)
    d_rsqrt = d.rsqrt()
    W_tilde = W * d_rsqrt.unsqueeze(-1)
    row_sq = W_tilde.square().sum(-1)  # ||w_i||^2
    A = torch.linalg.solve_triangular(C_tril, W_tilde.mT, upper=False)  # C_tril^-1 W~^T, (r, D)
    log1m_x = _log1m_leverage(W_tilde, A, row_sq)
    hadamard_gap = _log_det_capacitance(W_tilde, C_tril) + log1m_x.sum(-1)
    log_a = torch.log(base.scale.square() / d) + log1m_x
    # Woodbury: delta^T Sigma_q^-1 delta = ||delta~||^2 - ||A delta~||^2, delta~ = d^-1/2 delta
    delta = (q.loc - p.mean) * d_rsqrt
    mahalanobis = delta.square().sum(-1) - (delta.unsqueeze(-2) @ A.mT).squeeze(-2).square().sum(-1)
    return 0.5 * (_phi_of_log(log_a).sum(-1) + hadamard_gap + mahalanobis)


@register_kl(LowRankMultivariateNormal, Independent, kind="exact", on_conflict="skip")
def _kl_lowrankmultivariatenormal_independent(p: Distribution, q: Distribution) -> Tensor:
    r"""KL(p || q) in nats of a low-rank-plus-diagonal Normal `p` from a diagonal Normal `q`.

    `p` with covariance $W W^\top + \operatorname{diag}(d)$,
    `q = Independent(Normal(mu_q, sigma), 1)`. With $n_i = \|w_i\|^2 / d_i$ (row `i`
    of `W`), $(\Sigma_p)_{ii} = d_i (1 + n_i)$, $a_i = d_i (1 + n_i) / \sigma_i^2$
    and the capacitance $C = I_r + W^\top \operatorname{diag}(d)^{-1} W$:

    $$
    \mathrm{KL}(p \| q) = \tfrac12 \Big[\sum_i \phi(a_i)
        + \Big(\sum_i \log(1 + n_i) - \log\det C\Big)
        + \sum_i \frac{(\mu_{q,i} - \mu_{p,i})^2}{\sigma_i^2}\Big]
    $$

    The bracketed term is $\sum_i \log(\Sigma_p)_{ii} - \log\det\Sigma_p \ge 0$ (Hadamard).
    Cost O(D r) per pair, reusing the capacitance factor `p` already holds.

    Source: Rasmussen & Williams (2006), GPML, eq. (A.23) with the matrix determinant lemma,
    eq. (A.10), as in torch.distributions.lowrank_multivariate_normal.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    assert isinstance(p, LowRankMultivariateNormal)  # dispatch is by type
    base = _checked_diagonal(p, q, "q")
    W, d = lowrank_factors(p)
    W_tilde = W * d.rsqrt().unsqueeze(-1)
    log1p_n = torch.log1p(W_tilde.square().sum(-1))
    hadamard_gap = log1p_n.sum(-1) - _log_det_capacitance(W_tilde, capacitance_tril(p))
    log_a = torch.log(d / base.scale.square()) + log1p_n
    mahalanobis = ((q.mean - p.loc) / base.scale).square().sum(-1)
    return 0.5 * (_phi_of_log(log_a).sum(-1) + hadamard_gap + mahalanobis)
