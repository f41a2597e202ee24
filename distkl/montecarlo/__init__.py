r"""Monte Carlo estimates with honest standard errors: `kl_mc`, `jsd_mc` and `expectation`.

The engine estimates $\mathbb{E}_{x \sim p}[f(x)]$ for a mixture $p = \sum_k w_k p_k$ by

1. **stratifying over the components** with the weights applied analytically,
   $\mathbb{E}_p[f] = \sum_k w_k\, \mathbb{E}_{p_k}[f]$: each batch element gives component
   `k` a fixed share $n_k \approx w_k N$ of the `N` samples (proportional allocation,
   at least $\min(64, \lfloor N / 16K \rfloor)$ and at least two each, so that a tiny-weight
   component's variance is not estimated from two draws), so the between-component variance
   disappears and the estimate is never noisier than sampling the mixture (its variance is
   $\sum_k w_k \sigma_k^2 / N$ against
   $(\sum_k w_k \sigma_k^2 + \sum_k w_k (\mu_k - \mu)^2) / N$). With fewer than two samples
   per component the weights' CDF is cut into `N` intervals, one draw each (`_strata`):
   still unbiased, at any `N >= 1`;
2. **control variates with known means**, fitted per stratum by regression and **cross-fitted**:
   the samples of each stratum are split in two folds, the coefficients for one fold come from
   the other fold, so the estimate stays exactly unbiased and its standard error honest. The
   controls are $\log p_k(x) + H(p_k)$ (zero mean, entropy in closed form) and, for KL
   against a Gaussian-family `q`, $\log q_j(x) - \mathbb{E}_{p_k}[\log q_j]$ for the
   component `j` of `q` that best matches `p_k` (a Gaussian cross-entropy, closed form).
   A regression can set a coefficient to zero, so the controls never make the estimate worse
   beyond an $O(1/n)$ factor (`_fit`, `_integrand`);
3. **streaming**: samples are drawn and reduced in chunks, merged with Chan et al.'s parallel
   update of means and co-moments, so memory is bounded by the chunk, not by `N`
   (`_engine`, `_moments`).

Gaussian components are sampled from base noise drawn with the given `torch.Generator`, so
every component is reparameterized and gradients reach the component parameters pathwise and the
weights exactly. Families without `rsample` get a score-function term (leave-one-out baseline),
unbiased too (`_samplers`).

Not used: the popular "k3" estimator $(r - 1) - \log r$, $r = q(x)/p(x)$. It adds the
control $r - 1$, whose variance $\int q^2/p - 1$ is infinite as soon as `q` is at
least twice as wide as `p` in some direction ($\Sigma_q \not\prec 2\Sigma_p$); its
sample variance then understates the error with high probability. The regression controls above
have finite variance for every Gaussian-family pair.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.distributions import Distribution

from distkl._checks import batch_shape_of, check_same_event_shape, check_skew
from distkl._logspace import clamp_to_js_range
from distkl._options import get_options, samples_per_pair
from distkl._pathwise import kl_pathwise, pathwise_applies
from distkl._reverse import kl_mixture_to_gaussian, reverse_applies
from distkl.montecarlo._engine import run
from distkl.montecarlo._estimate import Estimate
from distkl.montecarlo._integrand import (
    KLIntegrand,
    bounded_terms,
    log_density,
    same_distribution,
)
from distkl.montecarlo._samplers import Draw, make_sampler

__all__ = ["Estimate", "expectation", "kl_mc", "jsd_mc"]


def expectation(
    p: Distribution,
    f: Callable[[Tensor], Tensor],
    *,
    num_samples: int,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    batch_shape: Optional[Sequence[int]] = None,
    control_variates: bool = True,
    f_range: Optional[tuple[float, float]] = None,
) -> Estimate:
    r"""Stratified Monte Carlo estimate of $\mathbb{E}_{x \sim p}[f(x)]$, with its stderr.

    $$
    \mathbb{E}_p[f] = \sum_k w_k\, \mathbb{E}_{x \sim p_k}[f(x)]
    \approx \sum_k w_k\, \frac{1}{n_k} \sum_{i=1}^{n_k}
        \big(f(x_{ki}) - \beta_k^\top c_k(x_{ki})\big)
    $$

    For a `MixtureSameFamily` `p` each batch element gives component `k` a share
    $n_k \approx w_k N$ of the `N` samples (at least 2, see the module docstring; with
    fewer than 2 per component, one draw per interval of the weights' CDF); other distributions
    are one stratum. $c_k(x) = \log p_k(x) + H(p_k)$ is a zero-mean control variate when the
    components' entropy is known (all Gaussian families), with coefficients fitted by regression
    on the other half of the stratum's samples (cross-fitting: exactly unbiased). Gaussian
    components are reparameterized (gradients flow pathwise into the components, exactly into
    the weights); families without `rsample` get a score-function term.

    `f` receives `x` of shape `(n, *batch_p, *event_shape)`, `n` a chunk of samples
    (sample dimension leading, `batch_p = p.batch_shape` or `batch_shape`), and returns
    `(n, *batch_out)` where `batch_out` broadcasts with `batch_p`; `q.log_prob(x)`
    therefore broadcasts against `q`'s batch as usual. Row `i` of `x` was drawn from the
    component given by the allocation, so `f` must act row by row (no mixing of samples). Where
    `batch_out` is wider than `batch_p`, the samples of `p` are shared along the broadcast
    dimensions (each element is still unbiased with an honest standard error); pass
    `batch_shape` to draw independent samples per element instead.

    Source: stratified sampling with proportional allocation and regression control variates
    (Owen, "Monte Carlo theory, methods and examples", 2013, ch. 8.4 and 8.9); cross-fitting as in
    Chernozhukov et al. (2018), Econometrics J. 21(1); merging of moments: Chan, Golub & LeVeque
    (1979), "Updating formulae and a pairwise algorithm for computing sample variances".

    Args:
        p: the sampling distribution (`rsample` or `sample`).
        f: the integrand, see above.
        num_samples: samples per batch element (`N`), any `N >= 1`; the stderr is NaN where
            it cannot be estimated (a single sample per element).
        generator: a `torch.Generator` (on `p`'s device) making the draws reproducible.
        chunk_size: samples drawn and reduced at a time (default: from a memory budget).
        batch_shape: expand `p` to this batch shape first (independent draws per element).
        control_variates: fit the control variate (default `True`).
        f_range: `(low, high)` bounds of `f` when known: the standard error then also
            allows for a value in that range the draws never hit (half a pseudo-sample at the
            far end per stratum), which keeps intervals honest when almost every draw gives the
            same value (near-disjoint JSD).

    Returns:
        [`Estimate`][distkl.Estimate] with `value` and `stderr` of shape
        `broadcast_shapes(batch_p, batch_out)`.
    """
    sampler = make_sampler(p, None if batch_shape is None else torch.Size(batch_shape))

    def integrand(draw: Draw, idx: Tensor, controls: bool) -> tuple[Tensor, Optional[Tensor]]:
        return f(draw.x), None

    return run(
        sampler,
        integrand,
        num_samples=num_samples,
        generator=generator,
        chunk_size=chunk_size,
        use_controls=control_variates,
        out_batch=None,
        row_elements=sampler.row_elements() * max(1, sampler.batch_shape.numel()) * 4,
        value_range=f_range,
    )


def kl_mc(
    p: Distribution,
    q: Distribution,
    *,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    control_variates: bool = True,
    samples: Optional[Tensor] = None,
) -> Estimate:
    r"""Monte Carlo estimate of KL(p || q) in nats, unbiased, with an honest standard error.

    $$
    \mathrm{KL}(p \| q) = \sum_k w_k\, \mathbb{E}_{x \sim p_k}\big[\log p(x) - \log q(x)\big]
    $$

    Stratified over `p`'s mixture components (weights applied analytically), with per-stratum
    regression on zero-mean control variates $\log p_k(x) + H(p_k)$ and
    $\log q_j(x) - \mathbb{E}_{p_k}[\log q_j]$ (closed-form Gaussian entropy and
    cross-entropy; `j` the component of `q` best matching `p_k`), cross-fitted so the value
    stays exactly unbiased; see `distkl.montecarlo`. Log-densities of Gaussian families are
    computed by [`distkl.mixture_log_prob`][distkl.mixture_log_prob]'s matrix products, and samples
    are drawn and reduced in chunks, so memory does not grow with `num_samples` (unless autograd has
    to keep the chunks for a backward pass).

    Identical `p` and `q` (the same object, or equal parameters in a batch element) give
    exactly 0 with standard error 0. Gradients are unbiased: pathwise through Gaussian (and any
    `rsample`) components, exact through the mixture weights, score-function otherwise.

    Source: Owen (2013), "Monte Carlo theory, methods and examples", ch. 8 (stratification,
    control variates); Hershey & Olsen (2007), ICASSP, eq. (4) (the Monte Carlo baseline).

    Args:
        p: any distribution with `rsample` or `sample` (Gaussian families and their
            `MixtureSameFamily` get the fast stratified path).
        q: any distribution with `log_prob` and the same event shape.
        num_samples: samples per batch element, any `N >= 1` (default: the
            [`distkl.options`][distkl.options] value, else a per-call budget shared by the batch).
            Below 2 per component of `p` the weights' CDF is stratified into `N` intervals
            (unbiased; the stderr from adjacent pairs of intervals is conservative); with `N = 1`
            the stderr is NaN: one draw says nothing about the spread.
        generator: a `torch.Generator` on `p`'s device; the same generator state gives
            the same estimate (default: the options' generator, else torch's global one).
        chunk_size: samples drawn and reduced at a time (default: the options' value, else
            from a memory budget).
        control_variates: use the regression control variates (default `True`).
        samples: shared samples `z = p.rsample()` or `p.rsample((n,))` already drawn by the
            caller (e.g. for a VAE's reconstruction term): the estimate at those samples, with
            the pathwise gradient through them and no second sampling pass. p must be one
            Normal-family distribution. One Normal-family p without `samples` takes the same
            estimator (`distkl._pathwise`) with fresh samples, at any `num_samples >= 1`.

    Returns:
        [`Estimate`][distkl.Estimate]: `value` and `stderr` of shape
        `broadcast_shapes(p.batch_shape, q.batch_shape)`, and `num_samples`. The stderr is
        NaN where it cannot be estimated (one sample, or one antithetic pair, per pair).

    Raises:
        ValueError: when the event shapes differ, batch shapes do not broadcast, or
            `num_samples` / `chunk_size` is not a positive int.
        TypeError: when `generator` is not a `torch.Generator`.
    """
    return _kl_mc(p, q, num_samples, generator, chunk_size, control_variates, samples, True)


def kl_mc_value(
    p: Distribution,
    q: Distribution,
    *,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """The registered rule's method "mc": `kl_mc`'s value without its standard error (the
    few-sample estimator skips computing it), except that a diagonal mixture p against one
    Normal-family q takes `distkl._reverse` (the cross term exact; unbiased, but no honest
    standard error at few draws, which `kl_mc` must report)."""
    return _kl_mc(p, q, num_samples, generator, chunk_size, True, None, False).value


def _kl_mc(
    p: Distribution,
    q: Distribution,
    num_samples: Optional[int],
    generator: Optional[torch.Generator],
    chunk_size: Optional[int],
    control_variates: bool,
    samples: Optional[Tensor],
    stderr: bool,
) -> Estimate:
    opts = get_options()
    check_same_event_shape(p, q)
    batch = batch_shape_of(p, q)
    n = samples_per_pair(opts.num_samples if num_samples is None else num_samples, batch.numel())
    gen = opts.generator if generator is None else generator
    # The value alone, of a diagonal mixture p against one Gaussian q: distkl._reverse (the
    # cross term exact; it has no honest standard error at few draws, see there).
    if not stderr and samples is None and batch.numel() > 0 and reverse_applies(p, q, n):
        value = kl_mixture_to_gaussian(p, q, num_samples=n, generator=gen)
        return Estimate(value, torch.full_like(value.detach(), math.nan), n)
    # One Gaussian p: distkl._pathwise. An empty batch stays here (an empty result, no draws).
    if samples is not None or (batch.numel() > 0 and pathwise_applies(p, q, n)):
        r = kl_pathwise(
            p,
            q,
            num_samples=n,
            samples=samples,
            control_variates=control_variates,
            generator=gen,
            stderr=stderr,
        )
        return Estimate(r.value, r.stderr, r.num_samples)
    sampler = make_sampler(p)
    integrand = KLIntegrand(p, q, sampler, batch)
    est = run(
        sampler,
        integrand,
        num_samples=n,
        generator=gen,
        chunk_size=opts.chunk_size if chunk_size is None else chunk_size,
        use_controls=control_variates,
        out_batch=batch,
        row_elements=integrand.row_elements(),
    )
    mixtures = (
        None if integrand.gp is None or integrand.gq is None else (integrand.gp, integrand.gq)
    )
    equal = same_distribution(p, q, batch, est.value.device, mixtures)
    if equal is not None:
        zero = torch.zeros_like(est.value)
        est = Estimate(torch.where(equal, zero, est.value), torch.where(equal, zero, est.stderr), n)
    return est


def jsd_mc(
    p: Distribution,
    q: Distribution,
    *,
    skew: float = 0.5,
    num_samples: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
) -> Estimate:
    r"""Monte Carlo estimate of JS_alpha(p, q) in nats with its standard error, in [0, H(alpha)].

    Samples come from both `p` and `q` (`num_samples` each), and each point's term depends
    only on $\pi(x) = \alpha p(x) / m(x)$, the posterior probability that `x` came from
    `p`:

    $$
    \widehat{\mathrm{JS}}_\alpha = \frac{\alpha}{n}\sum_{x_i \sim p} u(\pi(x_i))
    + \frac{1-\alpha}{n}\sum_{y_j \sim q} v(\pi(y_j)),\quad
    u = -\log\alpha\,\rho,\; v = -\log(1-\alpha)\,\rho,\;
    \rho = 1 - \frac{H_b(\pi)}{-\pi\log\alpha - (1-\pi)\log(1-\alpha)}
    $$

    It is unbiased ($\pi u + (1-\pi) v = \mathrm{kl}(\pi \| \alpha)$ and
    $\mathbb{E}_m[\mathrm{kl}(\pi\|\alpha)] = \mathrm{JS}_\alpha$), and since
    $\rho \in [0, 1]$ every estimate, even from a handful of samples, lies in
    $[0, \alpha(-\log\alpha) + (1-\alpha)(-\log(1-\alpha))] = [0, H(\alpha)]$, with no
    clamping; it is exactly 0 when `p = q`. At `alpha = 1/2` the terms are
    $\log 2 - H_b(\pi)$, the "discriminator" form of the JSD; against averaging
    $\log(p/m)$ and $\log(q/m)$ it cuts the variance several-fold
    (`benchmarks/bench_jsd_mc.py`).

    The standard error allows for values the draws never hit: the terms are bounded, and each
    stratum counts half a pseudo-sample at the far end of the range
    (`expectation(f_range=...)`), so near-disjoint pairs, where almost every draw gives the
    same term, still get intervals that cover (measured: 0.95-0.98 where the overlap is reached
    by a few draws, conservative where no draw reaches it).

    Both expectations run on [`distkl.montecarlo.expectation`][distkl.montecarlo.expectation]
    without control variates (which could leave the range): stratified over mixture components with
    proportional allocation (any `num_samples >= 1`), chunked, reparameterized for Gaussian families
    (pathwise gradients, exact ones for the mixture weights) and any `rsample` family, with a
    score-function term otherwise. `p` and `q` need `log_prob` on each other's samples.

    Source: Lin (1991), IEEE Trans. Inf. Theory 37(1) for the divergence; the posterior form
    $\mathrm{JS}_{1/2} = \log 2 - \mathbb{E}_m[H_b(\pi)]$ is that of Goodfellow et al.
    (2014), "Generative adversarial nets", Theorem 1.

    Args:
        p: the first distribution.
        q: the second distribution, with the same event shape and a batch shape that
            broadcasts with `p`'s.
        skew: `alpha` in (0, 1), the weight of `p` in `m`.
        num_samples: draws from each of `p` and `q` per batch element (default: the
            [`distkl.options`][distkl.options] value).
        generator: `torch.Generator` on the parameters' device, for reproducibility
            (default: the options' generator, else torch's global one).
        chunk_size: samples drawn and reduced at a time (default: the options' value, else
            from a memory budget).

    Returns:
        [`Estimate`][distkl.Estimate] whose `value` and `stderr` (detached) have shape
        `broadcast_shapes(p.batch_shape, q.batch_shape)`; its `num_samples` counts the draws
        from `p` and `q` together (`2 * num_samples`).

    Raises:
        ValueError: bad `skew` or `num_samples` (not a positive int),
            different event shapes, batch shapes that do not broadcast.
        TypeError: `generator` is not a `torch.Generator`.
    """
    alpha = check_skew(skew)
    opts = get_options()
    gen = opts.generator if generator is None else generator
    check_same_event_shape(p, q)
    batch_shape = batch_shape_of(p, q)
    n = opts.num_samples if num_samples is None else num_samples
    n = samples_per_pair(n, batch_shape.numel())
    log_p, log_q = log_density(p), log_density(q)

    def u(x: Tensor) -> Tensor:
        return bounded_terms(log_p(x), log_q(x), alpha)[0]

    def v(x: Tensor) -> Tensor:
        return bounded_terms(log_p(x), log_q(x), alpha)[1]

    e_p, e_q = (
        expectation(
            d,
            f,
            num_samples=n,
            generator=gen,
            chunk_size=opts.chunk_size if chunk_size is None else chunk_size,
            batch_shape=batch_shape,
            control_variates=False,
            f_range=(0.0, bound),
        )
        for d, f, bound in ((p, u, -math.log(alpha)), (q, v, -math.log1p(-alpha)))
    )
    value = alpha * e_p.value + (1.0 - alpha) * e_q.value
    stderr = (alpha**2 * e_p.stderr.square() + (1.0 - alpha) ** 2 * e_q.stderr.square()).sqrt()
    same = same_distribution(p, q, batch_shape, value.device)
    if same is not None:  # every term is exactly 0: no unseen value to allow for
        stderr = torch.where(same, torch.zeros_like(stderr), stderr)
    # The value is a convex combination of terms in [0, H(alpha)]: the clamp only removes
    # rounding excursions.
    return Estimate(clamp_to_js_range(value, alpha), stderr, e_p.num_samples + e_q.num_samples)
