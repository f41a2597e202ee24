"""Public quadrature functions: `kl_quadrature`, `jsd_quadrature`, `expect_1d`."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.distributions import Distribution

from distkl._checks import check_positive_int, check_skew
from distkl._gaussian import GaussianMixture
from distkl._logspace import binary_entropy
from distkl.quadrature._integrands import kl_bernoulli_logit, kl_integrand
from distkl.quadrature._normal import kl_normal_mixture_tensors
from distkl.quadrature._rule import (
    component_log_density,
    composite_rule,
    float64_pair,
    loc_scale,
    log_densities,
    scalar_mixture,
)
from distkl.quadrature._shared import kl_normal_shared_mixture, shared_prior_applies

__all__ = ["kl_quadrature", "kl_composite", "jsd_quadrature", "expect_1d"]


def kl_quadrature(p: Distribution, q: Distribution, *, nodes: int = 128) -> Tensor:
    r"""`KL(p || q)` in nats of scalar Gaussian mixtures, by composite Gauss-Legendre quadrature.

    $$
    \mathrm{KL}(p \| q) = \int p(x)\,\bigl(f(x) + e^{-f(x)} - 1\bigr)\,dx,
    \qquad f = \log p - \log q
    $$

    Deterministic and differentiable. When `p` is a single Normal, the upper envelope of
    `log q` is integrated in closed form and only the remainder by quadrature
    (`distkl/quadrature/_normal.py`). See the package docstring for the rules and their
    measured accuracy.

    Args:
        p: the first distribution.
        q: the second distribution, with the same event shape. Both are `Normal`,
            `MixtureSameFamily(Normal)`, or any Normal-family distribution (or mixture of
            them) whose event has a single element.
        nodes: quadrature nodes per mixture component (of `p` and of `q`); default 128.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        ValueError: different event shapes, or events with more than one element.
        NotImplementedError: a family other than the Normal family and its mixtures.

    Source: Gauss-Legendre quadrature (Davis & Rabinowitz, *Methods of Numerical Integration*,
    1984, sec. 2.7); the non-negative integrand uses $\int (q - p) = 0$.
    """
    nodes = check_positive_int("nodes", nodes)
    mp, mq, dtype = float64_pair(p, q)
    if mp.num_components == 1:  # one Normal p: closed-form envelope + remainder rule
        (mu, sigma), (nu, tau) = loc_scale(mp), loc_scale(mq)
        mu, sigma = mu[..., 0], sigma[..., 0]
        flat = mu.reshape(-1)
        if q.batch_shape.numel() == 1 and shared_prior_applies(flat):
            # Many posteriors, one prior (a Bayesian network): product weights shared by all.
            lv, loc, scale = (t.reshape(-1, t.shape[-1])[0] for t in (mq.log_weights, nu, tau))
            kl = kl_normal_shared_mixture(flat, sigma.reshape(-1), lv, loc, scale)
            if kl is not None:
                return kl.reshape(mu.shape).to(dtype)
        n = max(2, -(-nodes // 16))
        kl = kl_normal_mixture_tensors(mu, sigma, mq.log_weights, nu, tau, n=n)
        return kl.to(dtype)
    return _composite_kl(mp, mq, nodes).to(dtype)


def kl_composite(p: Distribution, q: Distribution, *, nodes: int = 128) -> Tensor:
    r"""`KL(p || q)` in nats by the composite Gauss-Legendre rule alone, whatever `p` is.

    [`kl_quadrature`][distkl.kl_quadrature] uses it unless `p` is a single Normal; with many `nodes`
    it is the high-order reference the single-Normal rule is tested against.

    Args:
        p: the first distribution.
        q: the second distribution; both as for [`kl_quadrature`][distkl.kl_quadrature].
        nodes: quadrature nodes per mixture component; default 128.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    nodes = check_positive_int("nodes", nodes)
    mp, mq, dtype = float64_pair(p, q)
    return _composite_kl(mp, mq, nodes).to(dtype)


def _composite_kl(mp: GaussianMixture, mq: GaussianMixture, nodes: int) -> Tensor:
    x, wts = _nodes_for(mp, mq, nodes)
    log_p, log_q, f = log_densities(x, mp, mq)
    return (wts * kl_integrand(f, log_p, log_q)).sum(-1)


