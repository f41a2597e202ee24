"""distkl.mixture_log_prob against torch's MixtureSameFamily.log_prob, in the same run.

For each component family and size, both score the same ``n`` points; the script prints the
median time of each, the speed-up (torch / distkl) and the largest relative difference of the
values (float32 inputs, against a float64 evaluation of torch's formula).

Usage: ``python benchmarks/bench_mixture_log_prob.py [--device cuda] [--quick] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from distkl.density import mixture_log_prob


def make(kind: str, k: int, d: int, device: str, dtype: torch.dtype) -> MixtureSameFamily:
    g = torch.Generator().manual_seed(0)

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.to(device=device, dtype=dtype)

    loc = 2.0 * torch.randn(k, d, generator=g, dtype=torch.float64)
    if kind == "Normal":
        comp: Distribution = Normal(
            t(loc[:, 0]), t(0.5 + torch.rand(k, generator=g, dtype=torch.float64))
        )
    elif kind == "Independent(Normal)":
        scale = 0.5 + torch.rand(k, d, generator=g, dtype=torch.float64)
        comp = Independent(Normal(t(loc), t(scale)), 1)
    elif kind == "MultivariateNormal":
        a = torch.randn(k, d, d, generator=g, dtype=torch.float64) / d**0.5
        cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=torch.float64)
        comp = MultivariateNormal(t(loc), scale_tril=t(torch.linalg.cholesky(cov)))
    else:
        factor = 0.5 * torch.randn(k, d, 4, generator=g, dtype=torch.float64)
        diag = 0.5 + torch.rand(k, d, generator=g, dtype=torch.float64)
        comp = LowRankMultivariateNormal(t(loc), t(factor), t(diag))
    logits = torch.randn(k, generator=g, dtype=torch.float64)
    return MixtureSameFamily(Categorical(logits=t(logits)), comp)


def median_time(fn: Callable[[], torch.Tensor], repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--samples", type=int, default=4096, help="points scored per call")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 5 if args.quick else 15
    n = args.samples
    sizes = [(16, 64)] if args.quick else [(4, 8), (16, 64), (64, 16)]
    kinds = ["Normal", "Independent(Normal)", "MultivariateNormal", "LowRankMultivariateNormal"]
    print(f"device={args.device} n={n} repeats={repeats} threads={torch.get_num_threads()}")
    header = (
        f"{'components':27s} {'K':>3s} {'D':>3s} {'torch ms':>9s} {'distkl ms':>9s} "
        f"{'speed-up':>9s} {'max rel err':>11s}"
    )
    print(header)
    print("-" * len(header))
    with torch.no_grad():
        for k, d in sizes:
            for kind in kinds:
                dd = 1 if kind == "Normal" else d
                if kind == "Normal" and (k, d) != sizes[0]:
                    continue
                mix = make(kind, k, dd, args.device, torch.float32)
                x = mix.sample((n,))
                t_torch = median_time(lambda: mix.log_prob(x), repeats, args.device)  # noqa: B023
                t_ours = median_time(lambda: mixture_log_prob(mix, x), repeats, args.device)  # noqa: B023
                ref = make(kind, k, dd, args.device, torch.float64).log_prob(x.double())
                err = ((mixture_log_prob(mix, x).double() - ref).abs() / ref.abs()).max().item()
                print(
                    f"{kind:27s} {k:3d} {dd:3d} {1e3 * t_torch:9.2f} {1e3 * t_ours:9.2f} "
                    f"{t_torch / t_ours:9.1f} {err:11.1e}"
                )
    print("speed-up: torch MixtureSameFamily.log_prob time / distkl.mixture_log_prob time.")


if __name__ == "__main__":
    main()
