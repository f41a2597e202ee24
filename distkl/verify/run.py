"""The runner behind `distkl verify`: plan the checks over the example table, then run them."""

from __future__ import annotations

import contextlib
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from distkl import examples as _examples
from distkl._checks import check_choice, check_positive_int
from distkl.examples import Example
from distkl.registry import jsd_rules, kl_rules, lookup_jsd, lookup_kl
from distkl.verify.report import VerifyReport, VerifyRow
from distkl.verify.statistics import DEFAULT_ALPHA, check_jsd, check_kl, z_threshold

__all__ = [
    "DEFAULT_SAMPLES",
    "QUICK_SAMPLES",
    "DIVERGENCES",
    "PlannedCheck",
    "VerifyPlan",
    "available_devices",
    "plan_verify",
    "execute_plan",
    "run_verify",
]

#: Samples per check of `distkl verify` (the whole table in about 15 s on one CPU thread);
#: `--quick` uses `QUICK_SAMPLES`.
DEFAULT_SAMPLES = 32_768
QUICK_SAMPLES = 8_192
DIVERGENCES = ("KL", "JSD")


def available_devices() -> list[str]:
    """`["cpu"]`, plus `"cuda"` when CUDA is available."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass(frozen=True)
class PlannedCheck:
    """One example row and divergence to check on every device and dtype of the plan."""

    example: Example
    divergence: str
    kind: str
    module: str
    num_elements: int


@dataclass(frozen=True)
class VerifyPlan:
    """Every check `distkl verify` will run, and the z threshold they share."""

    checks: list[PlannedCheck]
    devices: list[str]
    dtypes: list[torch.dtype]
    num_samples: int
    alpha: float
    seed: int
    gaps: list[str]
    missing: list[str]

    @property
    def num_elements(self) -> int:
        """Batch elements checked over the whole run (the Bonferroni count)."""
        return sum(c.num_elements for c in self.checks) * len(self.devices) * len(self.dtypes)

    @property
    def z_threshold(self) -> float:
        return z_threshold(max(self.num_elements, 1), self.alpha)


def _stable_seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _coverage(table: Sequence[Example]) -> tuple[list[str], list[str]]:
    """(gaps, missing): registered rules that no row dispatches to, rows without a KL rule."""
    kl_keys, jsd_keys = set(), set()
    missing = []
    for ex in table:
        p, q = ex.build("cpu", torch.float64)
        fn, info = lookup_kl(type(p), type(q))
        if fn is None:
            missing.append(
                f"example {ex.id}: no KL rule registered for "
                f"({type(p).__name__}, {type(q).__name__})"
            )
        elif info is not None:
            kl_keys.add((info.type_p, info.type_q))
        _, jinfo = lookup_jsd(type(p), type(q))
        if jinfo is not None:
            jsd_keys.add((jinfo.type_p, jinfo.type_q))
    gaps = [
        f"{label} rule {r.name} ({r.module}) has no row in distkl.examples.EXAMPLES"
        for label, rules, keys in (("KL", kl_rules(), kl_keys), ("JSD", jsd_rules(), jsd_keys))
        for r in rules
        if (r.type_p, r.type_q) not in keys
    ]
    return gaps, missing


def _planned(ex: Example, divergences: Sequence[str]) -> list[PlannedCheck]:
    p, q = ex.build("cpu", torch.float64)
    numel = torch.broadcast_shapes(p.batch_shape, q.batch_shape).numel()
    out = []
    fn, info = lookup_kl(type(p), type(q))
    if "KL" in divergences and fn is not None:
        module = info.module if info is not None else f"{fn.__module__} (torch)"
        kind = info.kind_for(p, q) if info is not None else "exact"
        out.append(PlannedCheck(ex, "KL", kind, module, numel))
    _, jinfo = lookup_jsd(type(p), type(q))
    if "JSD" in divergences and jinfo is not None:
        out.append(PlannedCheck(ex, "JSD", jinfo.kind_for(p, q), jinfo.module, numel))
    return out


def plan_verify(
    *,
    devices: Optional[Sequence[str]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    quick: bool = False,
    num_samples: Optional[int] = None,
    alpha: float = DEFAULT_ALPHA,
    only: Optional[str] = None,
    divergences: Sequence[str] = DIVERGENCES,
    examples: Optional[Sequence[Example]] = None,
    seed: int = 0,
) -> VerifyPlan:
    """The checks `run_verify` runs, without running them (arguments as `run_verify`).

    Raises:
        ValueError: for `num_samples` below 2, `alpha` outside (0, 1), or an unknown divergence.
    """
    n = num_samples if num_samples is not None else (QUICK_SAMPLES if quick else DEFAULT_SAMPLES)
    n = check_positive_int("num_samples", n, minimum=2)
    z_threshold(1, alpha)  # validates alpha
    for d in divergences:
        check_choice("divergence", d, DIVERGENCES)
    table = list(examples) if examples is not None else list(_examples.EXAMPLES)
    gaps, missing = _coverage(table)
    chosen = [ex for ex in table if only is None or only in ex.id]
    return VerifyPlan(
        checks=[c for ex in chosen for c in _planned(ex, divergences)],
        devices=list(devices) if devices is not None else available_devices(),
        dtypes=list(dtypes) if dtypes is not None else [torch.float32, torch.float64],
        num_samples=n,
        alpha=alpha,
        seed=seed,
        gaps=gaps,
        missing=[m for m in missing if only is None or only in m.split(":")[0]],
    )


def _run_one(
    check: PlannedCheck, device: str, dtype: torch.dtype, plan: VerifyPlan, zstar: float
) -> VerifyRow:
    ex, div = check.example, check.divergence
    dname = str(dtype).replace("torch.", "")
    row_seed = _stable_seed(plan.seed, ex.id, div, device, dname)
    row = VerifyRow(ex.id, div, device, dname, check.kind, check.module, row_seed, example=ex)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(row_seed)
    try:
        p, q = ex.build(device, dtype)
        fn = check_kl if div == "KL" else check_jsd
        row.result = fn(p, q, num_samples=plan.num_samples, generator=g, z=zstar)
    except NotImplementedError as e:
        row.error = f"{type(e).__name__}: {e}"
        row.unsupported = div == "JSD"
    except Exception as e:  # a rule that raises is a failed check, reported
        row.error = f"{type(e).__name__}: {e}"
    row.seconds = time.perf_counter() - t0
    return row


@contextlib.contextmanager
def _intra_op_threads(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to `threads` for the block (unchanged for None)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def execute_plan(
    plan: VerifyPlan,
    *,
    progress: Optional[Callable[[str], None]] = None,
    threads: Optional[int] = None,
) -> VerifyReport:
    """Run every check of `plan` on each device and dtype; see `run_verify`."""
    if threads is not None:
        check_positive_int("threads", threads)
    start = time.perf_counter()
    zstar = plan.z_threshold
    combos = [(c, dev, dt) for c in plan.checks for dev in plan.devices for dt in plan.dtypes]
    rows = []
    with _intra_op_threads(threads):
        for k, (check, device, dtype) in enumerate(combos, 1):
            if progress is not None:
                dname = str(dtype).replace("torch.", "")
                progress(
                    f"[{k}/{len(combos)}] {check.divergence} {check.example.id} {device} {dname}"
                )
            rows.append(_run_one(check, device, dtype, plan, zstar))
    return VerifyReport(
        rows=rows,
        gaps=plan.gaps,
        missing=plan.missing,
        z_threshold=zstar,
        alpha=plan.alpha,
        num_samples=plan.num_samples,
        num_elements=plan.num_elements,
        seconds=time.perf_counter() - start,
        seed=plan.seed,
        threads=threads,
    )


def run_verify(
    *,
    devices: Optional[Sequence[str]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    quick: bool = False,
    num_samples: Optional[int] = None,
    alpha: float = DEFAULT_ALPHA,
    only: Optional[str] = None,
    divergences: Sequence[str] = DIVERGENCES,
    examples: Optional[Sequence[Example]] = None,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
    threads: Optional[int] = None,
) -> VerifyReport:
    """Check every registered KL and JSD rule on the example table (`distkl verify`).

    For each row of `examples` (default `distkl.examples.EXAMPLES`) whose pair has a KL rule
    (distkl's or torch's), on each device and dtype, run `check_kl`, and `check_jsd` when a JSD
    rule is registered for the pair. One z threshold serves the whole run: Bonferroni over every
    batch element checked, for a false-failure rate `alpha`.

    Args:
        devices: default every available one (`"cpu"`, and `"cuda"` when present).
        dtypes: default `(torch.float32, torch.float64)`.
        quick: `QUICK_SAMPLES` samples instead of `DEFAULT_SAMPLES`.
        num_samples: overrides both (at least 2).
        alpha: family-wise false-failure rate, in (0, 1).
        only: keep the rows whose id contains this substring.
        divergences: `("KL", "JSD")` or one of them.
        examples: the table (default `distkl.examples.EXAMPLES`).
        seed: base seed; each check's seed derives from it and the check's name.
        progress: called with a line of text before each check.
        threads: torch's intra-op threads during the run (restored after); None leaves them.

    Returns:
        The `VerifyReport`.
    """
    plan = plan_verify(
        devices=devices,
        dtypes=dtypes,
        quick=quick,
        num_samples=num_samples,
        alpha=alpha,
        only=only,
        divergences=divergences,
        examples=examples,
        seed=seed,
    )
    return execute_plan(plan, progress=progress, threads=threads)
