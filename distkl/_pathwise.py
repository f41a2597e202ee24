r"""KL(p || q) in nats for one Gaussian p, at few or shared samples: the training-loop estimator.

A VAE step draws $z = \mu + \sigma \epsilon$ from the posterior $p$ for its reconstruction term
and needs $\mathrm{KL}(p \| q)$ against a prior $q$ (a Gaussian mixture, or anything with
`log_prob`). This module computes it at those samples (or at `n >= 1` fresh ones) with one
evaluation of $\log q$, from

$$
\mathrm{KL}(p \| q) = -H(p) - \mathbb{E}_p[\log q(z)],
$$

and two zero-mean control variates for each sample unit $u$:

* $c_1 = \log p(z_u) + H(p) = (D - \|\epsilon_u\|^2) / 2$ (the analytic entropy): the naive
  estimate is $-H - \log q + c_1$, the "analytic" one $-H - \log q$; the coefficient of $c_1$
  decides between them and everything in between;
* $c_2 = \log q_{j}(z_u) - \mathbb{E}_p[\log q_{j}]$ for the component $j$ of a Gaussian-family
  $q$ that best matches $p$ (a Gaussian cross-entropy, closed form). Unlike $c_1$ it has a
  pathwise gradient with zero mean, so it is also a control variate for the gradient (with
  respect to both $p$'s and $q$'s parameters): it removes the part of $\nabla \log q(z)$ that
  the dominant component explains. It is used from `MATCHED_MIN_SAMPLES` (8) samples per pair
  and `MATCHED_MIN_DIM` (4) event dimensions: below either, its fixed cost (about twenty
  operations) is not repaid. Measured (`benchmarks/bench_mc_training.py`, batch 128): at D = 2
  and n = 8-16 it cut the value's and the posterior gradient's variance 1.6-2.6x but made the
  step 1.1-1.3x the naive snippet's time (0.9-1.0x without it); at n = 1 and 4 without it
  those variances are the naive snippet's (ratios 0.9-1.3 on the generic grid), and in the
  trained regime still 49x (value, n = 1) and 28x (gradient, n = 2) below it.

Diagonal p and q take `_few_diagonal`: the same estimator as one autograd node with a
hand-written backward (`distkl._few`), centred on $-\log \sum_k v_k \exp \mathbb{E}_p[\log q_k]$,
scoring q elementwise at a training step's sizes and by matrix products beyond them (one q for
the batch). Other pairs take the general path below.

The coefficients are fitted by least squares on the units of the whole call (across the batch,
so one sample per pair is enough) and **cross-fitted**: unit $u$'s coefficients come from all the
other units (leave-one-out), so they are independent of $u$ and the estimate stays unbiased in
value and gradient. With fewer than `MIN_FIT_UNITS` units the naive weights are used.

Antithetic draws ($\epsilon$ and $-\epsilon$) are used at even `n` when $p$ is narrow against
$q$'s components (scale ratio below `ANTITHETIC_RATIO` in at least half of the batch): the
linear part of $\log q$ around $\mu$, which dominates the gradient's noise there, cancels within
each pair. They are never used for shared samples (the caller drew them).

Standard error: from the spread of the units of each pair (`n` samples, or `n / 2` antithetic
pairs). With one unit it cannot be estimated and is NaN.

Source: regression control variates, Owen, "Monte Carlo theory, methods and examples" (2013),
ch. 8.9; analytic entropy in the ELBO: Kingma & Welling (2014), "Auto-encoding variational
Bayes", eq. (10); antithetic sampling: Owen (2013) ch. 8.2; cross-fitting: Chernozhukov et al.
(2018), Econometrics J. 21(1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.distributions import Distribution, MixtureSameFamily

from distkl._checks import batch_shape_of, check_positive_int, check_same_event_shape
from distkl._diagonal import diag_log_normaliser, diag_mixture_log_prob
from distkl._few import FewSpec, few_diagonal, matched_control, pair_means
from distkl._gaussian import (
    GaussianMixture,
    as_gaussian_mixture,
    diagonal_params,
    half_log_det,
    is_gaussian_family,
    pairwise_kl,
    same_parameters,
)
from distkl._rng import rng_scope
from distkl._stats import MIN_FIT_UNITS, loo_coefficients, t_stderr
from distkl.density import gaussian_scorer

__all__ = ["pathwise_applies", "kl_pathwise", "PathwiseResult", "MIN_FIT_UNITS"]

#: Antithetic pairs when the posterior's largest scale is below this fraction of the smallest
#: component scale of q (in at least half of the batch).
ANTITHETIC_RATIO = 0.5
#: Largest `n * batch * (components of q + event size)` the estimator takes on its own when
#: the caller did not pass samples (beyond it the chunked stratified engine is cheaper on memory).
MAX_WORK = 1 << 23
#: Largest `(*sample, *batch, K, D)` intermediate scored elementwise (beyond: GEMMs).
ELEMENTWISE_LIMIT = 1 << 18
_LOG_2PI = math.log(2 * math.pi)
#: Fewest samples per pair for the matched control c_2 (below: c_1 only; see the module docstring).
MATCHED_MIN_SAMPLES = 8
#: Fewest event dimensions for the matched control c_2 (below: c_1 only; see the module docstring).
MATCHED_MIN_DIM = 4


@dataclass(frozen=True)
class PathwiseResult:
    """KL(p || q) estimate: `value` (differentiable), `stderr` (detached), `num_samples`."""

    value: Tensor
    stderr: Tensor
    num_samples: int


def pathwise_applies(p: Distribution, q: Distribution, num_samples: int) -> bool:
    """True when `kl_pathwise` takes the pair at `num_samples` fresh samples per pair.

    p must be one Normal-family distribution (not a mixture), and the work small enough to hold
    all samples at once.
    """
    if isinstance(p, MixtureSameFamily) or not is_gaussian_family(p):
        return False
    try:
        batch = batch_shape_of(p, q)
    except ValueError:
        return False
    kq = _num_components(q)
    d = max(1, p.event_shape.numel())
    return num_samples * max(1, batch.numel()) * (kq + d) <= MAX_WORK


def _num_components(q: Distribution) -> int:
    if isinstance(q, MixtureSameFamily):
        return int(q.mixture_distribution.logits.shape[-1])
    return 1


def kl_pathwise(
    p: Distribution,
    q: Distribution,
    *,
    num_samples: Optional[int] = None,
    samples: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    antithetic: Optional[bool] = None,
    control_variates: bool = True,
    stderr: bool = True,
) -> PathwiseResult:
    r"""KL(p || q) in nats for one Normal-family p: unbiased, at `n >= 1` or the caller's samples.

    $$
    \mathrm{KL}(p \| q) \approx \frac{1}{m} \sum_{u=1}^{m}
        \big[-H(p) - \log q(z_u) + \gamma_{u} c_1(z_u) - \beta_{u} c_2(z_u)\big]
    $$

    with leave-one-out coefficients; see the module docstring.

    Source: Owen (2013), "Monte Carlo theory, methods and examples", ch. 8.2 and 8.9.

    Args:
        p: `Normal`, `Independent(Normal, 1)`, `MultivariateNormal` or
            `LowRankMultivariateNormal` (or a subclass).
        q: any distribution with `log_prob` and p's event shape (Gaussian families and their
            mixtures get the matched-component control and the fast log-density).
        num_samples: fresh samples per pair (default 1); ignored with `samples`.
        samples: `z = p.rsample()` or `p.rsample((n,))`, drawn by the caller (for the
            reconstruction term); the pathwise gradient flows through them.
        generator: a `torch.Generator` for the fresh samples.
        antithetic: pair each draw with its mirror image (default: when p is narrow against q's
            components and `n` is even).
        control_variates: fit the control variates (default `True`); `False` gives the naive
            estimate $\log p(z) - \log q(z)$ averaged over the samples.
        stderr: compute the standard error (default `True`); `False` leaves it NaN (for a
            caller that only needs the value, such as the registered rule).

    Returns:
        `PathwiseResult` of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        ValueError: for different event shapes, non-broadcasting batch shapes, a bad sample
            count, or `samples` of the wrong shape.
        NotImplementedError: when p is not a single Normal-family distribution.
    """
    if isinstance(p, MixtureSameFamily) or not is_gaussian_family(p):
        raise NotImplementedError(
            "the shared-sample estimator needs p to be one Normal, Independent(Normal, 1), "
            f"MultivariateNormal or LowRankMultivariateNormal, got {type(p).__name__}."
        )
    check_same_event_shape(p, q)
    batch = batch_shape_of(p, q)
    gp = as_gaussian_mixture(p, role="p")
    gq = as_gaussian_mixture(q, role="q") if is_gaussian_family(q) else None
    pad = (1,) * (len(batch) - len(p.batch_shape))
    scoring = _few_scoring(gp, gq, samples, num_samples, batch)
    few = scoring is not None
    eps, z, paired = _draws(p, gp, num_samples, samples, generator, antithetic, gq, not few)
    n = eps.shape[0]
    if few:
        assert gq is not None
        gemm = scoring == "gemm"
        value, se = _few_diagonal(p, gq, eps, z, paired, pad, gemm, control_variates, stderr)
        return _finish(gp, gq, value, se, n)
    assert z is not None
    z_b = z.reshape(n, *pad, *z.shape[1:])
    matched = _matched(control_variates, n, gp.dim)
    y, c2, base = _log_q_terms(q, gp, gq, z_b, control_variates, matched, batch)
    c1 = 0.5 * (gp.dim - eps.square().sum(-1))  # (n, *batch_p), detached
    c1 = c1.reshape(n, *pad, *c1.shape[1:]).to(y.dtype).expand(n, *batch)
    ent = (0.5 * gp.dim * (1.0 + _LOG_2PI) + 0.5 * gp.log_det_cov()[..., 0]).to(y.dtype)
    if paired:  # units: pairs (z, mirrored z)
        y, c1 = pair_means(y), pair_means(c1)
        c2 = None if c2 is None else pair_means(c2)
    controls = [c1] if c2 is None else [c1, c2]
    units = torch.stack([y.detach() - base.detach(), *[c.detach() for c in controls]], -1)
    coef = loo_coefficients(units, p.batch_shape, pad) if control_variates else None
    if coef is None:  # the naive estimate: log p(z) - log q(z) = c1 - H - log q
        per_unit = y + c1
    else:
        per_unit = y - coef[..., 0] * c1
        if c2 is not None:
            per_unit = per_unit - coef[..., 1] * c2
    m = per_unit.shape[0]
    value = per_unit.mean(0) - ent
    se = t_stderr(per_unit.detach(), m) if stderr else None
    return _finish(gp, gq, value, se, n)


def _finish(
    gp: GaussianMixture,
    gq: Optional[GaussianMixture],
    value: Tensor,
    se: Optional[Tensor],
    n: int,
) -> PathwiseResult:
    """Exactly 0 for equal parameters, p's dtype, a NaN standard error when none was asked."""
    if gq is not None and gq.num_components == 1:  # equal parameters: exactly 0, as the
        same = same_parameters(gp, gq)  # stratified engine gives (a mixture never equals p)
        value = torch.where(same, torch.zeros_like(value), value)
        se = None if se is None else torch.where(same, torch.zeros_like(se), se)
    out_dtype = gp.loc.dtype
    value = value.to(out_dtype)
    se = torch.full_like(value.detach(), math.nan) if se is None else se.to(out_dtype)
    return PathwiseResult(value, se, n)


