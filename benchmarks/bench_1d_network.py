"""1-D KL at network scale (issue 10.6): seconds per 10^6 weights against a scale-mixture prior.

KL(q_i || p) for ``n`` scalar Normal posteriors q_i against Blundell et al.'s (2015) prior
p = 1/2 N(0, e^-2) + 1/2 N(0, e^-14), forward and forward + backward, with the registered rule's
default (``kl_divergence``: 1-D quadrature; for a batch of one prior, the shared-prior rule of
``distkl/quadrature/_shared.py``), next to the naive single-sample snippet
``w = q.rsample(); q.log_prob(w) - p.log_prob(w)`` timed in the same run. Each row is the median
of ``--repeats`` runs, scaled to 10^6 weights (wall time). The worst relative error is that of the
whole-batch call in float64, on a seeded subsample of ``REFERENCE`` weights, against the composite
rule with 512 nodes (checked against scipy in ``tests/test_quadrature.py``).

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

from distkl.quadrature import kl_composite

#: Weights checked against the 512-node composite rule.
REFERENCE = 1000


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

    def default() -> torch.Tensor:
        return kl_divergence(Normal(loc, torch.nn.functional.softplus(rho)), p)

    scale = 1e6 / n
    base_f, base_fb = timed(naive, False, repeats), timed(naive, True, repeats)
    print(f"threads={threads}, n={n} (scaled to 10^6), median of {repeats}")
    print(
        f"{'method':<34} {'fwd s/1e6':>10} {'fwd+bwd s/1e6':>14} {'x naive':>8} {'worst rel':>10}"
    )
    print(
        f"{'naive single sample':<34} {base_f * scale:>10.3f} {base_fb * scale:>14.3f} {1.0:>8.1f}"
    )
    f, fb = timed(default, False, repeats), timed(default, True, repeats)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:REFERENCE]
    sub = Normal(loc0[idx].double(), torch.nn.functional.softplus(rho0[idx]).double())
    ref = kl_composite(sub, p, nodes=512)
    with torch.no_grad():  # the whole batch, as in training, in float64
        got = kl_divergence(Normal(loc0.double(), torch.nn.functional.softplus(rho0).double()), p)
    worst = ((got[idx] - ref).abs() / ref).max().item()
    label = "distkl default (1-D quadrature)"
    print(f"{label:<34} {f * scale:>10.3f} {fb * scale:>14.3f} {fb / base_fb:>8.1f} {worst:>10.1e}")


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
