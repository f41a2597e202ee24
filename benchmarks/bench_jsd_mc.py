"""Variance and time of ``distkl.jsd_mc`` against the plain Monte Carlo JSD estimator, same run.

Estimators of JS_alpha(p, q), all with ``n`` draws from each of p and q:

* naive   -- ``x ~ p``, ``y ~ q`` (``sample``), ``alpha * mean log(p(x)/m(x)) + (1 - alpha) *
  mean log(q(y)/m(y))``: what one writes by hand;
* plain   -- the same log-ratio terms on jsd_mc's own sampler (``distkl.montecarlo.expectation``,
  stratified over mixture components), which isolates the effect of the bounded terms;
* jsd_mc  -- ``distkl.montecarlo.jsd_mc``: stratified draws, bounded per-point terms in
  [0, H(alpha)].

Variances are measured over ``reps`` independent replicates run as one batch (the pair is
expanded to batch shape ``(reps,)``); "exact" is the quadrature value for 1-D pairs and the mean
of the jsd_mc replicates otherwise. Printed: variance ratios naive/jsd_mc and plain/jsd_mc, and
the time ratio jsd_mc/naive.

    python benchmarks/bench_jsd_mc.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import torch
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

import distkl
from distkl.density import mixture_log_prob
from distkl.montecarlo import expectation, jsd_mc


def pairs(device: torch.device) -> list[tuple[str, Distribution, Distribution]]:
    kw = {"device": device, "dtype": torch.float64}

    def t(*x: float) -> torch.Tensor:
        return torch.tensor(x[0] if len(x) == 1 else x, **kw)

    eye3 = torch.eye(3, **kw)
    return [
        ("Normal(0,1)-Normal(0.5,1)", Normal(t(0.0), t(1.0)), Normal(t(0.5), t(1.0))),
        ("Normal(0,1)-Normal(2,1.5)", Normal(t(0.0), t(1.0)), Normal(t(2.0), t(1.5))),
        ("Normal(0,1)-Normal(5,0.5)", Normal(t(0.0), t(1.0)), Normal(t(5.0), t(0.5))),
        (
            "MSF(Normal,3)-Normal",
            MixtureSameFamily(
                Categorical(logits=t(0.0, 0.5, -0.5)), Normal(t(-2.0, 0.0, 3.0), t(0.5, 1.0, 0.7))
            ),
            Normal(t(0.5), t(2.0)),
        ),
        (
            "Independent(Normal,3)-MVN",
            Independent(Normal(t(0.0, 0.5, -0.5), t(1.0, 0.8, 1.2)), 1),
            MultivariateNormal(t(0.5, 0.0, 0.0), 1.5 * eye3 + 0.3),
        ),
        (
            "MSF(MVN,2)-MSF(Indep,2)",
            MixtureSameFamily(
                Categorical(logits=t(0.0, 0.3)),
                MultivariateNormal(torch.stack([t(-1.0, 0.0, 0.0), t(1.5, 1.0, 0.0)]), eye3),
            ),
            MixtureSameFamily(
                Categorical(logits=t(0.2, 0.0)),
                Independent(Normal(torch.stack([t(0.0, 0.0, 1.0), t(2.0, -1.0, 0.0)]), t(1.0)), 1),
            ),
        ),
    ]


def expand(d: Distribution, reps: int) -> Distribution:
    return d.expand(torch.Size([reps, *d.batch_shape]))


def naive(p: Distribution, q: Distribution, alpha: float, n: int) -> torch.Tensor:
    x, y = p.sample((n,)), q.sample((n,))

    def log_over_m(lp: torch.Tensor, lq: torch.Tensor, a: float, b: float) -> torch.Tensor:
        return lp - torch.logaddexp(math.log(a) + lp, math.log(b) + lq)

    t_p = log_over_m(p.log_prob(x), q.log_prob(x), alpha, 1 - alpha).mean(0)
    t_q = log_over_m(q.log_prob(y), p.log_prob(y), 1 - alpha, alpha).mean(0)
    return alpha * t_p + (1 - alpha) * t_q


def plain_on_stratified(
    p: Distribution, q: Distribution, alpha: float, n: int, gen: torch.Generator
) -> torch.Tensor:
    """Log-ratio terms on jsd_mc's own sampler (distkl.montecarlo.expectation, no controls)."""
    bs = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    out = []
    for a, d, other, b in ((alpha, p, q, 1.0 - alpha), (1.0 - alpha, q, p, alpha)):

        def log_over_m(x: torch.Tensor, d=d, other=other, a=a, b=b) -> torch.Tensor:
            ld, lo = mixture_log_prob(d, x), mixture_log_prob(other, x)
            return ld - torch.logaddexp(math.log(a) + ld, math.log(b) + lo)

        e = expectation(
            d, log_over_m, num_samples=n, generator=gen, batch_shape=bs, control_variates=False
        )
        out.append(a * e.value)
    return out[0] + out[1]


def _jsd_mc_value(
    p: Distribution, q: Distribution, *, alpha: float, n: int, generator: torch.Generator
) -> torch.Tensor:
    return jsd_mc(p, q, skew=alpha, num_samples=n, generator=generator).value


def timed(fn, repeat: int = 3) -> tuple[torch.Tensor, float]:
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        if out.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer replicates and samples")
    ap.add_argument("--samples", type=int, default=None, help="draws from each of p and q")
    ap.add_argument("--reps", type=int, default=None, help="independent replicates")
    args = ap.parse_args()
    device = torch.device(args.device)
    n = args.samples or (256 if args.quick else 1024)
    reps = args.reps or (50 if args.quick else 120)
    torch.manual_seed(0)
    print(f"device={device}  n={n} draws from each of p and q  reps={reps}  float64")
    print(
        f"{'pair':28s} {'alpha':>5s} {'JS':>9s} {'sd(jsd_mc)':>11s} "
        f"{'var naive/jsd_mc':>17s} {'var plain/jsd_mc':>17s} {'time jsd_mc/naive':>18s}"
    )
    for name, p, q in pairs(device):
        for alpha in (0.5, 0.2):
            pb, qb = expand(p, reps), expand(q, reps)
            gen = torch.Generator(device=device).manual_seed(1)
            est, t_mc = timed(
                functools.partial(_jsd_mc_value, pb, qb, alpha=alpha, n=n, generator=gen)
            )
            nv, t_naive = timed(functools.partial(naive, pb, qb, alpha, n))
            gen2 = torch.Generator(device=device).manual_seed(2)
            pl = plain_on_stratified(pb, qb, alpha, n, gen2)
            if p.event_shape == torch.Size():
                exact = float(distkl.js_divergence(p, q, skew=alpha))
            else:
                exact = float(est.mean())
            var_mc = float(((est - exact) ** 2).mean())
            var_naive = float(((nv - exact) ** 2).mean())
            var_plain = float(((pl - exact) ** 2).mean())
            print(
                f"{name:28s} {alpha:5.2f} {exact:9.5f} {math.sqrt(var_mc):11.2e} "
                f"{var_naive / var_mc:17.1f} {var_plain / var_mc:17.1f} {t_mc / t_naive:18.2f}"
            )


if __name__ == "__main__":
    main()