def _matched(control_variates: bool, n: int, d: int) -> bool:
    """Use the matched control c_2 (see the module docstring)."""
    return control_variates and n >= MATCHED_MIN_SAMPLES and d >= MATCHED_MIN_DIM


def _few_scoring(
    gp: GaussianMixture,
    gq: Optional[GaussianMixture],
    samples: Optional[Tensor],
    num_samples: Optional[int],
    batch: torch.Size,
) -> Optional[str]:
    """How `_few_diagonal` scores q for diagonal p and q: "elementwise" (small), "gemm" (one q
    for the batch, up to `MAX_WORK`, on a device with float64), or None (the general path)."""
    if gq is None or gp.scale_diag is None or gq.scale_diag is None:
        return None
    if samples is not None:
        if not isinstance(samples, Tensor):  # `_draws` says what it expected
            return None
        n = samples.shape[0] if samples.dim() > len(gp.batch_shape) + len(gp.event_shape) else 1
    else:
        n = 1 if num_samples is None else num_samples
    pairs = max(1, batch.numel())
    if n * pairs * gp.dim * gq.num_components <= ELEMENTWISE_LIMIT:
        return "elementwise"
    float64 = gq.loc.device.type != "mps"  # the products' expanded squares need it
    if float64 and _one_q(gq) is not None and n * pairs * (gq.num_components + gp.dim) <= MAX_WORK:
        return "gemm"
    return None


