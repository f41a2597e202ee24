"""Small-sample Monte Carlo KL inside a training loop: distkl against the naive snippet.

A VAE step scores a batch of diagonal-Normal posteriors ``q(z|x)`` against a learnable mixture
prior with a handful of samples. Timed in the same run, per call:

* ``naive``: ``z = q.rsample((n,)); (q.log_prob(z) - prior.log_prob(z)).mean(0)`` (``sample``
  for the mixture in the reverse direction: torch's ``MixtureSameFamily`` has no ``rsample``, so
  the naive gradient there misses the pathwise term);
* ``kl_mc``: ``distkl.montecarlo.kl_mc(q, prior, num_samples=n).value``;
* ``kl_divergence``: ``torch.distributions.kl_divergence(q, prior)`` under
  ``distkl.options(method="mc", num_samples=n)`` (the registered mixture rule);

forward only (under ``torch.no_grad``) and forward + backward (gradients into every parameter),
for the forward direction KL(posterior || prior) and the reverse one KL(prior || posterior).
Ratios are distkl's time over the naive snippet's.

Usage: ``python benchmarks/bench_mc_training.py [--device cuda] [--quick] [--samples 16]``.
"""

from __future__ import annotations

import argparse
import time
from typing import Callable

import torch
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    Normal,
    kl_divergence,
)

import distkl
from distkl.montecarlo import kl_mc


def build(batch: int, d: int, k: int, device: str) -> tuple[list[torch.Tensor], Callable]:
    g = torch.Generator().manual_seed(0)
    params = [
        torch.randn(batch, d, generator=g),  # posterior loc
        0.3 * torch.randn(batch, d, generator=g),  # posterior log-scale
        torch.randn(k, generator=g),  # prior logits
        2.0 * torch.randn(k, d, generator=g),  # prior loc
        0.2 * torch.randn(k, d, generator=g),  # prior log-scale
    ]
    params = [t.to(device).requires_grad_() for t in params]

    def make() -> tuple[Independent, MixtureSameFamily]:
        q_loc, q_ls, logits, p_loc, p_ls = params
        post = Independent(Normal(q_loc, q_ls.exp()), 1)
        prior = MixtureSameFamily(
            Categorical(logits=logits), Independent(Normal(p_loc, p_ls.exp()), 1)
        )
        return post, prior

    return params, make


def timeit(fns: list[Callable[[], None]], repeat: int, device: str) -> list[float]:
    """Fastest seconds per call of each function, calls interleaved round by round.

    Interleaving exposes every function to the same background load; the minimum over the rounds
    is the least disturbed measurement.
    """
    for fn in fns:
        for _ in range(3):
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, D=2 only")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--components", type=int, default=8)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    n, batch, k, device = args.samples, args.batch, args.components, args.device
    repeat = 20 if args.quick else 60
    dims = [2] if args.quick else [2, 16]
    torch.manual_seed(0)
    print(
        f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"num_samples={n} posterior batch={batch} K={k}; fastest ms per call, ratio vs naive"
    )
    header = f"{'direction':<28}{'D':>3} {'mode':<9}{'naive':>9}{'kl_mc':>9}{'kl_div':>9}"
    print(header + f"{'kl_mc/naive':>13}{'kl_div/naive':>14}")
    for d in dims:
        params, make = build(batch, d, k, device)
        for direction in ("KL(posterior || prior)", "KL(prior || posterior)"):
            reverse = direction.startswith("KL(prior")
            for mode in ("forward", "fwd+bwd"):
                fns = (naive, mc, registered)
                calls = [_call(fn, params, make, reverse, n, mode) for fn in fns]
                row = timeit(calls, repeat, device)
                base = row[0]
                print(
                    f"{direction:<28}{d:>3} {mode:<9}"
                    + "".join(f"{1e3 * t:>9.3f}" for t in row)
                    + f"{row[1] / base:>13.2f}{row[2] / base:>14.2f}"
                )


Pair = tuple[torch.distributions.Distribution, torch.distributions.Distribution]


def naive(p: torch.distributions.Distribution, q: torch.distributions.Distribution, n: int):
    if p.has_rsample:
        z = p.rsample((n,))
    else:  # the mixture prior: one set of samples shared by the batch, as kl_mc does
        z = p.sample((n,)).unsqueeze(-2)
    return (p.log_prob(z) - q.log_prob(z)).mean(0)


def mc(p: torch.distributions.Distribution, q: torch.distributions.Distribution, n: int):
    return kl_mc(p, q, num_samples=n).value


def registered(p: torch.distributions.Distribution, q: torch.distributions.Distribution, n: int):
    with distkl.options(method="mc", num_samples=n):
        return kl_divergence(p, q)


def _call(
    fn: Callable[..., torch.Tensor],
    params: list[torch.Tensor],
    make: Callable[[], Pair],
    reverse: bool,
    n: int,
    mode: str,
) -> Callable[[], None]:
    def pair() -> Pair:
        post, prior = make()
        return (prior, post) if reverse else (post, prior)

    def forward() -> None:
        with torch.no_grad():
            fn(*pair(), n)

    def backward() -> None:
        for t in params:
            t.grad = None
        fn(*pair(), n).sum().backward()

    return forward if mode == "forward" else backward


if __name__ == "__main__":
    main()
