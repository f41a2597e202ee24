"""Time distkl's diagonal-Normal cross-pair KL rules against torch's own rules on the same pairs.

distkl computes ``KL(Independent(Normal, 1) || MultivariateNormal)`` (and the three sibling pairs
with ``LowRankMultivariateNormal`` and the reverse directions) without a dense covariance for the
diagonal side. Without distkl, a torch user has two ways to get the same number:

* ``dense``: rewrite the diagonal side as ``MultivariateNormal(mu, scale_tril=diag_embed(sigma))``
  and use torch's MVN-MVN / MVN-LowRank / LowRank-MVN rule;
* ``lowrank0``: rewrite it as ``LowRankMultivariateNormal(mu, zeros(D, 1), sigma**2)`` (a rank-1
  factor of zeros) and use torch's LowRank-MVN / MVN-LowRank / LowRank-LowRank rule.

Both baselines are measured in the same run, interleaved with distkl round by round, on the same
parameters; every timing includes building the distributions from leaf tensors
(``validate_args=False`` throughout) and, for ``fwd+bwd``, ``kl.sum().backward()``. ``fwd`` runs
under ``torch.no_grad()``. Layouts: ``shared`` = diagonal side with batch ``(B,)`` against one
``q``/``p`` of batch ``()`` (a VAE posterior batch against its prior); ``full`` = both sides with
batch ``(B,)``. Printed ratios are baseline time / distkl time (> 1: distkl is faster). Times
are the best of several interleaved rounds; on CPU they are process CPU time with one thread by
default, so that other processes on a shared machine do not distort them.

    python benchmarks/bench_normal_cross.py [--device cpu|cuda] [--quick] [--threads N]
                                            [--dtype float32|float64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch.distributions import (
    Distribution,
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

import distkl.rules.normal  # noqa: F401  (registers the cross-pair rules)

PAIRS = ("Indep-MVN", "MVN-Indep", "Indep-LowRank", "LowRank-Indep")
RANK = 4
METHODS = ("distkl", "dense", "lowrank0")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_leaves(
    pair: str, d: int, b: int, layout: str, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Leaf parameters: ``diag_*`` for the diagonal side, ``other_*`` for the (low-rank) MVN."""
    g = torch.Generator().manual_seed(0)

    def t(*shape: int, lo: float | None = None) -> torch.Tensor:
        x = torch.randn(*shape, generator=g, dtype=torch.float64)
        if lo is not None:
            x = lo + x.abs()
        return x.to(device=device, dtype=dtype).requires_grad_()

    other_batch = (b,) if layout == "full" else ()
    leaves = {"diag_loc": t(b, d), "diag_scale": t(b, d, lo=0.5), "other_loc": t(*other_batch, d)}
    if "MVN" in pair:
        a = torch.randn(*other_batch, d, d, generator=g, dtype=torch.float64) / d**0.5
        cov = a @ a.mT + 0.5 * torch.eye(d, dtype=torch.float64)
        leaves["other_tril"] = (
            torch.linalg.cholesky(cov).to(device=device, dtype=dtype).requires_grad_()
        )
    else:
        leaves["other_factor"] = t(*other_batch, d, RANK)
        leaves["other_diag"] = t(*other_batch, d, lo=0.5)
    return leaves


def build(pair: str, how: str, x: dict[str, torch.Tensor]) -> tuple[Distribution, Distribution]:
    """``(p, q)`` with the diagonal side as ``how`` in ("distkl", "dense", "lowrank0")."""
    loc, scale = x["diag_loc"], x["diag_scale"]
    diag: Distribution
    if how == "distkl":
        diag = Independent(Normal(loc, scale, validate_args=False), 1, validate_args=False)
    elif how == "dense":
        diag = MultivariateNormal(loc, scale_tril=torch.diag_embed(scale), validate_args=False)
    else:
        zeros = loc.new_zeros(loc.shape + (1,))
        diag = LowRankMultivariateNormal(loc, zeros, scale.square(), validate_args=False)
    other: Distribution
    if "MVN" in pair:
        other = MultivariateNormal(x["other_loc"], scale_tril=x["other_tril"], validate_args=False)
    else:
        other = LowRankMultivariateNormal(
            x["other_loc"], x["other_factor"], x["other_diag"], validate_args=False
        )
    return (diag, other) if pair.startswith("Indep") else (other, diag)