def _one_q(gq: GaussianMixture) -> Optional[tuple[Tensor, Tensor, Tensor]]:
    """q's `(log-weights (K,), means (K, D), scales (K, D))` when every batch element is the same
    q: a batch of one, or an expanded one (stride 0 along the batch, as `Distribution.expand`
    and Pyro's plates make it); None otherwise. Indexing the expanded view returns the whole
    gradient to the shared parameters."""
    assert gq.scale_diag is not None
    fields = (gq.log_weights, gq.loc, gq.scale_diag)
    nb = len(gq.batch_shape)
    if gq.log_weights.numel() != gq.num_components and not all(
        all(s == 0 or n == 1 for s, n in zip(t.stride()[:nb], t.shape[:nb])) for t in fields
    ):
        return None
    first = (0,) * nb
    return fields[0][first], fields[1][first], fields[2][first]


def _elementwise(gq: GaussianMixture, z: Tensor) -> bool:
    """Diagonal q, and `(*sample, *batch, K, D)` small enough to score elementwise."""
    return gq.scale_diag is not None and z.numel() * gq.num_components <= ELEMENTWISE_LIMIT


def _few_diagonal(
    p: Distribution,
    gq: GaussianMixture,
    eps: Tensor,
    z: Optional[Tensor],
    paired: bool,
    pad: tuple[int, ...],
    gemm: bool,
    control_variates: bool,
    stderr: bool,
) -> tuple[Tensor, Optional[Tensor]]:
    """The estimator for diagonal p and q as one autograd node (`distkl._few`) on the
    distributions' own parameters: `(value, stderr)`.

    `z` is the caller's samples `(n, *batch_p, *event)`, or None to draw `loc + scale * eps`
    inside the node.
    """
    assert gq.scale_diag is not None
    loc, scale = diagonal_params(p)  # (*batch_p, D), no view of them in the graph
    n, batch_p = eps.shape[0], p.batch_shape
    m = n // 2 if paired else n
    spec = FewSpec(
        eps=eps,
        pad=pad,
        batch_p=batch_p,
        paired=paired,
        fit=control_variates and m * max(1, batch_p.numel()) - 1 >= MIN_FIT_UNITS,
        stderr=stderr,
        matched=_matched(control_variates, n, loc.shape[-1]),
        gemm=gemm,
    )
    if z is not None:
        z = z.reshape(n, *pad, *batch_p, -1)
    q = (gq.log_weights, gq.loc, gq.scale_diag)
    if gemm:  # one q for the whole batch: (K,) and (K, D)
        shared = _one_q(gq)
        assert shared is not None
        q = shared
    value = few_diagonal(loc, scale, z, *q, spec)
    return value, spec.se


