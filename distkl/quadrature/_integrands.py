r"""Pointwise integrands of `distkl.quadrature`: non-negative, second order near `p = q`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["kl_integrand", "kl_bernoulli_logit"]


def kl_integrand(f: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    r"""Pointwise $p(f + e^{-f} - 1) = p\log\frac pq + q - p \ge 0$, $f = \log\frac pq$.

    Where `p` is 0 it is `q`; where `q` is 0 and `p` is not, `+inf`. Every branch sees
    finite inputs, so gradients are finite wherever the value is.
    """
    finite = torch.isfinite(f)
    f = torch.where(finite, f, torch.zeros_like(f))
    small = f.abs() < 1e-2
    low = f < -1.0
    fs = torch.where(small, f, torch.zeros_like(f))
    # f^2/2 - f^3/6 + ... + f^8/8!  (next term below 1e-17 relative for |f| < 1e-2)
    series = (
        fs
        * fs
        * (
            0.5
            + fs
            * (
                -1 / 6
                + fs * (1 / 24 + fs * (-1 / 120 + fs * (1 / 720 + fs * (-1 / 5040 + fs / 40320))))
            )
        )
    )
    fm = torch.where(small | low, torch.ones_like(f), f)
    mid = fm + torch.expm1(-fm)
    lp = torch.where(finite, log_p, torch.zeros_like(log_p))
    lq = torch.where(finite, log_q, torch.zeros_like(log_q))
    p = lp.exp()
    h = torch.where(small, series, mid) * p
    fl = torch.where(low, f, -2.0 * torch.ones_like(f))
    low_val = p * (fl - 1.0) + lq.exp()
    h = torch.where(low, low_val, h)
    p_zero = log_p == -math.inf
    q_only = torch.where(p_zero & (log_q < math.inf), log_q, torch.zeros_like(log_q)).exp()
    edge = torch.where(p_zero, q_only, torch.full_like(h, math.inf))
    return torch.where(finite, h, edge)


def kl_bernoulli_logit(t: Tensor, alpha: float) -> Tensor:
    r"""$\mathrm{kl}(\sigma(c + t) \,\|\, \sigma(c))$, $c = \operatorname{logit}\alpha$.

    The Bregman divergence of softplus: $A(c) - A(c+t) + t\,\sigma(c+t)$; for
    $|t| < 10^{-3}$ its Taylor series $\sum_{n \ge 2} \frac{n-1}{n!} t^n A^{(n)}(c)$
    up to $n = 5$ (relative truncation error below 2e-14). For $\alpha > 1/2$ the
    mirror image $\mathrm{kl}(1 - \pi \,\|\, 1 - \alpha)$ is evaluated, so `c <= 0`
    and $A(c)$ never cancels against $A(c + t)$ (a skew of `1 - 1e-16` gave a
    negative JSD).
    """
    if alpha > 0.5:  # kl(pi || alpha) = kl(1 - pi || 1 - alpha); keeps c <= 0 (no cancellation)
        return kl_bernoulli_logit(-t, 1.0 - alpha)
    c = math.log(alpha) - math.log1p(-alpha)
    v = alpha * (1.0 - alpha)
    a3, a4, a5 = v * (1 - 2 * alpha), v * (1 - 6 * v), v * (1 - 2 * alpha) * (1 - 12 * v)
    small = t.abs() < 1e-3
    ts = torch.where(small, t, torch.zeros_like(t))
    series = ts * ts * (v / 2 + ts * (a3 / 3 + ts * (a4 / 8 + ts * a5 / 30)))
    tl = torch.where(small, torch.ones_like(t), t)
    softplus_c = math.log1p(math.exp(c))
    softplus = torch.logaddexp(torch.zeros_like(tl), c + tl)  # F.softplus cuts off at 20
    direct = softplus_c - softplus + tl * torch.sigmoid(c + tl)
    return torch.where(small, series, direct)
