r"""Fast log-density of Gaussian mixtures: :func:`mixture_log_prob`.

torch's :meth:`MixtureSameFamily.log_prob` scores every sample against every component
elementwise, through a ``(samples, *batch, K, D)`` intermediate. For Gaussian components the
quadratic form is a matrix product instead:

* diagonal components (``Normal``, ``Independent(Normal, 1)``):
  :math:`\sum_d (y_d - m_{kd})^2 / s_{kd}^2
  = y^2 \cdot a_k - 2\, y \cdot (a_k m_k) + m_k \cdot (a_k m_k)`
  with :math:`a_k = 1 / s_k^2`: one GEMM of the ``(samples, 2D)`` features ``[y^2, y]`` against a
  ``(2D, K)`` matrix, no ``K x D`` intermediate at all;
* full components (``MultivariateNormal``, ``LowRankMultivariateNormal``):
  :math:`\|L_k^{-1}(y - m_k)\|^2` with the ``K`` inverse Cholesky factors stacked into one
  ``(K D, D)`` matrix: one GEMM per chunk of samples, chunked so the ``(chunk, K, D)`` product stays
  under a fixed memory budget. (The expanded form :math:`y^\top P_k y - 2 m_k^\top P_k y + \dots`
  needs :math:`D(D+3)/2` features per sample, more than ``K D`` unless ``K > (D + 3) / 2``, and
  squares the cancellation error; whitening is both smaller and more accurate.)

Here :math:`y = x - c` and :math:`m_k = \mu_k - c` are centred on the mixture mean :math:`c`,
which keeps the cancellation in the expanded diagonal form small when :math:`|x|` is large
against the scales.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.distributions import Distribution

from distkl._gaussian import GaussianMixture, as_gaussian_mixture, is_gaussian_family

__all__ = ["mixture_log_prob"]

#: Elements of the largest intermediate a scorer builds at once (64 MiB in float32).
_MAX_INTERMEDIATE = 1 << 24

_LOG_2PI = math.log(2.0 * math.pi)
#: Rows whose estimated relative rounding error exceeds this are recomputed in float64.
_REFINE_TOL = 4e-6


class GaussianScorer:
    """Precomputed scorer for a :class:`GaussianMixture`: component and mixture log-densities.

    Build once, call many times (the Monte Carlo engine scores every chunk with one scorer).

    With ``precise=False`` (what :func:`mixture_log_prob` uses) values come back in the input
    dtype; for float32 diagonal components the expanded form is evaluated in float32 and the rows
    whose estimated cancellation error exceeds 1e-6 of the result are recomputed in float64.
    With ``precise=True`` (the Monte Carlo engine) diagonal components are evaluated in float64
    and every value comes back in float64, so differences of log-densities keep their digits.
    """

    def __init__(self, gm: GaussianMixture, *, precise: bool = False) -> None:
        self.gm = gm
        self.batch_shape = gm.batch_shape
        self.num_components = gm.num_components
        self.dim = gm.dim
        self.scalar_event = len(gm.event_shape) == 0
        d = gm.dim
        self.dtype = gm.loc.dtype
        can64 = gm.loc.device.type != "mps"
        self.out_dtype = torch.float64 if precise and can64 else self.dtype
        # Centre: the mixture mean, detached (any centre gives the same value in exact arithmetic).
        w = gm.log_weights.detach().exp()
        center = (w.unsqueeze(-1) * gm.loc.detach()).sum(-2)  # (*b, D)
        self.weight: Optional[Tensor] = None
        self.whiten: Optional[Tensor] = None
        self.shift: Optional[Tensor] = None
        self.refine = False
        self.direct: Optional[tuple[Tensor, ...]] = None
        if gm.scale_diag is not None:
            # Parameters in float64; the fast path uses float32 copies and refines rows whose
            # cancellation error (about eps * |y|^2 / s^2) would be visible.
            hi = torch.float64 if can64 else self.dtype
            self.work_dtype = hi if precise else self.dtype
            self.refine = not precise and self.dtype.itemsize < 8 and can64
            s = gm.scale_diag.to(hi)
            c64 = center.to(hi)
            m = gm.loc.to(hi) - c64.unsqueeze(-2)  # (*b, K, D)
            a = s.square().reciprocal()  # (*b, K, D)
            am = a * m
            weight = torch.cat([-0.5 * a, am], dim=-1).transpose(-1, -2).contiguous()  # (*b,2D,K)
            const = -0.5 * (am * m).sum(-1) - s.log().sum(-1) - 0.5 * d * _LOG_2PI
            if d == 1:
                # Scalar events: (n, K) elementwise is as cheap as a GEMM and has no cancellation.
                self.refine = False
                self.work_dtype = self.out_dtype
                self.direct = (m[..., 0], s[..., 0].reciprocal(), -s[..., 0].log() - 0.5 * _LOG_2PI)
                self.direct = tuple(t.to(self.work_dtype) for t in self.direct)
            self.center = c64.to(self.work_dtype)
            self.weight = weight.to(self.work_dtype)
            self.const = const.to(self.work_dtype)
            if self.refine:
                self.center_hi, self.weight_hi, self.const_hi = c64, weight, const
                # Size of the expanded terms of component k, for the error estimate.
                self.bound = (2.0 * am.abs()).to(self.dtype)  # (*b, K, D)
                self.bound_const = (am * m).sum(-1).to(self.dtype)  # (*b, K)
        else:
            self.work_dtype = self.dtype
            self.center = center
            m = gm.loc - center.unsqueeze(-2)  # (*b, K, D)
            tril = gm.tril()
            eye = torch.eye(d, dtype=tril.dtype, device=tril.device)
            linv = torch.linalg.solve_triangular(tril, eye, upper=False)  # (*b, K, D, D)
            k = gm.num_components
            self.whiten = linv.reshape(*linv.shape[:-3], k * d, d).transpose(-1, -2).contiguous()
            self.shift = (linv @ m.unsqueeze(-1)).squeeze(-1)  # (*b, K, D)
            diag = tril.diagonal(dim1=-2, dim2=-1)
            self.const = -diag.log().sum(-1) - 0.5 * d * _LOG_2PI
        self.log_weights = gm.log_weights

    # ----------------------------------------------------------------------------------
    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log N(x; mu_k, Sigma_k)`` of shape ``(*sample, *batch, K)`` (weights not included).

        ``x`` has shape ``(*sample, *batch_x, *event)`` where ``batch_x`` broadcasts against the
        mixture's batch shape, as for :meth:`Distribution.log_prob`.
        """
        if self.scalar_event:
            x = x.unsqueeze(-1)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(
                f"x must end with the event shape {tuple(self.gm.event_shape)}, got shape "
                f"{tuple(x.shape if not self.scalar_event else x.shape[:-1])}."
            )
        y = x.to(self.work_dtype) - self.center  # (*R, D), R = broadcast(x batch dims, batch)
        r_shape = y.shape[:-1]
        nb = len(self.batch_shape)
        k, d = self.num_components, self.dim
        if self.batch_shape.numel() == 1:
            # One mixture: a single GEMM over all samples.
            rows = y.reshape(1, -1, d)
            out = self._score_rows(rows, _squeeze_batch(self, nb), x, None)
            return out.reshape(*r_shape, k).to(self.out_dtype)
        bt = r_shape[len(r_shape) - nb :]
        s_shape = r_shape[: len(r_shape) - nb]
        n = s_shape.numel()
        nbt = bt.numel()
        rows = y.reshape(n, nbt, d).transpose(0, 1)  # (Bt, n, D)
        out = self._score_rows(rows, _expand_batch(self, bt), x, bt)  # (Bt, n, K)
        return out.transpose(0, 1).reshape(*s_shape, *bt, k).to(self.out_dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Mixture log-density, shape ``(*sample, *batch)``."""
        comp = self.component_log_prob(x) + self.log_weights.to(self.out_dtype)
        return logsumexp_last(comp)

    # ----------------------------------------------------------------------------------
    def _score_rows(
        self,
        rows: Tensor,
        params: tuple[Tensor, Tensor, Tensor],
        x: Tensor,
        bt: Optional[torch.Size],
    ) -> Tensor:
        """``rows`` (G, n, D) against per-group parameters -> (G, n, K), chunked over n."""
        mat, shift, const = params
        g, n, d = rows.shape
        k = self.num_components
        width = 2 * d if self.weight is not None else k * d
        step = max(1, _MAX_INTERMEDIATE // max(1, g * width))
        outs = []
        for lo in range(0, n, step):
            chunk = rows[:, lo : lo + step]
            if self.direct is not None:
                loc, inv_scale, log_norm = params
                outs.append(
                    log_norm.unsqueeze(-2)
                    - 0.5 * ((chunk - loc.unsqueeze(-2)) * inv_scale.unsqueeze(-2)).square()
                )
            elif self.weight is not None:
                # -0.5 y^2 . a + y . (a m) + const, as two GEMMs (no concatenated features).
                lin = torch.baddbmm(const.unsqueeze(-2), chunk, mat[:, d:])
                quad = torch.bmm(chunk.square(), mat[:, :d])
                out = lin + quad
                if self.refine:
                    out = self._refine(out, quad, chunk, bt)
                outs.append(out)
            else:
                z = (chunk @ mat).unflatten(-1, (k, d)) - shift.unsqueeze(-3)  # (G, c, K, D)
                outs.append(const.unsqueeze(-2) - 0.5 * z.square().sum(-1))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)

    def _refine(self, out: Tensor, quad: Tensor, y: Tensor, bt: Optional[torch.Size]) -> Tensor:
        """Recompute in float64 the rows of ``out`` (G, c, K) that float32 may get wrong.

        ``quad`` is the ``-0.5 y^2 . a_k`` term; the size of the expanded terms is
        ``y^2 . a_k + 2 |y| . |a_k m_k| + m_k . a_k m_k``.
        """
        g, c, k = out.shape
        d = self.dim
        best = out.detach().argmax(-1, keepdim=True)  # (G, c, 1)
        if bt is None:
            bound, bconst = self.bound.reshape(1, k, d), self.bound_const.reshape(1, k)
        else:
            bound = self.bound.expand(*bt, k, d).reshape(-1, k, d)
            bconst = self.bound_const.expand(*bt, k).reshape(-1, k)
        lin_size = torch.baddbmm(bconst.unsqueeze(-2), y.detach().abs(), bound.transpose(-1, -2))
        size = (lin_size - 2.0 * quad.detach()).gather(-1, best).squeeze(-1)  # (G, c)
        value = out.detach().gather(-1, best).squeeze(-1).abs().clamp_min(1.0)
        # Rounding error of the expanded form is about eps * size (measured: at most 1.3x that).
        flag = torch.finfo(self.dtype).eps * size > _REFINE_TOL * value
        if not bool(flag.any()):
            return out
        gi, ci = flag.nonzero(as_tuple=True)
        if bt is None:
            mat, const = self.weight_hi.reshape(2 * d, k), self.const_hi.reshape(k)
            y_hi = y[gi, ci].to(torch.float64) + (self.center.to(torch.float64) - self.center_hi)
            exact = torch.addmm(const, torch.cat([y_hi.square(), y_hi], -1), mat)
        else:
            mat = self.weight_hi.expand(*bt, 2 * d, k).reshape(-1, 2 * d, k)[gi]
            const = self.const_hi.expand(*bt, k).reshape(-1, k)[gi]
            shift = (self.center.to(torch.float64) - self.center_hi).expand(*bt, d).reshape(-1, d)
            y_hi = y[gi, ci].to(torch.float64) + shift[gi]
            feats_hi = torch.cat([y_hi.square(), y_hi], -1).unsqueeze(-2)  # (r, 1, 2D)
            exact = (feats_hi @ mat).squeeze(-2) + const
        return out.index_put((gi, ci), exact.to(out.dtype))


def logsumexp_last(x: Tensor) -> Tensor:
    """``logsumexp`` over the last dimension (faster than torch's for a short last dimension)."""
    if x.shape[-1] == 1:
        return x.squeeze(-1)
    m = x.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    # Terms below exp(-80) (float32) / exp(-700) (float64) change nothing; clamping them keeps
    # exp out of the subnormal range, which is ten times slower on CPUs.
    floor = -80.0 if x.dtype.itemsize < 8 else -700.0
    return (x - m).clamp_min(floor).exp().sum(-1).log() + m.squeeze(-1)


def _squeeze_batch(sc: GaussianScorer, nb: int) -> tuple[Tensor, Tensor, Tensor]:
    """Parameters of a one-element batch as a group of size 1."""
    k, d = sc.num_components, sc.dim
    if sc.direct is not None:
        loc, inv_scale, log_norm = (t.reshape(1, k) for t in sc.direct)
        return loc, inv_scale, log_norm
    const = sc.const.reshape(1, k)
    if sc.weight is not None:
        return sc.weight.reshape(1, 2 * d, k), const, const
    assert sc.whiten is not None and sc.shift is not None
    return sc.whiten.reshape(1, d, k * d), sc.shift.reshape(1, k, d), const


def _expand_batch(sc: GaussianScorer, bt: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
    """Parameters broadcast to the batch ``bt`` and flattened into groups."""
    k, d = sc.num_components, sc.dim
    if sc.direct is not None:
        loc, inv_scale, log_norm = (t.expand(*bt, k).reshape(-1, k) for t in sc.direct)
        return loc, inv_scale, log_norm
    const = sc.const.expand(*bt, k).reshape(-1, k)
    if sc.weight is not None:
        return sc.weight.expand(*bt, 2 * d, k).reshape(-1, 2 * d, k), const, const
    assert sc.whiten is not None and sc.shift is not None
    mat = sc.whiten.expand(*bt, d, k * d).reshape(-1, d, k * d)
    return mat, sc.shift.expand(*bt, k, d).reshape(-1, k, d), const


def mixture_log_prob(mixture: Distribution, x: Tensor) -> Tensor:
    r"""Log-density of a Gaussian mixture (or one Gaussian) at ``x``, in nats, by matrix products.

    .. math::
        \log p(x) = \operatorname{logsumexp}_k \Big[\log w_k - \tfrac12 \|L_k^{-1}(x - \mu_k)\|^2
            - \log\lvert L_k\rvert - \tfrac{D}{2}\log 2\pi\Big]

    The same values as ``mixture.log_prob(x)`` (to float rounding), without torch's
    ``(samples, *batch, K, D)`` intermediate: diagonal components are scored by one GEMM of the
    features ``[y^2, y]`` (``y = x - c``, centred on the mixture mean ``c``) against a
    ``(2D, K)`` matrix, full-covariance components by one GEMM against the stacked inverse
    Cholesky factors, in chunks of samples. See the module docstring.

    Accepts ``MixtureSameFamily`` of ``Normal``, ``Independent(Normal, 1)``,
    ``MultivariateNormal`` or ``LowRankMultivariateNormal`` components, and those distributions
    alone (one component). Any other distribution falls back to its own ``log_prob``.
    Differentiable in ``x`` and in the parameters.

    Source: the expansion of the Gaussian quadratic form; Cholesky whitening as in
    torch.distributions.multivariate_normal._batch_mahalanobis.

    Args:
        mixture: the distribution to score.
        x: values of shape ``(*sample, *batch_x, *event_shape)``; ``batch_x`` broadcasts against
            ``mixture.batch_shape`` as in :meth:`~torch.distributions.Distribution.log_prob`.

    Returns:
        Tensor of shape ``(*sample, *broadcast_shapes(batch_x, mixture.batch_shape))``.

    Raises:
        ValueError: when ``x`` does not end with the event shape.
    """
    if not is_gaussian_family(mixture):
        return mixture.log_prob(x)
    event = mixture.event_shape
    if x.dim() < len(event) or x.shape[x.dim() - len(event) :] != event:
        raise ValueError(
            f"x must end with the event shape {tuple(event)}, got shape {tuple(x.shape)}."
        )
    return GaussianScorer(as_gaussian_mixture(mixture)).log_prob(x)
