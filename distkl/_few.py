r"""KL(p || q) for a diagonal Normal p against a diagonal Gaussian mixture q at few samples, as
one autograd node with a hand-written backward.

This is `distkl._pathwise`'s estimator without the matched-component control, for the sizes of
a training step (a batch of about a hundred pairs, a handful of samples, `K * D` up to about a
thousand). There a step's time is the number of tensor operations, not their size, so the
whole estimate is one `torch.autograd.Function`: its forward pass runs without recording a
graph, and its backward pass is the closed-form gradient below (about twenty operations
against the ~60 nodes that autograd would record and replay).

Per unit $u$ (a sample $z_u = \mu + \sigma \epsilon_u$, or an antithetic pair's average) the
estimate is

$$
-H(p) - \log q(z_u) - \gamma_u\, c_1(\epsilon_u), \qquad
c_1 = \log p(z_u) + H(p) = \tfrac12 (D - \|\epsilon_u\|^2),
$$

with $\gamma_u$ the leave-one-out regression coefficient of $-\log q(z) - b$ on $c_1$
(`distkl._stats.loo_one`), centred per pair on
$b = -\log \sum_k v_k \exp \mathbb{E}_p[\log q_k]$ (closed form per component; exact when q is
one Gaussian). The coefficient and the control carry no gradient ($c_1$ is a function of the
standard noise only), so the gradient is that of $-H(p) - \log q(z)$: with responsibilities
$r_k = v_k q_k(z) / q(z)$ and $u_k = (z - m_k) / s_k$,

$$
\frac{\partial (-\log q)}{\partial z} = \sum_k r_k \frac{u_k}{s_k},\quad
\frac{\partial (-\log q)}{\partial m_k} = -r_k \frac{u_k}{s_k},\quad
\frac{\partial (-\log q)}{\partial s_k} = -r_k \frac{u_k^2 - 1}{s_k},\quad
\frac{\partial (-\log q)}{\partial \log v_k} = -r_k,\quad
\frac{\partial (-H)}{\partial \sigma} = -\frac{1}{\sigma}.
$$

The node takes the distributions' own parameters: fresh samples are drawn inside it,
$z = \mu + \sigma \epsilon$, so $\partial/\partial \mu = \sum \partial/\partial z$ and
$\partial/\partial \sigma = \sum \epsilon\, \partial/\partial z - 1/\sigma$, and no view or
intermediate of them adds a node to the graph (shared samples take the gradient through the
caller's $z$ instead). The baseline's components at $\mu$ ride along as one more row of the
samples' computation, so one `logsumexp` serves both. A backward pass that builds a graph
(`create_graph=True`) recomputes the value with ordinary differentiable operations and
differentiates that, so second derivatives are exact; under `torch.compile` the ordinary
operations are used throughout (the compiler fuses them itself). NaN parameters give NaN in the
elements they reach and are left out of the pooled fit; a zero-weight component has $r_k = 0$
and gets no gradient.

Source: the estimator, Owen (2013), "Monte Carlo theory, methods and examples", ch. 8.9
(regression control variates); the analytic entropy, Kingma & Welling (2014), "Auto-encoding
variational Bayes", eq. (10).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from distkl._diagonal import plain_mixture_log_prob
from distkl._stats import loo_one, t_stderr

__all__ = ["FewSpec", "few_diagonal"]

_LOG_2PI = math.log(2 * math.pi)


@dataclass
class FewSpec:
    """What `few_diagonal` needs besides the differentiable inputs.

    Attributes:
        eps: the standard noise `(n, *batch_p, D)` of the samples (detached).
        pad: leading ones that align p's batch with the output batch.
        batch_p: p's batch shape.
        paired: units are antithetic pairs (sample `i` and `i + n / 2`).
        fit: fit the coefficient (else the naive weight, `gamma = -1`).
        stderr: compute the standard error (set on `se` by the call).
    """

    eps: Tensor
    pad: tuple[int, ...]
    batch_p: torch.Size
    paired: bool
    fit: bool
    stderr: bool
    se: Optional[Tensor] = field(default=None, init=False)


def few_diagonal(
    mu: Tensor,
    sigma: Tensor,
    z: Optional[Tensor],
    log_weights: Tensor,
    loc: Tensor,
    scale: Tensor,
    spec: FewSpec,
) -> Tensor:
    """The estimate `(*batch)` (differentiable); the standard error lands on `spec.se`.

    Args:
        mu, sigma: p's means and scales `(*batch_p, D)`.
        z: the caller's samples `(n, *pad, *batch_p, D)` (the pathwise gradient flows through
            them), or None for `mu + sigma * spec.eps`, drawn inside (the gradient flows into
            `mu` and `sigma`).
        log_weights, loc, scale: q's normalised log-weights `(*batch_q, K)`, means and scales
            `(*batch_q, K, D)`.
        spec: the rest (`FewSpec`).
    """
    if torch.compiler.is_compiling():  # the compiler fuses the plain operations itself
        return _plain(mu, sigma, z, log_weights, loc, scale, spec)
    return _FewDiagonal.apply(mu, sigma, z, log_weights, loc, scale, spec)


def _samples(mu: Tensor, sigma: Tensor, spec: FewSpec) -> Tensor:
    """`mu + sigma * eps` of shape `(n, *pad, *batch_p, D)`."""
    z = torch.addcmul(mu, sigma, spec.eps)
    return z.reshape(z.shape[0], *spec.pad, *z.shape[1:])


def _entropy(sigma: Tensor, spec: FewSpec, log_2pi: float = _LOG_2PI) -> Tensor:
    """H(p) `(*pad, *batch_p)` (with `log_2pi` in place of log 2 pi: the constant shifted)."""
    d = sigma.shape[-1]
    ent = sigma.log().sum(-1) + 0.5 * d * (1.0 + log_2pi)
    return ent.reshape((*spec.pad, *ent.shape))


def _offset(t: Tensor, lq: Tensor, spec: FewSpec) -> Tensor:
    r"""$-\frac1m \sum_u \gamma_u c_{1u}$ `(*batch)` (the naive weight without `spec.fit`),
    from the target `t` (`-log q(z)` less the baseline; `lq` when not fitting), without
    gradient; sets `spec.se` when asked."""
    eps = spec.eps
    n, d = eps.shape[0], eps.shape[-1]
    with torch.no_grad():
        c1 = torch.rsub(eps.square().sum(-1), 0.5 * d, alpha=0.5)  # log p(z) + H(p)
        c1 = c1.reshape(n, *spec.pad, *c1.shape[1:])
        if spec.paired:  # units: pairs (z, mirrored z)
            h = n // 2
            t, c1 = 0.5 * (t[:h] + t[h:]), 0.5 * (c1[:h] + c1[h:])
        if spec.fit:
            correction = torch.mul(loo_one(t, c1, spec.batch_p, spec.pad)[..., 0], c1).neg_()
        else:  # the naive estimate log p(z) - log q(z) = c1 - H - log q
            correction = c1
        if spec.stderr:
            y = -lq if not spec.paired else -0.5 * (lq[: n // 2] + lq[n // 2 :])
            spec.se = t_stderr(y + correction, t.shape[0])
        return _mean0(correction)


def _mean0(x: Tensor) -> Tensor:
    """`x.mean(0)` in one operation (none for one row)."""
    return x[0] if x.shape[0] == 1 else x.sum(0).div_(x.shape[0])


def _plain(
    mu: Tensor,
    sigma: Tensor,
    z: Optional[Tensor],
    log_weights: Tensor,
    loc: Tensor,
    scale: Tensor,
    spec: FewSpec,
) -> Tensor:
    """The estimate with ordinary differentiable operations (compiled, or for a graph)."""
    if z is None:
        z = _samples(mu, sigma, spec)
    lq = plain_mixture_log_prob(z, log_weights, loc, scale)  # (n, *batch)
    t = lq
    if spec.fit:
        with torch.no_grad():
            mu = mu.reshape(*spec.pad, *mu.shape).unsqueeze(-2)
            var_p = sigma.reshape(mu.shape).square()
            inv = scale.reciprocal()
            # log v_k + E_p[log q_k], (*batch, K)
            expected = (
                log_weights
                - scale.log().sum(-1)
                - 0.5 * (((mu - loc) * inv).square() + var_p * inv.square()).sum(-1)
            )
            t = torch.logsumexp(expected, -1) - 0.5 * scale.shape[-1] * _LOG_2PI - lq
    return _offset(t, lq, spec) - lq.mean(0) - _entropy(sigma, spec)


class _FewDiagonal(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        mu: Tensor,
        sigma: Tensor,
        z: Optional[Tensor],
        log_weights: Tensor,
        loc: Tensor,
        scale: Tensor,
        spec: FewSpec,
    ) -> Tensor:
        zz = _samples(mu, sigma, spec) if z is None else z  # (n, *pad, *batch_p, D)
        n, d = zz.shape[0], zz.shape[-1]
        inv = scale.reciprocal()
        lwn = torch.sub(log_weights, scale.log().sum(-1))  # log v_k - log |S_k|^(1/2)
        rows = zz
        if spec.fit:  # one more row: p's mean, for the baseline
            rows = torch.cat([zz, mu.reshape(1, *spec.pad, *mu.shape)])
        u = (rows.unsqueeze(-2) - loc) * inv  # (n [+ 1], *batch, K, D)
        ones = torch.ones(d, dtype=u.dtype, device=u.device)  # sums over D by matrix products:
        a = torch.add(lwn, u.square() @ ones, alpha=-0.5)  # faster than short inner reductions
        if spec.fit:  # E_p[log q_k] = log q_k(mu) - tr(Sigma_p S_k^-1) / 2
            var_p = sigma.square().unsqueeze(-2)  # (*batch_p, 1, D)
            a[n].sub_(torch.matmul(var_p, inv.square().mT).squeeze(-2), alpha=0.5)
        lse = torch.logsumexp(a, -1)  # log v q + D/2 log 2 pi: (n [+ 1], *batch)
        lq = lse[:n]
        # the target -log q(z) - baseline; the constants D/2 log 2 pi cancel
        offset = _offset(lse[n] - lq if spec.fit else lq, lq, spec)
        ctx.save_for_backward(mu, sigma, z, log_weights, loc, scale, inv, u, a, lse)
        ctx.spec = spec
        # -log q = -(lse - D/2 log 2 pi); -H(p) = -sum log sigma - D/2 (1 + log 2 pi)
        return (offset - _mean0(lq)).sub_(_entropy(sigma, spec, 0.0))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        mu, sigma, z, log_weights, loc, scale, inv, u, a, lse = ctx.saved_tensors
        spec: FewSpec = ctx.spec
        inputs = (mu, sigma, z, log_weights, loc, scale)
        needs = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the plain operations
            wanted = [t for t, need in zip(inputs, needs) if need]
            with torch.enable_grad():
                zz = _samples(mu, sigma, spec) if z is None else z
                lq = plain_mixture_log_prob(zz, log_weights, loc, scale)
                value = -lq.mean(0) - _entropy(sigma, spec)
                grads = iter(torch.autograd.grad(value, wanted, grad, create_graph=True))
            return (*(next(grads) if need else None for need in needs), None)
        need_mu, need_sigma, need_z, need_w, need_loc, need_scale = needs
        n = spec.eps.shape[0]
        u = u[:n]
        # responsibilities r_k times the incoming gradient over n: (n, *batch, K)
        g_n = grad if n == 1 else grad / n
        rw = (a[:n] - lse[:n].unsqueeze(-1)).exp_().mul_(g_n.unsqueeze(-1))
        g_mu = g_sigma = g_z = g_w = g_loc = g_scale = None
        pathwise = need_z or (z is None and (need_mu or need_sigma))
        t = None
        if pathwise or need_loc or need_scale:
            t = rw.unsqueeze(-1) * (u * inv)  # r_k u_k / s_k
        if pathwise:  # d(-log q)/dz = sum_k r_k u_k / s_k, (n, *pad, *batch_p, D)
            assert t is not None
            g_zz = t.sum(-2).sum_to_size(u.shape[:-2] + u.shape[-1:])
            g_zz = g_zz.sum_to_size(n, *spec.pad, *spec.batch_p, u.shape[-1])
            if z is not None:
                g_z = g_zz
            else:  # z = mu + sigma eps
                g_mu = g_zz.sum_to_size(mu.shape) if need_mu else None
                if need_sigma:
                    eps = spec.eps.reshape(g_zz.shape)
                    g_sigma = (g_zz * eps).sum_to_size(sigma.shape)
        if need_loc:
            assert t is not None
            g_loc = t.sum_to_size(loc.shape).neg_()
        s_rw = rw.sum_to_size(log_weights.shape) if need_w or need_scale else None
        if need_w:
            assert s_rw is not None
            g_w = s_rw.neg()
        if need_scale:
            assert t is not None and s_rw is not None
            if scale.shape[:-1] == log_weights.shape:  # r (u^2 - 1) / s = t u - r / s
                g_scale = (s_rw.unsqueeze(-1) * inv).sub_((t * u).sum_to_size(scale.shape))
            else:
                g_scale = (rw.unsqueeze(-1) * (1.0 - u.square()) * inv).sum_to_size(scale.shape)
        if need_sigma:  # -dH/dsigma = -1/sigma
            g = grad.sum_to_size(*spec.pad, *spec.batch_p).reshape(spec.batch_p)
            g_ent = g.unsqueeze(-1).div(sigma)
            g_sigma = g_ent.neg_() if g_sigma is None else g_sigma.sub_(g_ent)
        return g_mu, g_sigma, g_z, g_w, g_loc, g_scale, None
