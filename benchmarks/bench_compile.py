"""A training step under ``torch.compile`` with inductor (issue 10.7): compiled against eager.

The VAE step of ``bench_mc_training.py`` (a batch of 128 diagonal posteriors, D=16, against a
learnable 8-component diagonal mixture prior, forward + backward), with the KL from the registered
rule under ``options(method="mc", num_samples=n)`` and from the naive snippet, each eager and
compiled with ``torch.compile(fullgraph=True)`` (inductor, the default backend). Prints the
compile time and the median step time (thread CPU time, one thread) of each, and the ratios.

Usage: ``python benchmarks/bench_compile.py [--n 4] [--repeat 31]``. Needs a C++ compiler
(inductor generates C++ on CPU).
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from bench_mc_training import build, median_times
from torch.distributions import kl_divergence

import distkl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="samples per posterior")
    parser.add_argument("--repeat", type=int, default=31)
    args = parser.parse_args()
    torch.set_num_threads(1)
    leaves, make = build(16, 8, 0.0, 0.0)
    n = args.n

    def naive(*params: torch.Tensor) -> torch.Tensor:
        q, prior = make()
        z = q.rsample((n,))
        return (q.log_prob(z) - prior.log_prob(z)).mean(0).sum()

    def rule(*params: torch.Tensor) -> torch.Tensor:
        q, prior = make()
        return kl_divergence(q, prior).sum()

    def step(fn: Callable[..., torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for t in leaves:
                t.grad = None
            fn(*leaves).backward()

        return run

    rows = []
    with distkl.options(method="mc", num_samples=n):  # outside the compiled functions
        for name, fn in (("naive", naive), ("distkl rule", rule)):
            compiled = torch.compile(fn, fullgraph=True)
            t0 = time.perf_counter()
            step(compiled)()  # compiles forward and backward
            compile_s = time.perf_counter() - t0
            eager_t, compiled_t = median_times([step(fn), step(compiled)], args.repeat)
            rows.append((name, compile_s, eager_t, compiled_t))
    base = rows[0][2]
    print(f"torch={torch.__version__}, inductor, one thread, n={n}, batch 128, D=16, K=8")
    header = f"{'KL term':<14}{'compile s':>10}{'eager ms':>10}{'compiled ms':>13}"
    print(header + f"{'x eager naive':>15}")
    for name, compile_s, eager_t, compiled_t in rows:
        print(
            f"{name:<14}{compile_s:>10.1f}{1e3 * eager_t:>10.3f}{1e3 * compiled_t:>13.3f}"
            f"{compiled_t / base:>15.2f}"
        )


if __name__ == "__main__":
    main()
