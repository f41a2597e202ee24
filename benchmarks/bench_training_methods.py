"""What each method costs per training step, against the naive single-sample snippet (issue 10.5).

The VAE layout of ``bench_mc_training.py``: a batch of 128 diagonal-Normal posteriors (D=16)
against a learnable K=8 diagonal Gaussian-mixture prior, forward + backward into every
parameter. One row per way of computing ``KL(posterior || prior)``, timed in the same run as the
naive snippet ``z = q.rsample(); (q.log_prob(z) - prior.log_prob(z))``, interleaved, medians of
the per-step CPU time (one thread: ``time.thread_time``, which a shared box disturbs little).

Then the 1-D case of a Bayesian network: ``--weights`` scalar Normal posteriors against Blundell
et al.'s two-component scale-mixture prior, the default (quadrature) and ``method="mc"`` at one
sample, against the naive single-sample snippet (``bench_1d_network.py`` has the accuracy).

Usage: ``python benchmarks/bench_training_methods.py [--repeat 31] [--weights 100000]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch
from bench_mc_training import build, median_times  # same directory
from torch.distributions import Categorical, MixtureSameFamily, Normal, kl_divergence

import distkl


def vae_rows(repeat: int) -> None:
    leaves, make = build(16, 8, 0.0, 0.0)

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for t in leaves:
                t.grad = None
            fn().sum().backward()

        return run

    def naive(n: int) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            q, prior = make()
            z = q.rsample((n,))
            return (q.log_prob(z) - prior.log_prob(z)).mean(0)

        return fn

    def rule(**opts) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            q, prior = make()
            with distkl.options(**opts):
                return kl_divergence(q, prior)

        return fn

    def shared() -> torch.Tensor:
        q, prior = make()
        z = q.rsample()  # drawn for the reconstruction term in a real step
        return distkl.kl_mc(q, prior, samples=z).value

    rows = [
        ("naive snippet, 1 sample (baseline)", naive(1)),
        ("naive snippet, 16 samples", naive(16)),
        ("default (no options)", rule()),
        ('method="mc", num_samples=1', rule(method="mc", num_samples=1)),
        ('method="mc", num_samples=16', rule(method="mc", num_samples=16)),
        ("kl_mc(q, prior, samples=z), z shared", shared),
        ('method="variational" (upper bound)', rule(method="variational")),
        ('method="unscented"', rule(method="unscented")),
    ]
    times = median_times([step(fn) for _, fn in rows], repeat)
    print("VAE step: batch 128, D=16, K=8 diagonal mixture prior, fwd+bwd, one thread")
    print(f"{'call':<40}{'ms/step':>9}{'x naive(1)':>12}")
    for (name, _), t in zip(rows, times):
        print(f"{name:<40}{1e3 * t:>9.3f}{t / times[0]:>12.2f}")


def network_rows(weights: int) -> None:
    g = torch.Generator().manual_seed(0)
    loc = (0.1 * torch.randn(weights, generator=g)).requires_grad_()
    rho = torch.full((weights,), -5.0).requires_grad_()
    prior = MixtureSameFamily(
        Categorical(probs=torch.tensor([0.5, 0.5])),
        Normal(torch.zeros(2), torch.tensor([math.exp(-1.0), math.exp(-7.0)])),
    )

    def post() -> Normal:
        return Normal(loc, torch.nn.functional.softplus(rho))

    def naive() -> torch.Tensor:
        q = post()
        w = q.rsample()
        return q.log_prob(w) - prior.log_prob(w)

    def rule(**opts) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with distkl.options(**opts):
                return kl_divergence(post(), prior)

        return fn

    rows = [
        ("naive snippet, 1 sample (baseline)", naive),
        ("default (1-D quadrature)", rule()),
        ('method="mc", num_samples=1', rule(method="mc", num_samples=1)),
    ]
    out = []
    for _, fn in rows:
        ts = []
        for _ in range(3):
            loc.grad = rho.grad = None
            t0 = time.thread_time()
            fn().sum().backward()
            ts.append(time.thread_time() - t0)
        out.append(statistics.median(ts))
    scale = 1e6 / weights
    print(f"\nBayesian network: {weights} scalar weights (scaled to 10^6), Blundell prior, fwd+bwd")
    print(f"{'call':<40}{'s/10^6':>9}{'x naive':>12}")
    for (name, _), t in zip(rows, out):
        print(f"{name:<40}{t * scale:>9.3f}{t / out[0]:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=31)
    parser.add_argument("--weights", type=int, default=100_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch={torch.__version__}, one thread, medians of CPU time")
    vae_rows(args.repeat)
    network_rows(args.weights)


if __name__ == "__main__":
    main()
