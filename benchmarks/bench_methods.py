"""Deterministic methods for KL between Gaussian mixtures: cost, accuracy and guaranteed bounds.

A fixed, seeded set of random mixture pairs in D = 1, 2, 5, 10 (K_p, K_q uniform in 2..5,
log-weights N(0, 1), means N(0, I), covariances A A^T / D + I / 2 with A standard normal).
Reference: in 1-D composite quadrature with 256 nodes per component (checked here against
scipy.integrate.quad on the first pairs); for D >= 2 distkl's stratified Monte Carlo with control
variates (``distkl.montecarlo.kl_mc``; a local stratified antithetic estimator if that module is
missing) with ``--ref-samples`` samples and its standard error.

For every method: time per pair (and ratio to the naive Monte Carlo baseline
``x = p.sample((4096,)); (p.log_prob(x) - q.log_prob(x)).mean()`` timed in the same run), and
median / 90th percentile relative error against the reference. For ``kl_bounds`` and for the
published bounds: the enclosure rate (a bound counts as violated when it misses the reference by
more than 4.5 reference standard errors), and median / 90th percentile of (upper - lower) / KL.

    python benchmarks/bench_methods.py            # about 1-2 minutes on 2 CPU cores
    python benchmarks/bench_methods.py --quick    # about 10 seconds
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch.distributions import (
    Categorical,
    Distribution,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from distkl._gaussian import as_gaussian_mixture
from distkl.approx import (
    entropies,
    kl_unscented,
    kl_variational,
    mixture_log_density,
    pairwise_kl,
    pairwise_log_product,
)
from distkl.bounds import coupling_upper_bound, kl_bounds
from distkl.quadrature import kl_quadrature

try:
    from distkl.montecarlo import kl_mc
except ImportError:  # pragma: no cover - the module is optional for this script
    kl_mc = None  # type: ignore[assignment]

Z = 4.5
DIMS = (1, 2, 5, 10)


def random_mixture(g: torch.Generator, d: int, k: int, device: torch.device) -> Distribution:
    logits = torch.randn(k, generator=g, dtype=torch.float64)
    loc = torch.randn(k, d, generator=g, dtype=torch.float64)
    a = torch.randn(k, d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    cov = a @ a.transpose(-1, -2) + 0.5 * torch.eye(d, dtype=torch.float64)
    logits, loc, cov = logits.to(device), loc.to(device), cov.to(device)
    if d == 1:
        comp: Distribution = Normal(loc[:, 0], cov[:, 0, 0].sqrt())
    else:
        comp = MultivariateNormal(loc, covariance_matrix=cov)
    return MixtureSameFamily(Categorical(logits=logits), comp)


def make_pairs(d: int, n: int, device: torch.device) -> list[tuple[Distribution, Distribution]]:
    g = torch.Generator().manual_seed(1000 + d)
    pairs = []
    for _ in range(n):
        kp, kq = (int(k) for k in torch.randint(2, 6, (2,), generator=g))
        pairs.append((random_mixture(g, d, kp, device), random_mixture(g, d, kq, device)))
    return pairs


def local_stratified_mc(p: Distribution, q: Distribution, n: int, seed: int) -> tuple[float, float]:
    """Stratified (per component of p), antithetic Monte Carlo: (estimate, standard error)."""
    mp, mq = as_gaussian_mixture(p), as_gaussian_mixture(q)
    k = mp.num_components
    half = max(n // (2 * k), 2)
    g = torch.Generator(device=mp.loc.device).manual_seed(seed)
    eps = torch.randn(half, *mp.loc.shape, generator=g, dtype=mp.loc.dtype, device=mp.loc.device)
    eps = torch.cat([eps, -eps])
    x = mp.loc + (mp.tril() @ eps.unsqueeze(-1)).squeeze(-1)  # (2 half, K, D)
    flat = x.reshape(-1, mp.dim)
    r = (mixture_log_density(flat, mp) - mixture_log_density(flat, mq)).reshape(2 * half, k)
    pairs = 0.5 * (r[:half] + r[half:])
    w = mp.log_weights.exp()
    return (w * pairs.mean(0)).sum().item(), (w.square() * pairs.var(0) / half).sum().sqrt().item()


def reference(
    p: Distribution, q: Distribution, d: int, samples: int, seed: int
) -> tuple[float, float]:
    if d == 1:
        return kl_quadrature(p, q, nodes=256).item(), 0.0
    if kl_mc is not None:
        g = torch.Generator(device=p.mean.device).manual_seed(seed)
        est = kl_mc(p, q, num_samples=samples, generator=g)
        return est.value.item(), est.stderr.item()
    return local_stratified_mc(p, q, samples, seed)


def scipy_check(pairs: list[tuple[Distribution, Distribution]]) -> float:
    """Largest relative difference between the 1-D reference and scipy.integrate.quad."""
    try:
        from scipy import integrate, stats
    except ImportError:  # pragma: no cover
        return float("nan")
    worst = 0.0

    def pdf(mx: tuple, x: float) -> float:
        return sum(w * stats.norm.pdf(x, mu, s) for w, mu, s in zip(*mx))

    def integrand(x: float, mp: tuple, mq: tuple) -> float:
        a, b = pdf(mp, x), pdf(mq, x)
        return b if a == 0 else a * math.log(a / b) + b - a

    for p, q in pairs:
        mix = []
        for d in (p, q):
            m = as_gaussian_mixture(d)
            mix.append(
                (m.log_weights.exp().tolist(), m.loc[:, 0].tolist(), m.tril()[:, 0, 0].tolist())
            )
        comps = [(mu, s) for mx in mix for mu, s in zip(mx[1], mx[2])]
        lo, hi = min(mu - 14 * s for mu, s in comps), max(mu + 14 * s for mu, s in comps)
        pts = sorted(mu + c * s for mu, s in comps for c in (-3, -1, 0, 1, 3))
        ref, _ = integrate.quad(
            integrand,
            lo,
            hi,
            args=(mix[0], mix[1]),
            points=pts,
            limit=500,
            epsabs=1e-14,
            epsrel=1e-12,
        )
        worst = max(worst, abs(kl_quadrature(p, q, nodes=256).item() - ref) / ref)
    return worst


def naive_mc(p: Distribution, q: Distribution) -> torch.Tensor:
    x = p.sample((4096,))
    return (p.log_prob(x) - q.log_prob(x)).mean(0)


def gauss_hermite(p: Distribution, q: Distribution, nodes: int = 128) -> torch.Tensor:
    """Plain Gauss-Hermite on every component of p (the textbook rule, for comparison)."""
    t, w = np.polynomial.hermite.hermgauss(nodes)
    m = as_gaussian_mixture(p)
    loc, scale = m.loc[..., 0], m.tril()[..., 0, 0]  # (K,)
    tt = torch.as_tensor(t, dtype=loc.dtype, device=loc.device)
    ww = torch.as_tensor(w / math.sqrt(math.pi), dtype=loc.dtype, device=loc.device)
    x = (loc.unsqueeze(-1) + math.sqrt(2.0) * scale.unsqueeze(-1) * tt).reshape(-1)
    r = (p.log_prob(x) - q.log_prob(x)).reshape(loc.shape[-1], nodes)
    return (m.log_weights.exp() * (r * ww).sum(-1)).sum()


def literature_bounds(p: Distribution, q: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """The published guaranteed bounds, for comparison with ``kl_bounds``.

    Upper: min of Hershey & Olsen's (2007) variational upper bound (optimised coupling) and
    Durrieu, Thiran & Kelly's (2012) upper bound; lower: Durrieu et al.'s lower bound (clamped
    at 0). Durrieu et al. combine the variational lower bound on E_p log p (or E_p log q) with
    Jensen's upper bound E_{p_a} log r <= log E_{p_a} r.
    """
    mp, mq = as_gaussian_mixture(p), as_gaussian_mixture(q)
    lw, lv, w = mp.log_weights, mq.log_weights, mp.log_weights.exp()
    kl_pp, kl_pq = pairwise_kl(mp, mp), pairwise_kl(mp, mq)
    z_pp, z_pq = pairwise_log_product(mp, mp), pairwise_log_product(mp, mq)
    h = entropies(mp)
    lower = (w * ((lw - kl_pp).logsumexp(-1) - h - (lv + z_pq).logsumexp(-1))).sum(-1)
    upper = (w * ((lw + z_pp).logsumexp(-1) + h - (lv - kl_pq).logsumexp(-1))).sum(-1)
    upper = torch.minimum(upper, coupling_upper_bound(lw, lv, kl_pq))
    return lower.clamp(min=0.0), upper


def timed(fn: Callable[..., object], device: torch.device, *args: object) -> tuple[object, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def relative_errors(values: list[float], refs: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(values) - refs) / np.abs(refs)


def run(n_pairs: int, ref_samples: int, device: torch.device, dims: tuple[int, ...]) -> str:
    torch.manual_seed(0)
    method_rows = [
        "| D | method | time / pair | vs naive MC | median rel. error | p90 rel. error |",
        "|---|---|---|---|---|---|",
    ]
    bound_rows = [
        "| D | bounds | median KL | enclosure | median (upper-lower)/KL | p90 (upper-lower)/KL "
        "| time / pair |",
        "|---|---|---|---|---|---|---|",
    ]
    notes = []
    for d in dims:
        pairs = make_pairs(d, n_pairs, device)
        # warm-up (first calls allocate and import)
        kl_bounds(*pairs[0]), kl_unscented(*pairs[0]), naive_mc(*pairs[0])
        refs, ses = [], []
        for i, (p, q) in enumerate(pairs):
            r, s = reference(p, q, d, ref_samples, seed=i)
            refs.append(r)
            ses.append(s)
        ref = np.asarray(refs)
        se = np.asarray(ses)
        if d == 1:
            notes.append(
                f"1-D reference vs scipy.integrate.quad: max relative difference "
                f"{scipy_check(pairs[:5]):.1e} (first 5 pairs)."
            )
        else:
            notes.append(
                f"D={d} reference: median relative standard error "
                f"{np.median(se / ref):.1e}, max {np.max(se / ref):.1e}."
            )

        methods: list[tuple[str, Callable[[Distribution, Distribution], torch.Tensor]]] = [
            ("naive MC, 4096 samples (baseline)", naive_mc),
        ]
        if kl_mc is not None:
            methods.append(
                ("`kl_mc`, 4096 samples", lambda p, q: kl_mc(p, q, num_samples=4096).value)
            )
        if d == 1:
            methods.append(("`kl_quadrature`, 128 nodes", kl_quadrature))
            methods.append(("plain Gauss-Hermite, 128 nodes", gauss_hermite))
        methods += [("`kl_variational`", kl_variational), ("`kl_unscented`", kl_unscented)]

        baseline_time: Optional[float] = None
        for name, fn in methods:
            values, total = [], 0.0
            for p, q in pairs:
                out, dt = timed(fn, device, p, q)
                values.append(float(out))  # type: ignore[arg-type]
                total += dt
            per_pair = total / len(pairs)
            if baseline_time is None:
                baseline_time = per_pair
            err = relative_errors(values, ref)
            method_rows.append(
                f"| {d} | {name} | {per_pair * 1e3:.2f} ms | {per_pair / baseline_time:.2f}x "
                f"| {np.median(err):.2e} | {np.percentile(err, 90):.2e} |"
            )

        for label, bound_fn in (
            ("literature: Hershey-Olsen upper + Durrieu et al.", literature_bounds),
            ("`kl_bounds`", kl_bounds),
        ):
            lows, ups, total = [], [], 0.0
            for p, q in pairs:
                out, dt = timed(bound_fn, device, p, q)
                bound: tuple[torch.Tensor, torch.Tensor] = out  # type: ignore[assignment]
                lows.append(float(bound[0]))
                ups.append(float(bound[1]))
                total += dt
            lo_a, up_a = np.asarray(lows), np.asarray(ups)
            ok = (lo_a <= ref + Z * se) & (up_a >= ref - Z * se) & (lo_a >= 0)
            gap = (up_a - lo_a) / ref
            bound_rows.append(
                f"| {d} | {label} | {np.median(ref):.3f} | {ok.mean() * 100:.0f}% "
                f"({ok.sum()}/{len(ok)}) | {np.median(gap):.3f} | {np.percentile(gap, 90):.3f} "
                f"| {total / len(pairs) * 1e3:.1f} ms |"
            )
    ref_name = "quadrature (1-D)"
    mc_name = "`distkl.montecarlo.kl_mc`" if kl_mc is not None else "local stratified MC"
    header = (
        f"{n_pairs} pairs per D, reference: {ref_name} and {mc_name} with {ref_samples} samples "
        f"(D >= 2), device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads."
    )
    return "\n".join([header, "", *method_rows, "", *bound_rows, "", *(f"- {n}" for n in notes)])


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="10 pairs per D, smaller reference")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per dimension (default 50)")
    parser.add_argument("--ref-samples", type=int, default=None, help="reference MC samples")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available.")
    n_pairs = args.pairs or (10 if args.quick else 50)
    ref_samples = args.ref_samples or ((1 << 15) if args.quick else (1 << 18))
    print(run(n_pairs, ref_samples, device, DIMS))


if __name__ == "__main__":
    main()
