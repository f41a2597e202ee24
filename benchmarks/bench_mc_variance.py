"""Variance x time of distkl.kl_mc against the naive Monte Carlo snippet, in the same run.

The baseline is what users write today::

    x = p.sample((n,)); (p.log_prob(x) - q.log_prob(x)).mean()

Both estimators get the same number of samples ``n`` per estimate. For each configuration the
script draws ``R`` independent estimates of each, measures their empirical variance across the
repeats (not the reported stderr) and the median wall time of one estimate, and prints

* ``var ratio``  = var(naive) / var(distkl) at equal n,
* ``time ratio`` = time(distkl) / time(naive),
* ``efficiency`` = (var x time)(naive) / (var x time)(distkl): how many times less compute distkl
  needs for the same precision,
* ``coverage``   = share of distkl's 95% intervals (value +- 1.96 stderr) containing a
  high-precision reference.

Usage: ``python benchmarks/bench_mc_variance.py [--device cuda] [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial
from typing import Callable

import torch
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from distkl.montecarlo import Estimate, kl_mc


def _mixture(
    k: int,
    d: int,
    spread: float,
    *,
    full: bool,
    seed: int,
    device: str,
    uneven: bool = False,
    like: Distribution | None = None,
) -> Distribution:
    """A random Gaussian mixture; with ``like``, a perturbation of that mixture instead."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=g) * (2.0 if uneven else 0.5)
    loc = spread * torch.randn(k, d, generator=g)
    if d == 1 and spread >= 4.0:  # separated in 1-D: means on a grid 2 * spread apart
        loc = 2.0 * spread * torch.arange(k, dtype=loc.dtype).unsqueeze(-1) + 0.3 * loc
    scale = 0.5 + torch.rand(k, d, generator=g)
    a = torch.randn(k, d, d, generator=g) / d**0.5
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(d)
    if like is not None:  # same components, moved by a fraction of their scale
        assert isinstance(like, MixtureSameFamily)
        logits = like.mixture_distribution.logits.cpu() + 0.3 * torch.randn(k, generator=g)
        base = like.component_distribution
        if full:
            loc = base.mean.cpu() + 0.3 * torch.randn(k, d, generator=g)
            cov = base.covariance_matrix.cpu() * (1.0 + 0.1 * torch.rand(k, 1, 1, generator=g))
        else:
            loc = base.mean.cpu().reshape(k, d)
            scale = base.stddev.cpu().reshape(k, d)
            loc = loc + 0.3 * scale * torch.randn(k, d, generator=g)
            scale = scale * (0.1 * torch.randn(k, d, generator=g)).exp()
    if full:
        comp: Distribution = MultivariateNormal(loc.to(device), covariance_matrix=cov.to(device))
    elif d == 1:
        comp = Normal(loc[:, 0].to(device), scale[:, 0].to(device))
    else:
        comp = Independent(Normal(loc.to(device), scale.to(device)), 1)
    return MixtureSameFamily(Categorical(logits=logits.to(device)), comp)


def configurations(device: str) -> list[tuple[str, Distribution, Distribution, int]]:
    """(name, p, q, samples-per-estimate multiplier)."""

    def mk(k: int, d: int, spread: float, seed: int, **kw) -> Distribution:
        return _mixture(k, d, spread, seed=seed, device=device, **kw)

    p1 = mk(4, 1, 4.0, 1, full=False)
    p8 = mk(8, 8, 3.0, 5, full=False)
    p8f = mk(4, 8, 3.0, 7, full=True)
    p64 = mk(16, 64, 1.0, 8, full=False)
    q64 = mk(16, 64, 1.0, 14, full=False, like=p64)
    return [
        ("1-D K=4 separated, q ~ p", p1, mk(4, 1, 4.0, 11, full=False, like=p1), 1),
        ("1-D K=4 separated, q random", p1, mk(3, 1, 3.0, 2, full=False), 1),
        (
            "1-D K=2 overlapping, uneven w",
            mk(2, 1, 0.1, 3, full=False, uneven=True),
            mk(2, 1, 0.3, 4, full=False),
            1,
        ),
        ("D=8 diag K=8 separated, q ~ p", p8, mk(8, 8, 3.0, 12, full=False, like=p8), 1),
        ("D=8 diag K=8, q random", p8, mk(6, 8, 3.0, 6, full=False), 1),
        ("D=8 full K=4, q ~ p", p8f, mk(4, 8, 3.0, 13, full=True, like=p8f), 1),
        (
            "D=8 full K=4 vs one MVN",
            p8f,
            MultivariateNormal(torch.zeros(8, device=device), 4.0 * torch.eye(8, device=device)),
            1,
        ),
        ("D=64 diag K=16 separated, q ~ p", p64, q64, 1),
        ("D=64 diag K=16 separated, q ~ p", p64, q64, 4),
        ("D=64 diag K=16, q random", p64, mk(16, 64, 1.0, 9, full=False), 4),
    ]


def _naive(p: Distribution, q: Distribution, n: int) -> float:
    x = p.sample((n,))
    return (p.log_prob(x) - q.log_prob(x)).mean().item()


def _ours(
    p: Distribution, q: Distribution, n: int, g: torch.Generator, out: list[Estimate]
) -> float:
    est = kl_mc(p, q, num_samples=n, generator=g)
    out.append(est)
    return est.value.item()


def _timed(fn: Callable[[], float], repeats: int) -> tuple[list[float], float]:
    values, times = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        values.append(fn())
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return values, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--samples", type=int, default=4096, help="samples per estimate")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 12 if args.quick else 30
    torch.manual_seed(0)
    print(f"device={args.device} repeats={repeats} threads={torch.get_num_threads()}")
    header = (
        f"{'configuration':34s} {'n':>6s} {'KL':>9s} {'var ratio':>10s} {'time ratio':>10s} "
        f"{'efficiency':>10s} {'coverage':>9s}"
    )
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for name, p, q, mult in configurations(args.device):
            n = args.samples * mult
            g = torch.Generator(device=args.device).manual_seed(1)
            ref = kl_mc(p, q, num_samples=min(50 * n, 400_000), generator=g)
            _naive(p, q, 64)  # warm-up
            kl_mc(p, q, num_samples=64, generator=g)
            naive_vals, naive_t = _timed(partial(_naive, p, q, n), repeats)
            ests: list[Estimate] = []
            our_vals, our_t = _timed(partial(_ours, p, q, n, g, ests), repeats)
            var_naive = statistics.variance(naive_vals)
            var_ours = statistics.variance(our_vals)
            truth, truth_se = ref.value.item(), ref.stderr.item()
            covered = [
                abs(e.value.item() - truth) < 1.96 * math.hypot(e.stderr.item(), truth_se)
                for e in ests
            ]
            print(
                f"{name:34s} {n:6d} {truth:9.4f} {var_naive / var_ours:10.1f} "
                f"{our_t / naive_t:10.2f} {var_naive * naive_t / (var_ours * our_t):10.1f} "
                f"{sum(covered) / len(covered):9.2f}"
            )
    print(
        "var ratio: empirical variance over the repeats, naive / distkl, at equal n; "
        "efficiency: (variance x time) naive / distkl."
    )


if __name__ == "__main__":
    main()
