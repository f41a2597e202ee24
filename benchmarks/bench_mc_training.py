"""Few-sample Monte Carlo KL inside a training loop: distkl against the naive snippet.

A VAE step scores a batch of 128 diagonal-Normal posteriors against a learnable diagonal
Gaussian-mixture prior. Per cell of the grid D in {2, 16, 64}, K in {8, 16}, n in {1, 4, 16},
both directions, forward + backward (gradients into every parameter), it prints

* ``naive``: ms per step of ``z = q.rsample((n,)); (q.log_prob(z) - prior.log_prob(z)).mean(0)``
  (the reverse direction samples the prior with ``sample``: torch's ``MixtureSameFamily`` has no
  ``rsample``, so the naive gradient there misses the pathwise term);
* ``rule/nv``: ``kl_divergence`` under ``distkl.options(method="mc", num_samples=n)`` (the
  registered mixture rule; KL(posterior || prior) takes ``distkl._pathwise``, the reverse the
  stratified engine), time over naive's;
* ``shared/nv``: ``kl_mc(q, prior, samples=z)`` at the caller's ``z = q.rsample((n,))``, the
  draw included in both timings (forward direction only);
* ``var val``, ``var g_post``, ``var g_prior``: naive's variance over distkl's (the rule), of the
  value and of the gradient with respect to the posterior's and the prior's parameters (summed
  over coordinates, from ``--reps`` replicates): above 1 means distkl is less noisy.

Then the trained-VAE regime (posterior scales 0.1 against prior components of scale 1).

Timing: medians of interleaved repeats (distkl and naive alternate, so both see the same load).
With one thread the clock is the thread's CPU time (``time.thread_time``), which a shared,
loaded box disturbs much less than wall time; with two threads it is wall time.

Usage: ``python benchmarks/bench_mc_training.py [--quick] [--threads 1 2] [--reps 64]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal, kl_divergence

import distkl
from distkl.montecarlo import kl_mc

Pair = tuple[Independent, MixtureSameFamily]


def build(d: int, k: int, post_scale: float, prior_scale: float, batch: int = 128):
    """Leaves ``[post loc, post log-scale, logits, prior loc, prior log-scale]`` and a builder."""
    g = torch.Generator().manual_seed(0)
    wide = post_scale <= 0  # the generic grid: scales spread around 1
    leaves = [
        torch.randn(batch, d, generator=g),
        0.3 * torch.randn(batch, d, generator=g) if wide else torch.full((batch, d), 0.0),
        torch.randn(k, generator=g),
        2.0 * torch.randn(k, d, generator=g) if wide else torch.randn(k, d, generator=g),
        0.2 * torch.randn(k, d, generator=g) if wide else torch.zeros(k, d),
    ]
    if not wide:
        leaves[1] += torch.tensor(post_scale).log()
        leaves[4] += torch.tensor(prior_scale).log()
    leaves = [t.requires_grad_() for t in leaves]

    def make() -> Pair:
        q_loc, q_ls, logits, p_loc, p_ls = leaves
        post = Independent(Normal(q_loc, q_ls.exp()), 1)
        comp = Independent(Normal(p_loc, p_ls.exp()), 1)
        return post, MixtureSameFamily(Categorical(logits=logits), comp)

    return leaves, make


def naive(post, prior, n: int, reverse: bool) -> torch.Tensor:
    if reverse:  # the mixture has no rsample: one set of prior samples shared by the batch
        z = prior.sample((n,)).unsqueeze(-2)
        return (prior.log_prob(z) - post.log_prob(z)).mean(0)
    z = post.rsample((n,))
    return (post.log_prob(z) - prior.log_prob(z)).mean(0)


def rule(post, prior, n: int, reverse: bool) -> torch.Tensor:
    with distkl.options(method="mc", num_samples=n):
        return kl_divergence(prior, post) if reverse else kl_divergence(post, prior)


def shared(post, prior, n: int, reverse: bool) -> torch.Tensor:
    z = post.rsample((n,))  # drawn for the reconstruction term in a real step
    return kl_mc(post, prior, samples=z).value


def naive_shared(post, prior, n: int, reverse: bool) -> torch.Tensor:
    z = post.rsample((n,))
    return (post.log_prob(z) - prior.log_prob(z)).mean(0)


def step(fn, leaves, make, n: int, reverse: bool) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        for t in leaves:
            t.grad = None
        v = fn(*make(), n, reverse)
        v.sum().backward()
        return v

    return run


def median_times(fns: list[Callable[[], torch.Tensor]], repeat: int) -> list[float]:
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    for fn in fns:
        for _ in range(3):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            times[i].append(clock() - t0)
    return [statistics.median(t) for t in times]


def variances(fn, leaves, make, n: int, reverse: bool, reps: int) -> tuple[float, float, float]:
    """Summed variances over replicates: value, gradient w.r.t. posterior and prior leaves."""
    vals, gpost, gprior = [], [], []
    run = step(fn, leaves, make, n, reverse)
    for _ in range(reps):
        v = run()
        vals.append(v.detach())
        gpost.append(torch.cat([t.grad.flatten() for t in leaves[:2]]))
        gprior.append(torch.cat([t.grad.flatten() for t in leaves[2:]]))
    return tuple(torch.stack(x).double().var(0).sum().item() for x in (vals, gpost, gprior))


def cell(d, k, n, reverse, leaves, make, repeat, reps, want_var) -> list[float]:
    try:
        rule(*make(), n, reverse)
    except ValueError as err:  # the stratified engine needs 2 samples per component of p
        print(f"  (rule refused: {err})")
        return [float("nan")] * (6 if want_var else 3)
    fns = [step(naive, leaves, make, n, reverse), step(rule, leaves, make, n, reverse)]
    if not reverse:
        fns += [
            step(naive_shared, leaves, make, n, reverse),
            step(shared, leaves, make, n, reverse),
        ]
    t = median_times(fns, repeat)
    shared_ratio = t[3] / t[2] if not reverse else float("nan")
    out = [1e3 * t[0], t[1] / t[0], shared_ratio]
    if want_var:
        a = variances(naive, leaves, make, n, reverse, reps)
        b = variances(rule, leaves, make, n, reverse, reps)
        out += [x / y if y > 0 else float("inf") for x, y in zip(a, b)]
    return out


HEADER = (
    f"{'dir':<11}{'thr':>4}{'D':>4}{'K':>4}{'n':>4}{'naive ms':>10}{'rule/nv':>9}"
    f"{'shared/nv':>10}{'var val':>9}{'var g_post':>11}{'var g_prior':>12}"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="D=16 only, fewer repeats")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--reps", type=int, default=64, help="replicates for the variances")
    args = parser.parse_args()
    repeat = 15 if args.quick else 31
    dims = [16] if args.quick else [2, 16, 64]
    torch.manual_seed(0)
    print(f"torch={torch.__version__}; batch 128; ms per fwd+bwd step (median); ratios vs naive")
    print(HEADER)
    ratios: list[float] = []
    shared_ratios: list[float] = []
    variance_cache: dict[tuple, list[float]] = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for reverse in (False, True):
            for d in dims:
                for k in (8, 16):
                    leaves, make = build(d, k, 0.0, 0.0)
                    for n in (1, 4, 16):
                        key = (reverse, d, k, n)
                        row = cell(
                            d,
                            k,
                            n,
                            reverse,
                            leaves,
                            make,
                            repeat,
                            args.reps,
                            key not in variance_cache,
                        )
                        if key not in variance_cache:
                            variance_cache[key] = row[3:]
                        row = row[:3] + variance_cache[key]
                        if row[1] == row[1]:  # not NaN
                            ratios.append(row[1])
                        if row[2] == row[2]:
                            shared_ratios.append(row[2])
                        name = "prior||post" if reverse else "post||prior"
                        print(
                            f"{name:<11}{threads:>4}{d:>4}{k:>4}{n:>4}"
                            + "".join(
                                f"{x:>10.3f}" if i == 0 else f"{x:>10.2f}"
                                for i, x in enumerate(row)
                            ),
                            flush=True,
                        )
    print(
        f"rule/naive time: median {statistics.median(ratios):.2f}, max {max(ratios):.2f} "
        f"over {len(ratios)} cells"
    )
    print(
        f"shared/naive time: median {statistics.median(shared_ratios):.2f}, "
        f"max {max(shared_ratios):.2f} over {len(shared_ratios)} cells"
    )
    torch.set_num_threads(1)
    print("\ntrained-VAE regime: posterior scales 0.1, prior components scale 1, D=16, K=8")
    print(HEADER)
    leaves, make = build(16, 8, 0.1, 1.0)
    for n in (1, 2, 4, 16):
        row = cell(16, 8, n, False, leaves, make, repeat, args.reps, True)
        print(
            f"{'post||prior':<11}{1:>4}{16:>4}{8:>4}{n:>4}"
            + "".join(f"{x:>10.3f}" if i == 0 else f"{x:>10.2f}" for i, x in enumerate(row)),
            flush=True,
        )


if __name__ == "__main__":
    main()