def _draws(
    p: Distribution,
    gp: GaussianMixture,
    num_samples: Optional[int],
    samples: Optional[Tensor],
    generator: Optional[torch.Generator],
    antithetic: Optional[bool],
    gq: Optional[GaussianMixture],
    want_z: bool = True,
) -> tuple[Tensor, Optional[Tensor], bool]:
    """`(eps (n, *batch_p, D) detached, z (n, *batch_p, *event), paired)`; z is None for fresh
    draws without `want_z`."""
    bp, ev = p.batch_shape, p.event_shape
    loc = gp.loc.squeeze(-2)  # (*bp, D)
    if samples is not None:
        if not isinstance(samples, Tensor):
            raise TypeError(f"samples must be a Tensor, got {type(samples).__name__}.")
        want = (*bp, *ev)
        if tuple(samples.shape) == want:
            z = samples.unsqueeze(0)
        elif samples.dim() == len(want) + 1 and tuple(samples.shape[1:]) == want:
            z = samples
        else:
            raise ValueError(
                f"samples must have shape (*p.batch_shape, *p.event_shape) = {want} or "
                f"(n, {', '.join(map(str, want))}) as p.rsample() / p.rsample((n,)) gives, "
                f"got {tuple(samples.shape)}."
            )
        if z.shape[0] == 0:
            raise ValueError("samples must hold at least one sample, got an empty sample dim.")
        zd = z.detach().reshape(z.shape[0], *bp, gp.dim)
        if gp.scale_diag is not None:
            eps = (zd - loc.detach()) / gp.scale_diag.squeeze(-2).detach()
        else:
            tril = gp.tril()[..., 0, :, :].detach()
            diff = (zd - loc.detach()).unsqueeze(-1)
            eps = torch.linalg.solve_triangular(tril, diff, upper=False).squeeze(-1)
        return eps, z, False
    n = 1 if num_samples is None else check_positive_int("num_samples", num_samples)
    with rng_scope(generator, loc.device):
        eps = torch.randn((n, *loc.shape), dtype=loc.dtype, device=loc.device)
    paired = n % 2 == 0 and antithetic is not False and (antithetic or gq is not None)
    if paired:  # mirror the second half where p is narrow (everywhere with antithetic=True)
        h = n // 2
        mirror = -eps[:h]
        if not antithetic:
            assert gq is not None
            mirror = torch.where(_narrow(gp, gq).unsqueeze(-1), mirror, eps[h:])
        eps = torch.cat([eps[:h], mirror], 0)
    if not want_z:
        return eps, None, paired
    if gp.scale_diag is not None:
        x = torch.addcmul(loc, gp.scale_diag.squeeze(-2), eps)
    else:
        x = loc + (gp.tril()[..., 0, :, :] @ eps.unsqueeze(-1)).squeeze(-1)
    return eps, x.reshape(n, *bp, *ev), paired


