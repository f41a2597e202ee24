r"""Latent regularisation for variational autoencoders, on distribution objects.

Two helpers that are easy to get subtly wrong by hand:

* [`kl_free_bits`][distkl.latent.kl_free_bits]: the "free bits" KL of Kingma et al. (2016), clamped
  from below per latent dimension *after* averaging over the minibatch (clamping each example
  separately is a different, weaker objective; `batch_dims=0` gives it when wanted).
* [`kl_annealing`][distkl.latent.kl_annealing]: the weight of the KL term at a training step, a
  linear warm-up (Bowman et al., 2016), optionally repeated in cycles (Fu et al., 2019).

A `beta`-VAE (Higgins et al., 2017) needs no helper: multiply the KL by `beta`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, Normal, kl_divergence

from distkl._checks import check_finite, check_positive_int, check_same_event_shape, unsupported

__all__ = ["kl_free_bits", "kl_annealing"]


def _reduce_batch(kl: Tensor, batch_dims: int, batch_shape: torch.Size) -> Tensor:
    check_positive_int("batch_dims", batch_dims, minimum=0)
    if batch_dims > len(batch_shape):
        raise ValueError(
            f"batch_dims={batch_dims} exceeds the number of batch dimensions of the KL, "
            f"batch shape {tuple(batch_shape)}."
        )
    if batch_dims == 0:
        return kl
    return kl.mean(dim=tuple(range(batch_dims)))


def kl_free_bits(
    *,
    posterior: Distribution,
    prior: Distribution,
    free_bits: float,
    batch_dims: int = 1,
    per_dimension: bool = True,
) -> Tensor:
    r"""KL(posterior || prior) in nats with "free bits": each dimension's minibatch-mean KL clamped.

    The arguments are keyword-only and named, so the direction cannot be swapped: this is
    $\mathrm{KL}(q \| p)$ with $q$ = `posterior` and $p$ = `prior`, the VAE's KL term.
    With `per_dimension=True` (the default) `q` and `p` must both be factorised Gaussians,
    `Independent(Normal, r)` with the same event shape; each of the event's elements `j` is one
    latent dimension:

    $$
    \tilde{\mathrm{KL}} = \sum_j \max\Bigl(\lambda,\;
        \frac{1}{B} \sum_{b=1}^{B} \mathrm{KL}\bigl(q(z_j \mid x_b) \,\|\, p(z_j)\bigr)\Bigr)
    $$

    where the mean runs over the first `batch_dims` batch dimensions (the minibatch, size
    $B$). A dimension whose average KL is below $\lambda$ gets no gradient from the
    KL term, so the encoder may use it "for free" up to $\lambda$ nats; this counters
    posterior collapse. With `per_dimension=False` the whole latent is one group,
    $\max(\lambda, \frac1B \sum_b \mathrm{KL}(q(z \mid x_b) \| p(z)))$, and any pair that
    `torch.distributions.kl_divergence` handles is accepted (e.g. a mixture prior once
    distkl's rules are registered; the KL is then computed by the method in force).

    The result is an objective, not a divergence: report the unclamped KL in the ELBO. It is to be
    added to the minibatch *mean* of the negative log-likelihood.

    Source: Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling (2016), "Improved Variational
    Inference with Inverse Autoregressive Flow", NeurIPS (arXiv:1606.04934), appendix, the "free
    bits" objective (latent dimensions divided into groups; here one group per dimension).

    Args:
        posterior: the posterior $q(z \mid x)$, batch shape `(*minibatch, *rest)`.
        prior: the prior $p(z)$; its batch shape must broadcast with the posterior's.
        free_bits: $\lambda \ge 0$, in nats per dimension (per group when
            `per_dimension=False`).
        batch_dims: how many leading batch dimensions to average over before clamping
            (default 1: the minibatch). `0` clamps every example separately.
        per_dimension: clamp each latent dimension (True) or the total KL (False).

    Returns:
        Tensor of shape `broadcast_shapes(q.batch_shape, p.batch_shape)[batch_dims:]`
        (a scalar for a plain minibatch).

    Raises:
        TypeError: `free_bits` is not a real number.
        ValueError: for a negative or non-finite `free_bits`, an invalid `batch_dims`, or
            event shapes that differ.
        NotImplementedError: with `per_dimension=True`, when `q` or `p` is not a factorised
            Gaussian `Independent(Normal, r)`.
    """
    lam = check_finite("free_bits", free_bits, minimum=0.0)
    q, p = posterior, prior
    if not per_dimension:
        kl = kl_divergence(q, p)
        return _reduce_batch(kl, batch_dims, kl.shape).clamp(min=lam)

    supported = ["Independent(Normal, r) for both (use per_dimension=False otherwise)"]
    roles = (("posterior (per-dimension free bits)", q), ("prior (per-dimension free bits)", p))
    for role, d in roles:
        if not (isinstance(d, Independent) and isinstance(d.base_dist, Normal)):
            raise unsupported(role, d, supported)
    assert isinstance(q, Independent) and isinstance(p, Independent)
    check_same_event_shape(q, p)
    r = q.reinterpreted_batch_ndims  # equal event shapes: p has the same r
    # Elementwise KL of the Normal factors: shape (*batch, *event).
    kl_elem = kl_divergence(q.base_dist, p.base_dist)
    batch_shape = kl_elem.shape[: kl_elem.dim() - r]
    kl_dim = _reduce_batch(kl_elem, batch_dims, batch_shape)
    return kl_dim.clamp(min=lam).sum(dim=tuple(range(-r, 0)))


def kl_annealing(
    step: int,
    *,
    warmup: int,
    start: float = 0.0,
    end: float = 1.0,
    cycle: Optional[int] = None,
) -> float:
    r"""The KL weight $\beta_t$ at training step `step` (0-based): a linear warm-up.

    $$
    \beta_t = \mathrm{start} + (\mathrm{end} - \mathrm{start})
        \min\Bigl(1, \frac{\tau}{\mathrm{warmup}}\Bigr),
    \qquad \tau = t \ \text{or}\ \tau = t \bmod \mathrm{cycle}
    $$

    The weight rises from `start` to `end` over `warmup` steps and then stays at `end`
    (Bowman et al.). With `cycle` the schedule restarts every `cycle` steps: cyclical
    annealing with ramp proportion `R = warmup / cycle` (Fu et al.). Use
    `loss = nll + kl_annealing(t, warmup=...) * kl`; `end` is the `beta` of a beta-VAE.

    Source: Bowman, Vilnis, Vinyals, Dai, Jozefowicz & Bengio (2016), "Generating Sentences from a
    Continuous Space", CoNLL, Sec. 3.1 (KL cost annealing); Fu, Li, Liu, Gao, Celikyilmaz & Carin
    (2019), "Cyclical Annealing Schedule: A Simple Approach to Mitigating KL Vanishing", NAACL,
    Eq. (6) with a linear $f$.

    Args:
        step: the training step `t >= 0`.
        warmup: steps of the linear ramp, `>= 0` (0: constant `end`).
        start: weight at the start of a ramp (default 0).
        end: weight after the ramp (default 1).
        cycle: period of the cyclical schedule in steps, `>= warmup`; None (default): one ramp.

    Returns:
        The weight, a Python float.

    Raises:
        ValueError: for a negative `step` or `warmup`, a non-finite `start`/`end`, or a
            `cycle` smaller than `warmup` or than 1.
    """
    check_positive_int("step", step, minimum=0)
    check_positive_int("warmup", warmup, minimum=0)
    if not (math.isfinite(start) and math.isfinite(end)):
        raise ValueError(f"start and end must be finite, got {start!r} and {end!r}.")
    tau = step
    if cycle is not None:
        check_positive_int("cycle", cycle, minimum=max(1, warmup))
        tau = step % cycle
    if warmup == 0 or tau >= warmup:
        return float(end)
    return float(start + (end - start) * tau / warmup)
