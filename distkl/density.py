r"""Fast log-density of Gaussian mixtures: [`mixture_log_prob`][distkl.mixture_log_prob].

torch's `MixtureSameFamily.log_prob` scores every sample against every component
elementwise, through a `(samples, *batch, K, D)` intermediate. For Gaussian components the
quadratic form is a matrix product instead:

* diagonal components (`Normal`, `Independent(Normal, 1)`):
  $\sum_d (y_d - m_{kd})^2 / s_{kd}^2
  = y^2 \cdot a_k - 2\, y \cdot (a_k m_k) + m_k \cdot (a_k m_k)$
  with $a_k = 1 / s_k^2$: one GEMM of the `(samples, 2D)` features `[y^2, y]` against a
  `(2D, K)` matrix, no `K x D` intermediate at all;
* full components (`MultivariateNormal`, `LowRankMultivariateNormal`):
  $\|L_k^{-1}(y - m_k)\|^2$ with the `K` inverse Cholesky factors stacked into one
  `(K D, D)` matrix: one GEMM per chunk of samples, chunked so the `(chunk, K, D)` product stays
  under a fixed memory budget. (The expanded form $y^\top P_k y - 2 m_k^\top P_k y + \dots$
  needs $D(D+3)/2$ features per sample, more than `K D` unless `K > (D + 3) / 2`, and
  squares the cancellation error; whitening is both smaller and more accurate.)

Here $y = x - c$ and $m_k = \mu_k - c$ are centred on the mixture mean $c$,
which keeps the cancellation in the expanded diagonal form small when $|x|$ is large
against the scales.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.distributions import Distribution

from distkl._gaussian import GaussianMixture, as_gaussian_mixture, is_gaussian_family

__all__ = ["ELEMENTWISE_LIMIT", "mixture_log_prob"]

#: Elements of the largest intermediate a scorer builds at once (64 MiB in float32).
_MAX_INTERMEDIATE = 1 << 24

_LOG_2PI = math.log(2.0 * math.pi)
#: Rows whose estimated relative rounding error exceeds this are recomputed in float64.
_REFINE_TOL = 4e-6
#: Diagonal components are scored elementwise up to this many elements of the
#: `(*sample, *batch, K, D)` intermediate (measured: faster than building the GEMM below about
#: 16k-32k, forward and backward, one thread).
ELEMENTWISE_LIMIT = 1 << 14


class GaussianScorer:
    """Precomputed log-densities of a `GaussianMixture`'s components and of the mixture.

    Build once with `gaussian_scorer`, call many times (the Monte Carlo engine scores every
    chunk with one scorer). The subclasses are the three strategies: `ScalarScorer`
    (1-D events, elementwise), `DiagonalScorer` (elementwise for small inputs, else one GEMM of
    `[y^2, y]`, float32 rows refined in float64) and `WhitenedScorer` (full covariances, stacked
    inverse Cholesky factors). This base class holds what they share: the shapes, the centre
    and the chunked loop.

    With `precise=False` (what [`mixture_log_prob`][distkl.mixture_log_prob] uses) values come back
    in the input dtype. With `precise=True` (the Monte Carlo engine) diagonal components are
    evaluated in float64 and every value comes back in float64, so differences of log-densities keep
    their digits.
    """

    #: Width of one row of the largest intermediate, per component group (for chunking).
    row_width: int

    def __init__(self, gm: GaussianMixture, *, precise: bool) -> None:
        self.gm = gm
        self.batch_shape = gm.batch_shape
        self.num_components = gm.num_components
        self.dim = gm.dim
        self.scalar_event = len(gm.event_shape) == 0
        self.dtype = gm.loc.dtype
        self.can64 = gm.loc.device.type != "mps"
        self.out_dtype = torch.float64 if precise and self.can64 else self.dtype
        self.log_weights = gm.log_weights
        self.work_dtype = self.dtype
        #: The centre `c` of the rows scored by `_score_rows` (set by the subclasses using it).
        self.center: Tensor

    # ----------------------------------------------------------------------------------
    def component_log_prob(self, x: Tensor) -> Tensor:
        """`log N(x; mu_k, Sigma_k)` of shape `(*sample, *batch, K)` (weights not included).

        `x` has shape `(*sample, *batch_x, *event)` where `batch_x` broadcasts against the
        mixture's batch shape, as for `Distribution.log_prob`.
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
            out = self._score_rows(y.reshape(1, -1, d), self.params(None), None)
            return out.reshape(*r_shape, k).to(self.out_dtype)
        bt = r_shape[len(r_shape) - nb :]
        s_shape = r_shape[: len(r_shape) - nb]
        rows = y.reshape(s_shape.numel(), bt.numel(), d).transpose(0, 1)  # (Bt, n, D)
        out = self._score_rows(rows, self.params(bt), bt)  # (Bt, n, K)
        return out.transpose(0, 1).reshape(*s_shape, *bt, k).to(self.out_dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """Mixture log-density, shape `(*sample, *batch)`."""
        comp = self.component_log_prob(x) + self.log_weights.to(self.out_dtype)
        return logsumexp_last(comp)

    # ----------------------------------------------------------------------------------
    def params(self, bt: Optional[torch.Size]) -> tuple[Tensor, ...]:
        """The parameters as groups: one group (`bt` None) or broadcast to the batch `bt`."""
        raise NotImplementedError

    def score_chunk(
        self, chunk: Tensor, params: tuple[Tensor, ...], bt: Optional[torch.Size]
    ) -> Tensor:
        """Rows `chunk` (G, c, D) against the groups' parameters -> (G, c, K)."""
        raise NotImplementedError

    def _score_rows(
        self, rows: Tensor, params: tuple[Tensor, ...], bt: Optional[torch.Size]
    ) -> Tensor:
        """`rows` (G, n, D) -> (G, n, K), in chunks of n under the intermediate budget."""
        g, n, _ = rows.shape
        if n == 0:  # no samples: an empty result, as torch's log_prob gives
            return rows.new_zeros((g, 0, self.num_components))
        step = max(1, _MAX_INTERMEDIATE // max(1, g * self.row_width))
        outs = [self.score_chunk(rows[:, lo : lo + step], params, bt) for lo in range(0, n, step)]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _broadcast_numel(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Elements of `broadcast_shapes(a, b)` (an estimate for sizing: no check)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    numel = 1
    for i, j in zip(a, b):
        numel *= max(i, j)
    return numel


def _center(gm: GaussianMixture) -> Tensor:
    """The mixture mean, detached (any centre gives the same value in exact arithmetic)."""
    if gm.num_components == 1:
        return gm.loc.detach()[..., 0, :]
    w = gm.log_weights.detach().exp()
    return (w.unsqueeze(-1) * gm.loc.detach()).sum(-2)  # (*b, D)


def _groups(t: Tensor, bt: Optional[torch.Size], tail: tuple[int, ...]) -> Tensor:
    """`t` (*b, *tail) as groups: `(1, *tail)` for one mixture, else `(prod(bt), *tail)`."""
    if bt is None:
        return t.reshape(1, *tail)
    return t.expand(*bt, *tail).reshape(-1, *tail)


class ScalarScorer(GaussianScorer):
    """1-D events: `(n, K)` elementwise is as cheap as a GEMM and has no cancellation."""

    def __init__(self, gm: GaussianMixture, *, precise: bool = False) -> None:
        super().__init__(gm, precise=precise)
        hi = torch.float64 if self.can64 else self.dtype
        self.work_dtype = self.out_dtype
        assert gm.scale_diag is not None
        s = gm.scale_diag.to(hi)[..., 0]
        c64 = _center(gm).to(hi)
        m = gm.loc.to(hi)[..., 0] - c64  # (*b, K)
        direct = (m, s.reciprocal(), -s.log() - 0.5 * _LOG_2PI)
        self.direct = tuple(t.to(self.work_dtype) for t in direct)
        self.center = c64.to(self.work_dtype)
        self.row_width = 2

    def params(self, bt: Optional[torch.Size]) -> tuple[Tensor, ...]:
        k = self.num_components
        return tuple(_groups(t, bt, (k,)) for t in self.direct)

    def score_chunk(
        self, chunk: Tensor, params: tuple[Tensor, ...], bt: Optional[torch.Size]
    ) -> Tensor:
        loc, inv_scale, log_norm = params
        z = (chunk - loc.unsqueeze(-2)) * inv_scale.unsqueeze(-2)
        return log_norm.unsqueeze(-2) - 0.5 * z.square()


class DiagonalScorer(GaussianScorer):
    r"""Diagonal components: elementwise for small inputs, else one GEMM of the features
    `[y^2, y]` against a `(2D, K)` matrix.

    When the `(*sample, *batch, K, D)` intermediate has at most `ELEMENTWISE_LIMIT` elements
    (and always for one component), $\sum_d ((x_d - \mu_{kd}) / s_{kd})^2$ directly: exact, and
    fewer operations than building the GEMM. Otherwise
    $\sum_d (y_d - m_{kd})^2 / s_{kd}^2 = y^2 \cdot a_k - 2\, y \cdot (a_k m_k)
    + m_k \cdot (a_k m_k)$, $a_k = 1/s_k^2$, with parameters built (on first use) in float64;
    with `precise=False` a float32 input is scored with float32 copies and the rows whose
    estimated cancellation error (about $\epsilon |y|^2 / s^2$) exceeds `4e-6` of the result are
    recomputed in float64 (`_refine`).
    """

    def __init__(self, gm: GaussianMixture, *, precise: bool = False) -> None:
        super().__init__(gm, precise=precise)
        self.hi = torch.float64 if self.can64 else self.dtype
        self.work_dtype = self.hi if precise else self.dtype
        self.refine = not precise and self.dtype.itemsize < 8 and self.can64
        assert gm.scale_diag is not None
        self.row_width = 2 * self.dim
        self._direct: Optional[tuple[Tensor, Tensor, Tensor]] = None
        self._gemm_ready = False

    def component_log_prob(self, x: Tensor) -> Tensor:
        rows = _broadcast_numel(x.shape[:-1], self.batch_shape)
        if self.num_components > 1 and rows * self.num_components * self.dim > ELEMENTWISE_LIMIT:
            self._build_gemm()
            return super().component_log_prob(x)
        if x.shape[-1:] != (self.dim,):
            raise ValueError(
                f"x must end with the event shape {tuple(self.gm.event_shape)}, got shape "
                f"{tuple(x.shape)}."
            )
        if self._direct is None:
            assert self.gm.scale_diag is not None
            s = self.gm.scale_diag.to(self.out_dtype)
            log_norm = -s.log().sum(-1) - 0.5 * self.dim * _LOG_2PI  # (*b, K)
            self._direct = self.gm.loc.to(self.out_dtype), s.reciprocal(), log_norm
        loc, inv_scale, log_norm = self._direct
        z = (x.to(self.out_dtype).unsqueeze(-2) - loc) * inv_scale  # (*sample, *batch, K, D)
        return log_norm - 0.5 * z.square().sum(-1)

    def _build_gemm(self) -> None:
        """The GEMM form's parameters (see the class docstring), once."""
        if self._gemm_ready:
            return
        gm, d, hi = self.gm, self.dim, self.hi
        assert gm.scale_diag is not None
        s = gm.scale_diag.to(hi)
        c64 = _center(gm).to(hi)
        m = gm.loc.to(hi) - c64.unsqueeze(-2)  # (*b, K, D)
        a = s.square().reciprocal()  # (*b, K, D)
        am = a * m
        weight = torch.cat([-0.5 * a, am], dim=-1).transpose(-1, -2).contiguous()  # (*b, 2D, K)
        const = -0.5 * (am * m).sum(-1) - s.log().sum(-1) - 0.5 * d * _LOG_2PI
        self.center = c64.to(self.work_dtype)
        self.weight = weight.to(self.work_dtype)
        self.const = const.to(self.work_dtype)
        if self.refine:
            self.center_hi, self.weight_hi, self.const_hi = c64, weight, const
            # Size of the expanded terms of component k, for the error estimate.
            self.bound = (2.0 * am.abs()).to(self.dtype)  # (*b, K, D)
            self.bound_const = (am * m).sum(-1).to(self.dtype)  # (*b, K)
        self._gemm_ready = True

    def params(self, bt: Optional[torch.Size]) -> tuple[Tensor, ...]:
        k, d = self.num_components, self.dim
        return _groups(self.weight, bt, (2 * d, k)), _groups(self.const, bt, (k,))

    def score_chunk(
        self, chunk: Tensor, params: tuple[Tensor, ...], bt: Optional[torch.Size]
    ) -> Tensor:
        mat, const = params
        d = self.dim
        # -0.5 y^2 . a + y . (a m) + const, as two GEMMs (no concatenated features).
        lin = torch.baddbmm(const.unsqueeze(-2), chunk, mat[:, d:])
        quad = torch.bmm(chunk.square(), mat[:, :d])
        out = lin + quad
        return self._refine(out, quad, chunk, bt) if self.refine else out

    def _refine(self, out: Tensor, quad: Tensor, y: Tensor, bt: Optional[torch.Size]) -> Tensor:
        """Recompute in float64 the rows of `out` (G, c, K) that float32 may get wrong.

        `quad` is the `-0.5 y^2 . a_k` term; the size of the expanded terms is
        `y^2 . a_k + 2 |y| . |a_k m_k| + m_k . a_k m_k`.
        """
        k, d = self.num_components, self.dim
        best = out.detach().argmax(-1, keepdim=True)  # (G, c, 1)
        bound, bconst = _groups(self.bound, bt, (k, d)), _groups(self.bound_const, bt, (k,))
        lin_size = torch.baddbmm(bconst.unsqueeze(-2), y.detach().abs(), bound.transpose(-1, -2))
        size = (lin_size - 2.0 * quad.detach()).gather(-1, best).squeeze(-1)  # (G, c)
        value = out.detach().gather(-1, best).squeeze(-1).abs().clamp_min(1.0)
        # Rounding error of the expanded form is about eps * size (measured: at most 1.3x that).
        flag = torch.finfo(self.dtype).eps * size > _REFINE_TOL * value
        if torch.compiler.is_compiling():
            # A graph has no data-dependent row count: score every row in float64, keep the
            # flagged ones (the same values as the sparse recomputation below).
            return torch.where(flag.unsqueeze(-1), self._exact(y, bt).to(out.dtype), out)
        if not bool(flag.any()):
            return out
        gi, ci = flag.nonzero(as_tuple=True)
        if bt is None:
            mat, const = self.weight_hi.reshape(2 * d, k), self.const_hi.reshape(k)
            y_hi = y[gi, ci].to(torch.float64) + (self.center.to(torch.float64) - self.center_hi)
            exact = torch.addmm(const, torch.cat([y_hi.square(), y_hi], -1), mat)
        else:
            mat = _groups(self.weight_hi, bt, (2 * d, k))[gi]
            const = _groups(self.const_hi, bt, (k,))[gi]
            shift = _groups(self.center.to(torch.float64) - self.center_hi, bt, (d,))
            y_hi = y[gi, ci].to(torch.float64) + shift[gi]
            feats_hi = torch.cat([y_hi.square(), y_hi], -1).unsqueeze(-2)  # (r, 1, 2D)
            exact = (feats_hi @ mat).squeeze(-2) + const
        return out.index_put((gi, ci), exact.to(out.dtype))

    def _exact(self, y: Tensor, bt: Optional[torch.Size]) -> Tensor:
        """Every row of `y` (G, c, D) scored in float64 -> (G, c, K)."""
        k, d = self.num_components, self.dim
        mat = _groups(self.weight_hi, bt, (2 * d, k))
        const = _groups(self.const_hi, bt, (k,))
        shift = _groups(self.center.to(torch.float64) - self.center_hi, bt, (d,))
        y_hi = y.to(torch.float64) + shift.unsqueeze(-2)
        feats_hi = torch.cat([y_hi.square(), y_hi], -1)
        return torch.baddbmm(const.unsqueeze(-2), feats_hi, mat)


class WhitenedScorer(GaussianScorer):
    r"""Full covariances: $\|L_k^{-1}(y - m_k)\|^2$ by one GEMM against the stacked
    inverse Cholesky factors, a `(D, K D)` matrix."""

    def __init__(self, gm: GaussianMixture, *, precise: bool = False) -> None:
        super().__init__(gm, precise=precise)
        d, k = self.dim, self.num_components
        self.center = _center(gm)
        m = gm.loc - self.center.unsqueeze(-2)  # (*b, K, D)
        tril = gm.tril()
        eye = torch.eye(d, dtype=tril.dtype, device=tril.device)
        linv = torch.linalg.solve_triangular(tril, eye, upper=False)  # (*b, K, D, D)
        self.whiten = linv.reshape(*linv.shape[:-3], k * d, d).transpose(-1, -2).contiguous()
        self.shift = (linv @ m.unsqueeze(-1)).squeeze(-1)  # (*b, K, D)
        self.const = -tril.diagonal(dim1=-2, dim2=-1).log().sum(-1) - 0.5 * d * _LOG_2PI
        self.row_width = k * d

    def params(self, bt: Optional[torch.Size]) -> tuple[Tensor, ...]:
        k, d = self.num_components, self.dim
        return (
            _groups(self.whiten, bt, (d, k * d)),
            _groups(self.shift, bt, (k, d)),
            _groups(self.const, bt, (k,)),
        )

    def score_chunk(
        self, chunk: Tensor, params: tuple[Tensor, ...], bt: Optional[torch.Size]
    ) -> Tensor:
        mat, shift, const = params
        z = (chunk @ mat).unflatten(-1, (self.num_components, self.dim)) - shift.unsqueeze(-3)
        return const.unsqueeze(-2) - 0.5 * z.square().sum(-1)  # (G, c, K)


def gaussian_scorer(gm: GaussianMixture, *, precise: bool = False) -> GaussianScorer:
    """The scorer for `gm`'s strategy: scalar, diagonal (GEMM) or whitened full covariance."""
    if gm.scale_diag is None:
        return WhitenedScorer(gm, precise=precise)
    if gm.dim == 1:
        return ScalarScorer(gm, precise=precise)
    return DiagonalScorer(gm, precise=precise)


def logsumexp_last(x: Tensor) -> Tensor:
    """`logsumexp` over the last dimension (faster than torch's for a short last dimension)."""
    if x.shape[-1] == 1:
        return x.squeeze(-1)
    m = x.detach().amax(-1, keepdim=True)
    m = m.nan_to_num(0.0, 0.0, 0.0)  # a non-finite maximum shifts by 0
    # Terms below exp(-80) (float32) / exp(-700) (float64) change nothing; clamping them keeps
    # exp out of the subnormal range, which is ten times slower on CPUs.
    floor = -80.0 if x.dtype.itemsize < 8 else -700.0
    return (x - m).clamp_min(floor).exp().sum(-1).log() + m.squeeze(-1)


def mixture_log_prob(mixture: Distribution, x: Tensor) -> Tensor:
    r"""Log-density of a Gaussian mixture (or one Gaussian) at `x`, in nats, by matrix products.

    $$
    \log p(x) = \operatorname{logsumexp}_k \Big[\log w_k - \tfrac12 \|L_k^{-1}(x - \mu_k)\|^2
        - \log\lvert L_k\rvert - \tfrac{D}{2}\log 2\pi\Big]
    $$

    The same values as `mixture.log_prob(x)` (to float rounding), without torch's
    `(samples, *batch, K, D)` intermediate: diagonal components are scored by one GEMM of the
    features `[y^2, y]` (`y = x - c`, centred on the mixture mean `c`) against a
    `(2D, K)` matrix, full-covariance components by one GEMM against the stacked inverse
    Cholesky factors, in chunks of samples. See the module docstring.

    Accepts `MixtureSameFamily` of `Normal`, `Independent(Normal, 1)`,
    `MultivariateNormal` or `LowRankMultivariateNormal` components, and those distributions
    alone (one component). Any other distribution falls back to its own `log_prob`.
    Differentiable in `x` and in the parameters.

    Source: the expansion of the Gaussian quadratic form; Cholesky whitening as in
    torch.distributions.multivariate_normal._batch_mahalanobis.

    Args:
        mixture: the distribution to score.
        x: values of shape `(*sample, *batch_x, *event_shape)`; `batch_x` broadcasts against
            `mixture.batch_shape` as in `log_prob`.

    Returns:
        Tensor of shape `(*sample, *broadcast_shapes(batch_x, mixture.batch_shape))`.

    Raises:
        ValueError: when `x` does not end with the event shape.
    """
    if not is_gaussian_family(mixture):
        return mixture.log_prob(x)
    event = mixture.event_shape
    if x.dim() < len(event) or x.shape[x.dim() - len(event) :] != event:
        raise ValueError(
            f"x must end with the event shape {tuple(event)}, got shape {tuple(x.shape)}."
        )
    return gaussian_scorer(as_gaussian_mixture(mixture)).log_prob(x)