def _nodes_for(mp: GaussianMixture, mq: GaussianMixture, nodes: int) -> tuple[Tensor, Tensor]:
    """The composite rule resolving every component and crossing of `p` and of `q`."""
    return composite_rule(nodes, (mp.log_weights, *loc_scale(mp)), (mq.log_weights, *loc_scale(mq)))


def jsd_quadrature(
    p: Distribution, q: Distribution, *, skew: float = 0.5, nodes: int = 128
) -> Tensor:
    r"""`JS_alpha(p, q)` in nats of scalar Gaussian mixtures, by composite Gauss-Legendre rules.

    $$
    \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m)
    = \int m(x)\,\mathrm{kl}\Bigl(\frac{\alpha p(x)}{m(x)} \Big\| \alpha\Bigr)\,dx,
    \quad m = \alpha p + (1-\alpha) q,
    $$

    with $\alpha$ = `skew` and $\mathrm{kl}$ the Bernoulli KL divergence. The
    integrand is non-negative, so the result lies in $[0, H(\alpha)]$; it is clamped to
    $H(\alpha)$ only where rounding would push it above.

    Args:
        p: the first distribution.
        q: the second distribution, with the same event shape; both as for
            [`kl_quadrature`][distkl.kl_quadrature].
        skew: $\alpha \in (0, 1)$, the weight of `p` in `m` (default 0.5: the JSD).
        nodes: quadrature nodes per mixture component; default 128.

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1), eq. (4.1) for the skewed JSD; the
    integrand is the pointwise identity
    $\alpha p \log\frac{p}{m} + (1-\alpha) q \log\frac{q}{m} = m\,\mathrm{kl}(\pi\|\alpha)$.
    """
    alpha = check_skew(skew)
    nodes = check_positive_int("nodes", nodes)
    mp, mq, dtype = float64_pair(p, q)
    x, wts = _nodes_for(mp, mq, nodes)
    log_p, log_q, f = log_densities(x, mp, mq)
    log_m = torch.logaddexp(log_p + math.log(alpha), log_q + math.log1p(-alpha))
    integrand = log_m.exp() * kl_bernoulli_logit(f, alpha)
    bound = binary_entropy(alpha)
    js = (wts * integrand).sum(-1).clamp(max=bound).to(dtype)
    # Rounding to float32 may land a hair above H(alpha): the largest value <= H(alpha) then.
    upper = torch.full((), bound, dtype=torch.float64, device=js.device).to(dtype)
    upper = torch.where(
        upper.double() > bound, torch.nextafter(upper, torch.zeros_like(upper)), upper
    )
    return torch.minimum(js, upper)


def expect_1d(p: Distribution, fn: Callable[[Tensor], Tensor], *, nodes: int = 128) -> Tensor:
    r"""`E_p[fn(X)]` for a scalar Gaussian mixture `p`, by composite Gauss-Legendre quadrature.

    $$
    \mathbb{E}_p[\mathrm{fn}(X)] \approx \sum_i \omega_i\, p(x_i)\, \mathrm{fn}(x_i)
    $$

    over the breakpoints of `p`'s components only: `fn` should be smooth on the scale of
    those components (for `fn = q.log_prob` with sharp features of its own, use
    [`kl_quadrature`][distkl.kl_quadrature], whose rule also resolves `q`).

    Args:
        p: `Normal` or `MixtureSameFamily(Normal)` (any Normal family with a 1-element event).
        fn: called once with `x` of shape `(N, *p.batch_shape)` (plus `p.event_shape`),
            like `Distribution.log_prob`; returns a tensor of the same shape.
        nodes: quadrature nodes per mixture component; default 128.

    Returns:
        Tensor of shape `p.batch_shape`.
    """
    nodes = check_positive_int("nodes", nodes)
    mp = scalar_mixture(p, "p")
    loc, scale = loc_scale(mp)
    x, wts = composite_rule(nodes, (mp.log_weights, loc, scale))  # (*b, N)
    comp = component_log_density(x, loc, scale)
    log_p = (mp.log_weights.unsqueeze(-2) + comp).logsumexp(-1)
    xs = x.movedim(-1, 0)
    xs = xs.reshape(xs.shape + (1,) * len(p.event_shape))
    values = fn(xs).reshape(xs.shape[: 1 + len(mp.batch_shape)]).movedim(0, -1)
    return (wts * log_p.exp() * values).sum(-1)
