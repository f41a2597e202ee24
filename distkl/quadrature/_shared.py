r"""`KL(p_i || q)` in nats for many scalar Normals `p_i` against one shared scalar Gaussian mixture.

A Bayesian network with a scale-mixture prior (Blundell et al., 2015) needs this for every
weight at every step: $10^6$ posteriors $p_i = \mathcal N(\mu_i, \sigma_i^2)$, one prior
$q = \sum_j v_j \mathcal N(\nu_j, \tau_j^2)$. With $W$ the widest component of q,

$$
\mathrm{KL}(p_i \| q) = -H(p_i) - \mathbb E_{p_i}[\ell_W] - \mathbb E_{p_i}[G],
\qquad G(x) = \log\Bigl(1 + \sum_{j \ne W} e^{\ell_j(x) - \ell_W(x)}\Bigr) \ge 0,
$$

$\ell_j = \log v_j + \log\mathcal N(\cdot; \nu_j, \tau_j^2)$. The first two terms are closed
form. $G$ depends on the prior only and vanishes (below $e^{-46}$) outside a bounded support
$S$, because $\ell_j - \ell_W$ is a downward parabola. $\mathbb E_{p_i}[G]$ is computed by one of
two rules per weight, each used where it is accurate:

* **Gauss-Hermite** with `GH_NODES` nodes on $p_i$ when $G$ is smooth on the scale of
  $\sigma_i$ around $\mu_i$: every singularity of $G$ (near a crossing $r$ of two components
  with width $\delta$, at $r \pm i\pi\delta$; near a component, within $\tau_j$) lies at least
  `KAPPA` $\sigma_i$ from $\mu_i$. Narrow posteriors, and those far from $S$, take it.
* **Product integration on shared cells** otherwise. $S$ is cut into $2^l$ equal cells
  (level $l$ chosen per weight so that a cell is at most $2\sigma_i$ wide); on each cell the
  Gaussian density of $p_i$ is replaced by its polynomial interpolant at `CELL_NODES`
  Gauss-Legendre nodes, and the integrals of $G$ against that interpolant's basis, the
  *product weights*, are computed once per call from the prior alone by a fine composite rule
  that resolves every crossing. Only the cells within `WINDOW` $\sigma_i$ of $\mu_i$ are used.

Weights whose window misses $S$ get $\mathbb E_{p_i}[G] = 0$. Per weight the cost is a fixed
number of Gaussian densities, not a quadrature of $\log q$ with breakpoints of its own.

**Accuracy** (float64; `tests/test_quadrature.py`): against the 512-node composite rule, worst
relative error below 1e-9 on Blundell's prior and on random shared priors (see the tests for the
measured values).

Source: product integration, Davis & Rabinowitz, *Methods of Numerical Integration* (1984),
sec. 2.5; Gauss-Hermite quadrature, ibid. sec. 3.6; Legendre discrete orthogonality, Abramowitz
& Stegun 25.4.29.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from distkl._torch_compat import first_order_backward
from distkl.quadrature._rule import crossing_points, legendre

__all__ = ["shared_prior_applies", "kl_normal_shared_mixture", "MIN_BATCH"]

#: Fewest posteriors for which the shared-prior rule is used (below: the per-pair rule).
MIN_BATCH = 4096
#: G below exp(-SUPPORT_LOG) outside its support.
SUPPORT_LOG = 46.0
#: Gauss-Hermite when every singularity of G is at least KAPPA sigma away.
KAPPA = 10.0
GH_NODES = 16
#: Cells within WINDOW sigma of the mean (p's mass beyond: 2.6e-12).
WINDOW = 7.0
CELL_NODES = 12
#: A cell is at most 2^CELL_SIGMAS_LOG2 sigma wide (and more than half that).
CELL_SIGMAS_LOG2 = 1
#: Gauss-Legendre nodes per interval of the fine rule that builds the product weights.
FINE_NODES = 16
#: Breakpoints of the fine rule around a crossing, in widths.
FEATURE_OFFSETS = (-30.0, -10.0, -3.0, -1.0, 0.0, 1.0, 3.0, 10.0, 30.0)
#: Deepest level (2^MAX_LEVEL cells); weights needing a finer one use the per-pair rule.
MAX_LEVEL = 14
_LOG_2PI = math.log(2.0 * math.pi)
_GH_T, _GH_W = np.polynomial.hermite.hermgauss(GH_NODES)


def shared_prior_applies(mu: Tensor) -> bool:
    """True when the rule can take the call: eager mode and at least `MIN_BATCH` posteriors
    (the caller checks that the prior is one, of batch shape `()` or its equivalent)."""
    return not torch.compiler.is_compiling() and mu.numel() >= MIN_BATCH


def kl_normal_shared_mixture(
    mu: Tensor, sigma: Tensor, log_v: Tensor, nu: Tensor, tau: Tensor
) -> Optional[Tensor]:
    r"""`KL(N(mu_i, sigma_i^2) || q)` for `mu, sigma` of shape `(N,)` and one prior `(K,)`.

    float64 in, float64 out. Returns None when the rule does not apply (two components share the
    widest scale, so G does not vanish in the tails; a non-finite or non-positive parameter; a
    weight needing a level deeper than `MAX_LEVEL`): the caller then uses the per-pair rule.
    """
    if not (torch.isfinite(nu).all() and (tau > 0).all() and torch.isfinite(tau).all()):
        return None
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all() and (sigma > 0).all()):
        return None
    lv_, tau_ = log_v.detach().tolist(), tau.detach().tolist()
    if any(math.isnan(v) for v in lv_):
        return None
    live = [j for j in range(len(tau_)) if lv_[j] > -math.inf]  # weight-0 components drop
    w = max(live, key=lambda j: tau_[j])  # the widest component of non-zero weight
    others = [j for j in live if j != w]
    if any(tau_[j] >= tau_[w] for j in others):  # G would not vanish in the tails
        return None
    closed = _closed_form(mu, sigma, log_v[w], nu[w], tau[w])
    support = _support(log_v, nu, tau, w, others)
    if support is None:  # q is its widest component (the others are below e^-46 everywhere)
        return closed.clamp(min=0.0)
    g = _expected_g(mu, sigma, log_v, nu, tau, w, others, support)
    if g is None:
        return None
    return (closed - g).clamp(min=0.0)


def _closed_form(mu: Tensor, sigma: Tensor, log_vw: Tensor, nu_w: Tensor, tau_w: Tensor) -> Tensor:
    r"""$-H(p) - \mathbb E_p[\ell_W]$: KL to the widest component, less $\log v_W$."""
    entropy = 0.5 * (1.0 + _LOG_2PI) + sigma.log()
    cross = (
        log_vw
        - tau_w.log()
        - 0.5 * _LOG_2PI
        - 0.5 * ((mu - nu_w).square() + sigma.square()) / tau_w.square()
    )
    return -entropy - cross


def _log_ratio(
    x: Tensor, log_v: Tensor, nu: Tensor, tau: Tensor, w: int, others: list[int]
) -> Tensor:
    r"""$\ell_j(x) - \ell_W(x)$ for $j$ in `others`: shape `(*x.shape, len(others))`."""
    idx = torch.tensor(others, device=x.device)
    lv, m, s = log_v[idx], nu[idx], tau[idx]
    zj = (x.unsqueeze(-1) - m) / s
    zw = ((x - nu[w]) / tau[w]).unsqueeze(-1)
    return (lv - s.log()) - (log_v[w] - tau[w].log()) - 0.5 * (zj - zw) * (zj + zw)


def _g(x: Tensor, log_v: Tensor, nu: Tensor, tau: Tensor, w: int, others: list[int]) -> Tensor:
    """`G(x) = log(1 + sum_j exp(l_j - l_W))`, elementwise in `x`."""
    return _log1p_sum_exp(_log_ratio(x, log_v, nu, tau, w, others))[0]


def _log1p_sum_exp(d: Tensor) -> tuple[Tensor, Tensor]:
    r"""`(log(1 + sum_j e^{d_j}), e^{d_j} / (1 + sum e^d))` over the last dimension.

    Exponents are clamped at -700 (`exp` of a very negative float64 is ten times slower on CPU,
    and $e^{-700}$ is below every other term's rounding)."""
    if d.shape[-1] == 1:  # two components: a softplus, and its derivative a sigmoid
        d0 = d[..., 0]
        tail = (-d0.abs()).clamp(min=-700.0).exp().log1p()
        return d0.clamp(min=0.0) + tail, torch.sigmoid(d)
    full = torch.cat([torch.zeros_like(d[..., :1]), d], -1)
    top = full.amax(-1, keepdim=True)
    e = (full - top).clamp(min=-700.0).exp()
    total = e.sum(-1, keepdim=True)
    return (top + total.log()).squeeze(-1), e[..., 1:] / total


def _support(
    log_v: Tensor, nu: Tensor, tau: Tensor, w: int, others: list[int]
) -> Optional[tuple[float, float, list[tuple[float, float]]]]:
    """`(lo, hi, features)`: where G exceeds e^-46, and its singular points `(x, width)`."""
    lv, m, s = (t.detach().double().cpu().numpy() for t in (log_v, nu, tau))
    lo, hi = math.inf, -math.inf
    for j in others:
        a = 0.5 / s[w] ** 2 - 0.5 / s[j] ** 2  # < 0
        b = m[j] / s[j] ** 2 - m[w] / s[w] ** 2
        c = (
            lv[j]
            - lv[w]
            - math.log(s[j] / s[w])
            - 0.5 * m[j] ** 2 / s[j] ** 2
            + 0.5 * m[w] ** 2 / s[w] ** 2
        )
        disc = b * b - 4.0 * a * (c + SUPPORT_LOG)
        if disc <= 0:
            continue
        r = math.sqrt(disc)
        lo, hi = min(lo, (-b + r) / (2 * a)), max(hi, (-b - r) / (2 * a))
    if not lo < hi:
        return None
    lo, hi = float(lo), float(hi)  # Python floats: numpy scalars would make float32 tensors
    roots, widths = crossing_points(log_v.detach(), nu.detach(), tau.detach())
    feats = [(float(x), float(d)) for x, d in zip(roots.tolist(), widths.tolist()) if x == x]
    feats += [(float(m[j]), float(s[j])) for j in others]
    return lo, hi, [(x, d) for x, d in feats if lo - 30 * d < x < hi + 30 * d]


def _expected_g(mu, sigma, log_v, nu, tau, w, others, support) -> Optional[Tensor]:
    """`E_{p_i}[G]`, `(N,)`: Gauss-Hermite where G is smooth on p's scale, product weights else."""
    lo, hi, feats = support
    span = hi - lo
    out = torch.zeros_like(mu)
    touches = (mu + WINDOW * sigma > lo) & (mu - WINDOW * sigma < hi)
    fx = torch.tensor([f[0] for f in feats], dtype=mu.dtype, device=mu.device)
    fw = torch.tensor([math.pi * f[1] for f in feats], dtype=mu.dtype, device=mu.device)
    with torch.no_grad():
        dist = ((mu.unsqueeze(-1) - fx).square() + fw.square()).sqrt().amin(-1)
        smooth = dist >= KAPPA * sigma
    gh = (touches & smooth).nonzero().squeeze(-1)
    if gh.numel():
        out = out.index_put((gh,), _gauss_hermite(mu[gh], sigma[gh], log_v, nu, tau, w, others))
    rest = (touches & ~smooth).nonzero().squeeze(-1)
    if not rest.numel():
        return out
    level = (
        (torch.ceil(torch.log2(span / sigma[rest].detach())) - CELL_SIGMAS_LOG2).clamp(min=0).long()
    )
    deepest = int(level.max())
    if deepest > MAX_LEVEL:
        return None
    tables = _product_weights(log_v, nu, tau, w, others, lo, span, feats, deepest)
    for lev in range(deepest + 1):
        idx = rest[level == lev]
        if idx.numel():
            val = _cells(mu[idx], sigma[idx], tables[lev], lo, span / 2**lev)
            out = out.index_put((idx,), val)
    return out


def _gauss_hermite(mu, sigma, log_v, nu, tau, w, others) -> Tensor:
    r"""$\sum_k w_k G(\mu + \sigma\sqrt2\,t_k)$, `CHUNK` weights at a time, with the gradients
    with respect to $\mu, \sigma$ in the same pass (`_GaussHermite`); the prior's parameters get
    theirs from a second, differentiable evaluation at detached nodes when they need one."""
    prior = (log_v, nu, tau)
    out = _GaussHermite.apply(mu, sigma, prior, w, others)
    if any(t.requires_grad for t in prior) and torch.is_grad_enabled():
        t, wt = _hermite(mu)
        x = mu.detach().unsqueeze(-1) + sigma.detach().unsqueeze(-1) * t
        through_prior = (_g(x, log_v, nu, tau, w, others) * wt).sum(-1)
        out = out + (through_prior - through_prior.detach())
    return out


def _hermite(like: Tensor) -> tuple[Tensor, Tensor]:
    r"""Gauss-Hermite nodes scaled for $\mathcal N(0, 1)$ and their weights (sum 1)."""
    t = torch.tensor(_GH_T * math.sqrt(2.0), dtype=like.dtype, device=like.device)
    wt = torch.tensor(_GH_W / math.sqrt(math.pi), dtype=like.dtype, device=like.device)
    return t, wt


class _GaussHermite(torch.autograd.Function):
    r"""Value and $\partial/\partial\mu$, $\partial/\partial\sigma$ of the Gauss-Hermite sum."""

    @staticmethod
    def forward(ctx, mu, sigma, prior, w, others):
        log_v, nu, tau = (p.detach() for p in prior)
        prec = tau.square().reciprocal()
        t, wt = _hermite(mu)
        out, d_mu, d_sigma = (torch.empty_like(mu) for _ in range(3))
        for i in range(0, mu.shape[0], CHUNK):
            x = mu[i : i + CHUNK, None] + sigma[i : i + CHUNK, None] * t
            g, resp = _log1p_sum_exp(_log_ratio(x, log_v, nu, tau, w, others))
            slope = (x.unsqueeze(-1) - nu[others]) * prec[others] - (
                (x - nu[w]) * prec[w]
            ).unsqueeze(-1)
            dg = -(resp * slope).squeeze(-1) if len(others) == 1 else -(resp * slope).sum(-1)
            dg = dg * wt
            out[i : i + CHUNK] = (g * wt).sum(-1)
            d_mu[i : i + CHUNK] = dg.sum(-1)
            d_sigma[i : i + CHUNK] = (dg * t).sum(-1)
        ctx.save_for_backward(d_mu, d_sigma)
        return out

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        d_mu, d_sigma = ctx.saved_tensors
        return grad * d_mu, grad * d_sigma, None, None, None


def _legendre_values(t: Tensor, n: int) -> Tensor:
    """`P_0(t), ..., P_{n-1}(t)`: shape `(*t.shape, n)` (Bonnet's recurrence)."""
    out = [torch.ones_like(t), t]
    for k in range(1, n - 1):
        out.append(((2 * k + 1) * t * out[k] - k * out[k - 1]) / (k + 1))
    return torch.stack(out[:n], -1)


def _product_weights(log_v, nu, tau, w, others, lo, span, feats, deepest) -> list[Tensor]:
    r"""Per level $l \le$ `deepest`: `(2^l, CELL_NODES)` weights $\omega_{c,i} =
    \int_{\text{cell } c} G(x) L_i(x)\,dx$, $L_i$ the Lagrange basis at the cell's nodes.

    From Legendre moments $m_{c,k} = \int_c G\,P_k$ by the fine rule, and
    $L_i = \sum_k \tfrac{2k+1}{2} w_i P_k(s_i) P_k$ (discrete orthogonality of the rule)."""
    dt, dev = nu.dtype, nu.device
    n_fine = 2**deepest
    edges = [lo + span * k / n_fine for k in range(n_fine + 1)]
    for x, d in feats:
        edges += [x + c * d for c in FEATURE_OFFSETS if lo < x + c * d < lo + span]
    pts = torch.tensor(sorted(set(edges)), dtype=dt, device=dev)
    ft, fw = (torch.tensor(v, dtype=dt, device=dev) for v in legendre(FINE_NODES))
    half = 0.5 * (pts[1:] - pts[:-1])
    mid = 0.5 * (pts[1:] + pts[:-1])
    x = (mid.unsqueeze(-1) + half.unsqueeze(-1) * ft).flatten()
    gw = _g(x, log_v, nu, tau, w, others) * (half.unsqueeze(-1) * fw).flatten()
    mid_x = mid.repeat_interleave(FINE_NODES)
    s, sw = (torch.tensor(v, dtype=dt, device=dev) for v in legendre(CELL_NODES))
    k = torch.arange(CELL_NODES, dtype=dt, device=dev)
    basis = (k + 0.5).unsqueeze(-1) * _legendre_values(s, CELL_NODES).T * sw  # (k, i)
    tables = []
    for lev in range(deepest + 1):
        h = span / 2**lev
        cell = ((mid_x - lo) / h).floor().clamp(0, 2**lev - 1).long()
        t = 2.0 * (x - (lo + h * cell.to(dt))) / h - 1.0
        moments = torch.zeros(2**lev, CELL_NODES, dtype=dt, device=dev)
        moments = moments.index_add(0, cell, gw.unsqueeze(-1) * _legendre_values(t, CELL_NODES))
        tables.append(moments @ basis)
    return tables


def _cells(mu: Tensor, sigma: Tensor, table: Tensor, lo: float, h: float) -> Tensor:
    r"""$\sum_{c, i} \omega_{c,i}\,\mathcal N(x_{c,i}; \mu, \sigma^2)$ over the cells of the
    window, `(B,)`, with analytic gradients (`_CellSum`), `CHUNK` weights at a time."""
    return _CellSum.apply(mu, sigma, table, lo, h)


#: Weights per chunk of the cell sum (keeps its `(chunk, cells, nodes)` tensors in cache).
CHUNK = 2048


def _window(
    mu: Tensor, sigma: Tensor, ncells: int, lo: float, h: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The window's cells `(B, count)` and the nodes in p's standard units,
    `u = a[..., None] + b[:, None, None] * s`: `(cells, a (B, count), b (B,))`."""
    count = min(ncells, int(math.ceil(2 * WINDOW / 2.0**CELL_SIGMAS_LOG2 * 2)) + 2)  # cell > h/2
    start = ((mu - WINDOW * sigma - lo) / h).floor().clamp(0, ncells - count).long()
    cells = start.unsqueeze(-1) + torch.arange(count, device=mu.device)
    inv = sigma.reciprocal()
    a = (lo + h * cells.to(mu.dtype) - mu.unsqueeze(-1)) * inv.unsqueeze(-1)  # cell start
    return cells, a, h * inv


def _unit_nodes(like: Tensor) -> Tensor:
    """The cell nodes on `[0, 1]`, `(CELL_NODES,)`."""
    s = torch.tensor(legendre(CELL_NODES)[0], dtype=like.dtype, device=like.device)
    return 0.5 * (s + 1.0)


class _CellSum(torch.autograd.Function):
    """The cell sum and its derivatives in one pass; the table's gradient is recomputed."""

    @staticmethod
    def forward(ctx, mu, sigma, table, lo, h):
        out, d_mu, d_sigma = (torch.empty_like(mu) for _ in range(3))
        unit = _unit_nodes(mu)
        for i in range(0, mu.shape[0], CHUNK):
            m, sd = mu[i : i + CHUNK], sigma[i : i + CHUNK]
            cells, a, b = _window(m, sd, table.shape[0], lo, h)
            u = a.unsqueeze(-1) + b[:, None, None] * unit  # (B, count, n)
            we = u.square().mul_(-0.5).exp_().mul_(table[cells])
            s0 = we.sum((-1, -2))
            we.mul_(u)
            s1 = we.sum((-1, -2))
            s2 = we.mul_(u).sum((-1, -2))
            norm = sd.reciprocal() / math.sqrt(2.0 * math.pi)
            out[i : i + CHUNK] = norm * s0
            d_mu[i : i + CHUNK] = norm * s1 / sd
            d_sigma[i : i + CHUNK] = norm * (s2 - s0) / sd
        ctx.save_for_backward(mu, sigma, table, d_mu, d_sigma)
        ctx.lo, ctx.h = lo, h
        return out

    @staticmethod
    @first_order_backward
    def backward(ctx, grad):
        mu, sigma, table, d_mu, d_sigma = ctx.saved_tensors
        grad_table = None
        if ctx.needs_input_grad[2]:
            grad_table = torch.zeros_like(table)
            for i in range(0, mu.shape[0], CHUNK):
                m, sd, g = mu[i : i + CHUNK], sigma[i : i + CHUNK], grad[i : i + CHUNK]
                cells, a, b = _window(m, sd, table.shape[0], ctx.lo, ctx.h)
                u = a.unsqueeze(-1) + b[:, None, None] * _unit_nodes(m)
                scale = g / (sd * math.sqrt(2.0 * math.pi))
                dens = u.square().mul_(-0.5).exp_().mul_(scale[:, None, None])
                grad_table.index_add_(0, cells.flatten(), dens.flatten(0, 1))
        return grad * d_mu, grad * d_sigma, grad_table, None, None
