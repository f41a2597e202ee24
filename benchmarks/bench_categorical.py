"""Categorical KL on tensors: distkl.functional with and without value checks, against torch.

Prints the median time of each variant and its ratio to torch's own
``kl_divergence(Categorical, Categorical)`` measured in the same run (the baseline), for a
(batch, categories) grid. ``validate_args=False`` skips the value checks (NaN, infinities,
negative weights), each a host-device synchronisation on a GPU; shapes are still checked.

Usage: ``python benchmarks/bench_categorical.py [--repeats 50]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.distributions import Categorical, kl_divergence

from distkl import functional


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':>14} {'torch (ms)':>11} {'checked':>9} {'unchecked':>10}  (ratios to torch)")
    for batch, k in [(64, 10), (1024, 100), (4096, 1000)]:
        a, b = torch.randn(batch, k, generator=g), torch.randn(batch, k, generator=g)
        base, checked, unchecked = (_median_seconds(fn, args.repeats) for fn in _variants(a, b))
        ratios = f"{checked / base:9.2f} {unchecked / base:10.2f}"
        print(f"{str((batch, k)):>14} {base * 1e3:11.3f} {ratios}")


def _variants(a: torch.Tensor, b: torch.Tensor) -> list[Callable[[], object]]:
    """torch's Categorical rule (the baseline), functional with and without value checks."""
    return [
        lambda: kl_divergence(Categorical(logits=a), Categorical(logits=b)),
        lambda: functional.kl_divergence(p_logits=a, q_logits=b, validate_args=True),
        lambda: functional.kl_divergence(p_logits=a, q_logits=b, validate_args=False),
    ]


if __name__ == "__main__":
    main()
