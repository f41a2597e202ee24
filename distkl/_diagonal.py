r"""Log-density of a diagonal Gaussian mixture at few points, with a hand-written backward.

At a training step's sizes (a batch of 128, a handful of samples, `K * D` up to about a
thousand) the time of $\log q(z)$ is the number of tensor operations, not their size: torch's
`MixtureSameFamily(Independent(Normal)).log_prob` records about twenty autograd nodes, and its
backward replays as many. `diag_mixture_log_prob` computes the same value in ten operations and
its gradient in eight, from the standardised residuals $u = (z - m_k) / s_k$ and the
responsibilities $r_k = v_k\,\mathcal{N}(z; m_k, s_k^2) / q(z)$ kept from the forward pass:

$$
\frac{\partial \log q}{\partial z} = -\sum_k r_k \frac{u_k}{s_k},\quad
\frac{\partial \log q}{\partial m_k} = r_k \frac{u_k}{s_k},\quad
\frac{\partial \log q}{\partial s_k} = r_k \frac{u_k^2 - 1}{s_k},\quad
\frac{\partial \log q}{\partial \log v_k} = r_k .
$$

A backward pass that builds a graph (`create_graph=True`, e.g. a gradient penalty) recomputes
the value with ordinary differentiable operations and differentiates that instead, so second
derivatives are exact too. A zero-weight component ($\log v_k = -\infty$) has $r_k = 0$ and
no gradient; NaN parameters give NaN in the elements they reach, as torch's `log_prob` does.
Under `torch.compile` the plain operations are used (the compiler fuses them itself).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "diag_gradients",
    "diag_log_normaliser",
    "diag_mixture_log_prob",
    "diag_scores",
    "plain_mixture_log_prob",
]

_LOG_2PI = math.log(2 * math.pi)


def diag_log_normaliser(inv_scale: Tensor) -> Tensor:
    r"""$\sum_d \log(1 / s_{kd}) - \tfrac{D}{2} \log 2\pi$, shape `inv_scale.shape[:-1]`."""
    return inv_scale.log().sum(-1) - 0.5 * inv_scale.shape[-1] * _LOG_2PI


def diag_mixture_log_prob(
    z: Tensor,
    log_weights: Tensor,
    loc: Tensor,
    scale: Tensor,
    inv_scale: Optional[Tensor] = None,
    log_norm: Optional[Tensor] = None,
) -> Tensor:
    r"""$\log \sum_k v_k \prod_d \mathcal{N}(z_d; m_{kd}, s_{kd}^2)$, shape
    `broadcast(z.shape[:-1], log_weights.shape[:-1])`.

    Args:
        z: points `(..., D)`.
        log_weights: normalised log-weights `(*batch, K)` (`-inf` for a zero weight).
        loc, scale: component means and scales `(*batch, K, D)`.
        inv_scale, log_norm: `1 / scale` and `diag_log_normaliser(1 / scale)` when the caller
            has them (computed without gradient); they are not differentiated.
    """
    if torch.compiler.is_compiling():  # the compiler fuses the plain operations itself
        return plain_mixture_log_prob(z, log_weights, loc, scale)
    if inv_scale is None or log_norm is None:
        with torch.no_grad():
            inv_scale = scale.reciprocal()
            log_norm = diag_log_normaliser(inv_scale)
    return _DiagMixtureLogProb.apply(z, log_weights, loc, scale, inv_scale, log_norm)


def plain_mixture_log_prob(z: Tensor, log_weights: Tensor, loc: Tensor, scale: Tensor) -> Tensor:
    """The same value with differentiable operations (the graph for second derivatives)."""
    u = (z.unsqueeze(-2) - loc) / scale
    comp = -scale.log().sum(-1) - 0.5 * scale.shape[-1] * _LOG_2PI - 0.5 * u.square().sum(-1)
    return torch.logsumexp(comp + log_weights, -1)


def diag_scores(z: Tensor, lwn: Tensor, loc: Tensor, inv_scale: Tensor) -> tuple[Tensor, Tensor]:
    """`(a, u)`: `a = lwn_k - |u_k|^2 / 2` `(..., K)` with the standardised residuals
    `u = (z - m_k) / s_k` `(..., K, D)`; `lwn` holds each component's log-weight and
    log-normaliser."""
    u = (z.unsqueeze(-2) - loc) * inv_scale
    ones = torch.ones(u.shape[-1], dtype=u.dtype, device=u.device)  # sums over D by matrix
    return torch.add(lwn, u.square() @ ones, alpha=-0.5), u  # products: faster than reductions


def diag_gradients(
    rw: Tensor,
    u: Tensor,
    inv_scale: Tensor,
    needs: tuple[bool, ...],
    log_weights: Tensor,
    loc: Tensor,
    scale: Tensor,
) -> tuple[Optional[Tensor], ...]:
    """Gradients of `sum r_k log(v_k N(z; m_k, s_k^2))` with weights `rw` `(..., K)` (the
    responsibilities times an incoming gradient) given `diag_scores`' `u`: `(d/dz (..., D),
    d/dlog v, d/dm, d/ds)`, the parameters' summed to their shapes, None where `needs`
    (z, log v, m, s) is False (see the module docstring for the formulas)."""
    need_z, need_w, need_loc, need_scale = needs
    g_z = g_w = g_loc = g_scale = None
    t = None
    if need_z or need_loc or need_scale:
        t = rw.unsqueeze(-1) * (u * inv_scale)  # r_k u_k / s_k
    if need_z:
        assert t is not None
        g_z = t.sum(-2).neg_()
    if need_loc:
        assert t is not None
        g_loc = t.sum_to_size(loc.shape)
    s_rw = rw.sum_to_size(log_weights.shape) if need_w or need_scale else None
    if need_w:
        g_w = s_rw
    if need_scale:
        assert t is not None and s_rw is not None
        if scale.shape[:-1] == log_weights.shape:  # r (u^2 - 1) / s = t u - r / s
            g_scale = (t * u).sum_to_size(scale.shape).sub_(s_rw.unsqueeze(-1) * inv_scale)
        else:
            g_scale = (rw.unsqueeze(-1) * (u.square() - 1.0) * inv_scale).sum_to_size(scale.shape)
    return g_z, g_w, g_loc, g_scale


class _DiagMixtureLogProb(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        z: Tensor,
        log_weights: Tensor,
        loc: Tensor,
        scale: Tensor,
        inv_scale: Tensor,
        log_norm: Tensor,
    ) -> Tensor:
        a, u = diag_scores(z, log_norm + log_weights, loc, inv_scale)
        out = torch.logsumexp(a, -1)
        ctx.save_for_backward(z, log_weights, loc, scale, inv_scale, u, a, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        z, log_weights, loc, scale, inv_scale, u, a, out = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the reference instead
            wanted = [t for t, need in zip((z, log_weights, loc, scale), needs) if need]
            with torch.enable_grad():
                ref = plain_mixture_log_prob(z, log_weights, loc, scale)
                grads = iter(torch.autograd.grad(ref, wanted, grad, create_graph=True))
            return (*(next(grads) if need else None for need in needs), None, None)
        # responsibilities times the incoming gradient
        rw = (a - out.unsqueeze(-1)).exp() * grad.unsqueeze(-1)
        g_z, g_w, g_loc, g_scale = diag_gradients(rw, u, inv_scale, needs, log_weights, loc, scale)
        g_z = None if g_z is None else g_z.sum_to_size(z.shape)
        return g_z, g_w, g_loc, g_scale, None, None
