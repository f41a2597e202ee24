"""1-D KL at network scale (issue 10.6): seconds per 10^6 weights against a scale-mixture prior.

KL(q_i || p) for ``n`` scalar Normal posteriors q_i against Blundell et al.'s (2015) prior
p = 1/2 N(0, e^-2) + 1/2 N(0, e^-14), forward and forward + backward, with the registered rule's
default (``kl_divergence``: 1-D quadrature, single-Normal fast path) at the default node count and
at a cheaper one, next to the naive single-sample snippet
``w = q.rsample(); q.log_prob(w) - p.log_prob(w)`` timed in the same run. Each row is the median
of ``--repeats`` runs, scaled to 10^6 weights; the worst relative error is against the composite
rule with 512 nodes on a seeded subsample (that reference is checked against scipy in
``tests/test_quadrature.py``).

Usage: ``python benchmarks/bench_1d_network.py [--n 100000] [--threads 1 2] [--repeats 3]``.
The CPU box is shared: the numbers are medians, and only the ratio to the naive snippet in the
same run is comparable across runs.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from torch.distributions import Categorical, MixtureSameFamily, Normal, kl_divergence

import distkl
from distkl.quadrature import kl_composite


def prior() -> MixtureSameFamily:
    return MixtureSameFamily(
        Categorical(probs=torch.tensor([0.5, 0.5])),
        Normal(torch.zeros(2), torch.tensor([math.exp(-1.0), math.exp(-7.0)])),
    )


def posteriors(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Means around 0 at scales 1e-4..1 and standard deviations log-uniform on [1e-5, 1]."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.empty(n).uniform_(math.log(1e-4), 0.0, generator=g).exp()
    loc = torch.randn(n, generator=g) * scale
    rho = torch.empty(n).uniform_(math.log(1e-5), 0.0, generator=g).exp().expm1().log()
    return loc, rho  # sigma = softplus(rho)


def timed(fn: Callable[[], torch.Tensor], backward: bool, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn().sum()
        if backward:
            value.backward()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def run(n: int, threads: int, repeats: int) -> None:
    torch.set_num_threads(threads)
    loc0, rho0 = posteriors(n)
    loc, rho = loc0.clone().requires_grad_(), rho0.clone().requires_grad_()
    p = prior()

    def naive() -> torch.Tensor:
        q = Normal(loc, torch.nn.functional.softplus(rho))
        w = q.rsample()
        return q.log_prob(w) - p.log_prob(w.unsqueeze(-1)).squeeze(-1)

    def default(nodes: int) -> Callable[[], torch.Tensor]:
        def fn() -> torch.Tensor:
            with distkl.options(quadrature_nodes=nodes):
                return kl_divergence(Normal(loc, torch.nn.functional.softplus(rho)), p)

        return fn

    scale = 1e6 / n
    base_f, base_fb = timed(naive, False, repeats), timed(naive, True, repeats)
    print(f"threads={threads}, n={n} (scaled to 10^6), median of {repeats}; box shared/loaded")
    print(
        f"{'method':<34} {'fwd s/1e6':>10} {'fwd+bwd s/1e6':>14} {'x naive':>8} {'worst rel':>10}"
    )
    print(
        f"{'naive single sample':<34} {base_f * scale:>10.3f} {base_fb * scale:>14.3f} {1.0:>8.1f}"
    )
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:300]
    sub = Normal(loc0[idx].double(), torch.nn.functional.softplus(rho0[idx]).double())
    ref = kl_composite(sub, p, nodes=512)
    for nodes in (128, 48):
        f, fb = timed(default(nodes), False, repeats), timed(default(nodes), True, repeats)
        with torch.no_grad(), distkl.options(quadrature_nodes=nodes):
            got = kl_divergence(sub, p)
        worst = ((got - ref).abs() / ref).max().item()
        label = f"distkl default, nodes={nodes}"
        print(
            f"{label:<34} {f * scale:>10.3f} {fb * scale:>14.3f} {fb / base_fb:>8.1f}"
            f" {worst:>10.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="weights per call")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for threads in args.threads:
        run(args.n, threads, args.repeats)


if __name__ == "__main__":
    main()