def _narrow(gp: GaussianMixture, gq: GaussianMixture) -> Tensor:
    """Mask `(*batch_p)`: p's largest scale below ANTITHETIC_RATIO x q's smallest scale."""
    sp = gp.scale_diag if gp.scale_diag is not None else gp.tril().diagonal(dim1=-2, dim2=-1)
    sq = gq.scale_diag if gq.scale_diag is not None else gq.tril().diagonal(dim1=-2, dim2=-1)
    smallest = sq.detach().amin((-1, -2)).min()  # one number for the whole call
    return sp.detach().amax((-1, -2)) < ANTITHETIC_RATIO * smallest


def _log_q_terms(
    q: Distribution,
    gp: GaussianMixture,
    gq: Optional[GaussianMixture],
    z: Tensor,
    controls: bool,
    matched: bool,
    batch: torch.Size,
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    r"""`(-log q(z) (n, *batch), c_2 (n, *batch) or None, baseline (*batch))`.

    One evaluation of $\log q$ at the samples (with gradient) and, for the matched control, of
    q's components at $\mu$ (without). The baseline approximates $\mathbb{E}_p[-\log q]$ per pair
    (only to centre the regression; any value independent of the samples keeps the estimate
    unbiased, but a baseline off by a pair-dependent constant makes the pooled fit's standard
    error too small): its second-order expansion around $\mu$ (`_baseline`) for a Gaussian q,
    $-\log q(\mu)$ otherwise.
    """
    n = z.shape[0]
    mu = gp.loc[..., 0, :].reshape(gp.loc.shape[:-2] + gp.event_shape)
    mu = mu.reshape(1, *(1,) * (z.dim() - 1 - mu.dim()), *mu.shape)
    mu = mu.expand(1, *z.shape[1:]).detach()
    if gq is None:
        lq = q.log_prob(z).expand(n, *batch)
        if not controls:
            return -lq, None, lq.new_zeros(batch)
        with torch.no_grad():  # the baseline and the matched component need no gradient
            base = -q.log_prob(mu).expand(1, *batch)[0]
        return -lq, None, base
    lq, factors = _log_q(gq, z)
    lq = lq.expand(n, *batch)
    if not controls:
        return -lq, None, lq.new_zeros(batch)
    with torch.no_grad():
        comp_mu = _component_log_prob(gq, mu, factors)[0]  # (*batch, Kq)
    if gp.scale_diag is None or gq.scale_diag is None:
        with torch.no_grad():  # E_p[-log q_k] - (-log q_k(mu)) = KL(p || q_k) + H(p) + log q_k(mu)
            entropy = 0.5 * gp.dim * (1.0 + _LOG_2PI) + half_log_det(gp)[..., 0]
            half_trace = pairwise_kl(gp, gq)[..., 0, :] + entropy.unsqueeze(-1) + comp_mu
        return -lq, None, _baseline(gq, comp_mu, half_trace).expand(batch)
    dt = comp_mu.dtype
    inv = gq.scale_diag.detach().to(dt).reciprocal()  # (*bq, Kq, D)
    with torch.no_grad():  # E_p[-log q_k] + log q_k(mu) = tr(Sigma_p S_k^-1) / 2
        var_p = gp.scale_diag.squeeze(-2).to(dt).square()  # (*bp, D)
        var_p = var_p.reshape(*(1,) * (len(batch) + 1 - var_p.dim()), *var_p.shape)
        trace = (var_p.unsqueeze(-2) * inv.square()).sum(-1)  # (*batch, Kq)
        base = _baseline(gq, comp_mu, 0.5 * trace).expand(batch)
    if not matched:
        return -lq, None, base
    with torch.no_grad():  # log v_k + E_p[log q_k] (less a constant): the match's score
        expected = comp_mu - 0.5 * trace + gq.log_weights.to(dt)
    zd = z.unsqueeze(-1) if len(gp.event_shape) == 0 else z
    pad = (1,) * (len(batch) - len(gp.batch_shape))
    p_params = (gp.loc.squeeze(-2).to(dt), gp.scale_diag.squeeze(-2).to(dt))
    q_params = (gq.loc.detach().to(dt), inv)
    c2 = matched_control(zd.to(dt), *p_params, *q_params, expected, pad)[0]
    return -lq, c2, base


def _baseline(gq: GaussianMixture, comp_mu: Tensor, half_trace: Tensor) -> Tensor:
    r"""$-\log q(\mu) + \sum_k r_k(\mu)\, t_k$ `(*batch)`, detached: the second-order expansion of
    $\mathbb{E}_p[-\log q]$ around $\mu$ from each component's own
    $t_k = \mathbb{E}_p[-\log q_k] + \log q_k(\mu)$, exact when q is one Gaussian.

    It centres the regression's target $-\log q(z)$ per pair. A baseline off by a constant that
    differs between pairs distorts the pooled, intercept-free fit: $-\log q(\mu)$ alone (off by
    the second term) made the standard error up to 2.7 times too small
    (`tests/test_properties.py`, the Normal-Normal row); the matched component's
    $-\log v_j - \mathbb{E}_p[\log q_j]$ (off by the other components' share) made the
    gradient's variance 10 to 80 times larger for narrow posteriors (`tests/test_training.py`)."""
    with torch.no_grad():
        log_q_mu = comp_mu + gq.log_weights.to(comp_mu.dtype)
        lse = torch.logsumexp(log_q_mu, -1, keepdim=True)
        resp = (log_q_mu - lse).exp()  # softmax, reusing the logsumexp
        return ((resp * half_trace).sum(-1, keepdim=True) - lse).squeeze(-1)


def _log_q(gq: GaussianMixture, z: Tensor) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
    """`log q(z)` of shape `(*sample, *batch)`, and the factors `_component_log_prob` reuses.

    Small diagonal problems by `distkl._diagonal` (fewest operations, forward and backward:
    at a VAE's sizes the time is the number of operations, not their size); everything else by
    `GaussianScorer`'s GEMMs.
    """
    if _elementwise(gq, z):
        assert gq.scale_diag is not None
        xs = z.unsqueeze(-1) if len(gq.event_shape) == 0 else z
        with torch.no_grad():
            inv = gq.scale_diag.reciprocal()  # (*bq, K, D)
            factors = (inv, diag_log_normaliser(inv))
        lw = gq.log_weights
        return diag_mixture_log_prob(xs, lw, gq.loc, gq.scale_diag, *factors), factors
    comp = gaussian_scorer(gq, precise=True).component_log_prob(z)
    return torch.logsumexp(comp + gq.log_weights.to(comp.dtype), -1), None


def _component_log_prob(
    gq: GaussianMixture, x: Tensor, factors: Optional[tuple[Tensor, Tensor]] = None
) -> Tensor:
    """`log q_j(x)` of shape `(*sample, *batch, Kq)` (elementwise with `_log_q`'s factors)."""
    if factors is not None:
        inv, log_norm = factors
        xs = x.unsqueeze(-1) if len(gq.event_shape) == 0 else x
        return log_norm - 0.5 * ((xs.unsqueeze(-2) - gq.loc) * inv).square().sum(-1)
    return gaussian_scorer(gq, precise=True).component_log_prob(x)
