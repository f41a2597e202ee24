"""Peak memory of distkl.kl_mc against the naive Monte Carlo snippet, one subprocess per run.

tracemalloc does not see torch's allocations, so each configuration runs in a fresh Python
process and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set size) on
CPU, or ``torch.cuda.max_memory_allocated`` on CUDA. The baseline process imports torch and
distkl and builds the distributions, nothing more; "extra" is the peak minus that baseline.

The naive snippet ``x = p.sample((n,)); (p.log_prob(x) - q.log_prob(x)).mean()`` materialises
``(n, K, D)`` tensors for a ``MixtureSameFamily``: at n = 2,000,000, K = 16, D = 64 one of them is
8.2 GB in float32. By default it is run at ``--naive-samples`` (200,000) and its peak
extrapolated linearly to ``n``; ``--naive-full`` runs it at ``n`` (needs > 16 GB).

Usage: ``python benchmarks/bench_mc_memory.py [--device cuda] [--quick] [--naive-full]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal
from distkl.montecarlo import kl_mc

what, device = sys.argv[1], sys.argv[5]
n, k, d = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])

def mixture(seed):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(k, d, generator=g).to(device)
    scale = (0.5 + torch.rand(k, d, generator=g)).to(device)
    logits = torch.randn(k, generator=g).to(device)
    return MixtureSameFamily(Categorical(logits=logits), Independent(Normal(loc, scale), 1))

p, q = mixture(0), mixture(1)
cuda = device.startswith("cuda")
if cuda:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
with torch.no_grad():
    if what == "distkl":
        g = torch.Generator(device=device).manual_seed(0)
        value = kl_mc(p, q, num_samples=n, generator=g).value
    elif what == "naive":
        x = p.sample((n,))
        value = (p.log_prob(x) - q.log_prob(x)).mean()
    else:
        value = torch.zeros(())
    value = float(value)
if cuda:
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak": peak, "seconds": time.perf_counter() - t0, "value": value}))
"""


def run(what: str, n: int, k: int, d: int, device: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, what, str(n), str(k), str(d), device],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="200,000 samples instead of 2,000,000")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--naive-samples", type=int, default=200_000)
    parser.add_argument("--naive-full", action="store_true", help="run the naive snippet at n")
    args = parser.parse_args()
    n = args.samples or (200_000 if args.quick else 2_000_000)
    k, d = 16, 64
    gb = 1024**3
    t0 = time.perf_counter()
    base = run("baseline", n, k, d, args.device)
    ours = run("distkl", n, k, d, args.device)
    naive_n = n if args.naive_full else min(n, args.naive_samples)
    naive = run("naive", naive_n, k, d, args.device)
    extra_ours = ours["peak"] - base["peak"]
    extra_naive = (naive["peak"] - base["peak"]) * n / naive_n
    how = "measured" if naive_n == n else f"measured at n={naive_n:,}, scaled x{n / naive_n:g}"
    print(f"device={args.device} K={k} D={d} n={n:,} (float32)")
    print(f"baseline process (torch + distkl + p, q): {base['peak'] / gb:6.2f} GB")
    print(
        f"distkl.kl_mc: peak {ours['peak'] / gb:6.2f} GB, extra {extra_ours / gb:6.2f} GB, "
        f"{ours['seconds']:.1f} s, KL = {ours['value']:.4f}"
    )
    print(
        f"naive snippet: extra {extra_naive / gb:6.2f} GB ({how}), "
        f"{naive['seconds'] * n / naive_n:.1f} s, KL = {naive['value']:.4f}"
    )
    print(f"memory ratio (naive extra / distkl extra): {extra_naive / max(extra_ours, 1):.1f}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