def make_step(pair: str, how: str, x: dict[str, torch.Tensor], mode: str) -> Callable[[], None]:
    def fwd() -> None:
        with torch.no_grad():
            kl_divergence(*build(pair, how, x))

    def fwd_bwd() -> None:
        for v in x.values():
            v.grad = None
        kl_divergence(*build(pair, how, x)).sum().backward()

    return fwd if mode == "fwd" else fwd_bwd


def time_interleaved(
    steps: dict[str, Callable[[], None]], device: torch.device, budget_s: float, rounds: int
) -> dict[str, float]:
    """Best-of-rounds seconds per call of each step, the rounds interleaved so that drift hits
    every step alike. On CPU the clock is this process's CPU time (``time.process_time``), which
    other processes on a shared machine do not inflate; on CUDA it is wall time after a
    synchronize."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    inner: dict[str, int] = {}
    for name, step in steps.items():  # warm up, then calibrate to ~budget/rounds per round
        step()
        _sync(device)
        t0 = clock()
        step()
        _sync(device)
        once = max(clock() - t0, 1e-6)
        inner[name] = max(1, int(budget_s / rounds / once))
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _sync(device)
            t0 = clock()
            for _ in range(inner[name]):
                step()
            _sync(device)
            samples[name].append((clock() - t0) / inner[name])
    return {name: min(v) for name, v in samples.items()}


def check_agreement(pair: str, x: dict[str, torch.Tensor]) -> float:
    """Max relative difference between distkl and torch's dense rule (sanity, not timed)."""
    with torch.no_grad():
        ours = kl_divergence(*build(pair, "distkl", x))
        ref = kl_divergence(*build(pair, "dense", x))
        return ((ours - ref).abs() / ref.abs().clamp_min(1e-30)).max().item()


def fmt_us(s: float) -> str:
    return f"{s * 1e6:10.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--quick", action="store_true", help="fewer sizes, shorter timings")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; default 1 keeps ratios stable on a shared machine, "
        "0 keeps torch's default",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False.")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dims = (8, 64) if args.quick else (8, 64, 256)
    batch = 64
    budget, rounds = (0.03, 3) if args.quick else (0.06, 5)

    print(
        f"torch {torch.__version__}, device {device}, dtype {args.dtype}, "
        f"threads {torch.get_num_threads()}, B={batch}, low rank r={RANK}"
    )
    print("best-of-rounds microseconds per call (on CPU: process CPU time)")
    print("ratio = baseline / distkl (> 1: distkl is faster)")
    header = (
        f"{'pair':<14}{'layout':<8}{'D':>5} {'mode':<8}{'distkl':>10}{'dense':>11}"
        f"{'lowrank0':>11}  {'x dense':>8}{'x lowrank0':>11}  max rel diff"
    )
    print(header)
    print("-" * len(header))
    ratios: dict[tuple[str, str], list[float]] = {}
    t_start = time.perf_counter()
    for pair in PAIRS:
        for layout in ("shared", "full"):
            for d in dims:
                x = make_leaves(pair, d, batch, layout, device, dtype)
                rel = check_agreement(pair, x)
                for mode in ("fwd", "fwd+bwd"):
                    steps = {h: make_step(pair, h, x, mode) for h in METHODS}
                    t = time_interleaved(steps, device, budget, rounds)
                    r_dense = t["dense"] / t["distkl"]
                    r_lr = t["lowrank0"] / t["distkl"]
                    ratios.setdefault((pair, "dense"), []).append(r_dense)
                    ratios.setdefault((pair, "lowrank0"), []).append(r_lr)
                    print(
                        f"{pair:<14}{layout:<8}{d:>5} {mode:<8}{fmt_us(t['distkl'])} "
                        f"{fmt_us(t['dense'])} {fmt_us(t['lowrank0'])}  {r_dense:8.2f}"
                        f"{r_lr:11.2f}  {rel:.1e}"
                    )
    print("-" * len(header))
    print("ratio baseline/distkl over all layouts, D and modes: min / geometric mean / max")
    for (pair, base), r in ratios.items():
        gmean = statistics.geometric_mean(r)
        print(f"{pair:<14} vs {base:<9} {min(r):7.2f} {gmean:7.2f} {max(r):8.2f}")
    print(f"total wall time {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
