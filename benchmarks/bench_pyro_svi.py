"""One Pyro SVI step with ``TraceMeanField_ELBO``, with and without distkl imported.

Model: a latent ``z`` of dimension D=16 per data point (batch 128) under a learnable K=8 diagonal
Gaussian-mixture prior, a linear-Gaussian likelihood; guide: ``Normal(loc, scale).to_event(1)``
(Pyro's own classes). ``TraceMeanField_ELBO`` calls ``kl_divergence(guide, prior)`` and falls
back to a single-sample estimate only on ``NotImplementedError``: without distkl that is what
happens; with distkl the registered mixture rule runs under distkl's default options (a per-call
budget of 4096 samples shared by the batch: 32 per data point here).

Each mode runs in its own subprocess (an import cannot be undone), the two alternate, and the
medians of the per-step CPU times (one thread) are compared. Target (issue 10.5): with distkl
within 3x of without.

Usage: ``python benchmarks/bench_pyro_svi.py [--steps 200] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

B, D, K = 128, 16, 8


def child(use_distkl: bool, steps: int) -> list[float]:
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, TraceMeanField_ELBO
    from pyro.optim import Adam

    torch.set_num_threads(1)
    if use_distkl:
        import distkl  # noqa: F401 (registers the mixture rules)
    pyro.set_rng_seed(0)
    data = torch.randn(B, D)

    def model(x):
        logits = pyro.param("logits", torch.zeros(K))
        loc = pyro.param("prior_loc", torch.randn(K, D))
        scale = pyro.param("prior_scale", torch.ones(K, D), constraint=dist.constraints.positive)
        prior = dist.MixtureSameFamily(
            dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)
        )
        with pyro.plate("data", B):
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("q_loc", torch.zeros(B, D))
        scale = pyro.param("q_scale", torch.ones(B, D), constraint=dist.constraints.positive)
        with pyro.plate("data", B):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    svi = SVI(model, guide, Adam({"lr": 1e-2}), TraceMeanField_ELBO())
    times = []
    for i in range(steps + 10):
        t0 = time.thread_time()
        svi.step(data)
        if i >= 10:
            times.append(time.thread_time() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["with", "without"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "with", args.steps)))
        return
    runs: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(args.rounds):
        for mode in ("without", "with"):
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--steps", str(args.steps)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            runs[mode] += json.loads(out.stdout.strip().splitlines()[-1])
    a, b = statistics.median(runs["without"]), statistics.median(runs["with"])
    print(f"SVI step, TraceMeanField_ELBO, batch {B}, D={D}, K={K}, one thread, median CPU ms")
    print(f"without distkl: {1e3 * a:.3f} ms   with distkl (default options): {1e3 * b:.3f} ms   "
          f"ratio {b / a:.2f} (target <= 3)")  # fmt: skip


if __name__ == "__main__":
    main()
