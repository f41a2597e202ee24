"""The outcome of `distkl verify`: one row per check, a table that fits 100 columns, JSON."""

from __future__ import annotations

import math
import shlex
import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional

from torch import Tensor

from distkl.examples import Example
from distkl.verify.statistics import CheckResult

__all__ = ["VerifyReport", "VerifyRow", "WIDTH", "short_name"]

#: The widest line the report prints.
WIDTH = 100

#: Abbreviations in the table (the legend lists them); ids in `--only` and JSON stay in full.
_SHORT = (
    ("MixtureSameFamily", "Mix"),
    ("LowRankMultivariateNormal", "LowRankMVN"),
    ("MultivariateNormal", "MVN"),
    ("OneHotCategoricalStraightThrough", "OneHotST"),
    ("OneHotCategorical", "OneHot"),
    ("Categorical", "Cat"),
    ("Independent(Normal)", "Ind(Normal)"),
)


def short_name(pair: str) -> str:
    """`pair` with the table's abbreviations (e.g. `MixtureSameFamily` -> `Mix`)."""
    for long, short in _SHORT:
        pair = pair.replace(long, short)
    return pair


def _dtype_name(dtype: str) -> str:
    return dtype.replace("torch.", "")


@dataclass
class VerifyRow:
    """One check of `distkl verify`: an example row, a divergence, a device and a dtype."""

    pair: str
    divergence: str
    device: str
    dtype: str
    kind: str
    module: str
    seed: int
    result: Optional[CheckResult] = None
    error: Optional[str] = None
    seconds: float = 0.0
    #: True when the rule does not support this pair (NotImplementedError): reported, not failed.
    unsupported: bool = False
    #: The example row (to rebuild the pair, e.g. for the plot).
    example: Optional[Example] = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return self.unsupported or (
            self.error is None and self.result is not None and self.result.passed
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pair": self.pair,
            "divergence": self.divergence,
            "device": self.device,
            "dtype": self.dtype,
            "kind": self.kind,
            "module": self.module,
            "passed": self.passed,
            "seconds": round(self.seconds, 4),
        }
        if self.error is not None:
            out["error"] = self.error
            out["unsupported"] = self.unsupported
        if self.result is not None:
            r = self.result
            out.update(
                method=r.method,
                num_samples=r.num_samples,
                shape=list(r.z.shape),
                analytic=_floats(r.analytic),
                estimate=_floats(r.estimate),
                stderr=_floats(r.stderr),
                z=_floats(r.z),
                element_passed=[bool(b) for b in r.element_passed.reshape(-1)],
            )
        return out

    def cells(self) -> tuple[str, ...]:
        """`(div, pair, kind, rule, MC +- s.e., z [i/n], ok)` for the table."""
        res = self.result
        kind = self.kind if res is None or res.method is None else f"est/{res.method[:4]}"
        head = (self.divergence, short_name(self.pair), kind)
        if res is None:
            return (*head, "-", "-", "-", "n/a" if self.unsupported else "ERROR")
        i = res.worst()
        a, est, se, z = (
            t.reshape(-1)[i].item() for t in (res.analytic, res.estimate, res.mc_stderr, res.z)
        )
        n = res.z.numel()
        where = f" [{i}/{n}]" if n > 1 else ""
        ok = "ok" if self.passed else "FAIL"
        return (*head, f"{a:.6g}", f"{est:.6g} +- {se:.1e}", f"{z:+.2f}{where}", ok)

    def reproduce(self, num_samples: int, seed: int) -> str:
        """The command that runs this check alone (same seed, so the same samples and z)."""
        return (
            f"python -m distkl verify --only {shlex.quote(self.pair)} --kind "
            f"{self.divergence.lower()} --device {self.device} --dtype {self.dtype} "
            f"--num-samples {num_samples} --seed {seed}"
        )


def _floats(t: Tensor) -> list[Optional[float]]:
    out: list[Optional[float]] = []
    for v in t.reshape(-1).tolist():
        out.append(None if math.isnan(v) else v)
    return out


_HEAD = ("div", "pair", "kind", "rule", "MC +- s.e.", "z [i/n]", "ok")

LEGEND = (
    "columns: div = KL or JSD; pair = example row (Mix = MixtureSameFamily, MVN = "
    "MultivariateNormal, Ind = Independent, Cat = Categorical, OneHot = OneHotCategorical, "
    "ST = StraightThrough); kind = exact, or est/mc and est/quad for a rule that returned an "
    "estimate and how verify evaluated it; rule = the registered rule's value (nats); "
    "MC +- s.e. = the naive Monte Carlo estimate and its standard error; z = (rule - MC) / "
    "s.e. for the batch element with the largest |z|, and [i/n] = that element's flat index i "
    "among the pair's n batch elements; ok = every element has |z| <= z*; n/a = the JSD rule "
    "does not support the pair."
)


@dataclass
class VerifyReport:
    """The outcome of `run_verify`."""

    rows: list[VerifyRow]
    #: Registered rules that no example row exercises ("KL rule Normal-Foo (module) ...").
    gaps: list[str]
    #: Example rows whose pair has no registered KL rule.
    missing: list[str]
    z_threshold: float
    alpha: float
    num_samples: int
    num_elements: int
    seconds: float = 0.0
    seed: int = 0
    threads: Optional[int] = None

    @property
    def failures(self) -> list[VerifyRow]:
        return [r for r in self.rows if not r.passed]

    def passed(self, strict: bool = False) -> bool:
        """No failed check, at least one check run; with `strict`, no gaps or missing rules."""
        ok = bool(self.rows) and not self.failures
        return ok and not (strict and (self.gaps or self.missing))

    def to_json(self, strict: bool = False) -> dict[str, Any]:
        return {
            "passed": self.passed(strict),
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "num_elements": self.num_elements,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "threads": self.threads,
            "seconds": round(self.seconds, 3),
            "rows": [r.to_json() for r in self.rows],
            "gaps": self.gaps,
            "missing": self.missing,
        }

    def table(self, width: int = WIDTH) -> str:
        """One section per device and dtype, one line per check; lines fit `width` columns."""
        sections: dict[tuple[str, str], list[tuple[str, ...]]] = {}
        for r in self.rows:
            sections.setdefault((r.device, _dtype_name(r.dtype)), []).append(r.cells())
        all_cells = [_HEAD, *(c for rows in sections.values() for c in rows)]
        widths = [max(len(c[k]) for c in all_cells) for k in range(len(_HEAD))]
        fixed = sum(widths) - widths[1] + 2 * (len(_HEAD) - 1)
        widths[1] = max(12, min(widths[1], width - fixed))
        out = [_line(_HEAD, widths), "  ".join("-" * w for w in widths)]
        for (device, dtype), rows in sections.items():
            out.append(f"{device} {dtype}:")
            out.extend(_line(c, widths) for c in rows)
        return "\n".join(out)

    def render(self, *, strict: bool = False, width: int = WIDTH) -> str:
        """The text `distkl verify` prints: header, table, legend, problems, failures, summary."""
        out = [_wrap(self._header(), width), ""]
        if self.rows:
            out += [self.table(width), "", _wrap(LEGEND, width)]
        out += self._problems(strict, width)
        failures = self.failures
        if failures:
            out += ["", f"failures (|z| > {self.z_threshold:.2f}, or an error):"]
            out += [self._failure(r, width) for r in failures]
        out.append(
            f"\n{len(self.rows)} checks: {len(self.rows) - len(failures)} passed, "
            f"{len(failures)} failed ({self.seconds:.1f} s)"
        )
        return "\n".join(out)

    def _header(self) -> str:
        places = sorted({f"{r.device} {_dtype_name(r.dtype)}" for r in self.rows})
        threads = f", {self.threads} thread(s)" if self.threads else ""
        return (
            f"distkl verify: {len(self.rows)} checks on {', '.join(places) or 'nothing'}, "
            f"{self.num_samples} samples each{threads}; pass when |z| <= z* = "
            f"{self.z_threshold:.2f} (false-failure rate {self.alpha:g} over "
            f"{self.num_elements} batch elements, Bonferroni)"
        )

    def _problems(self, strict: bool, width: int) -> list[str]:
        level = "error" if strict else "warning"
        lines = []
        for r in self.rows:
            if r.error is not None:
                label = "unsupported" if r.unsupported else "error"
                where = f"{r.divergence} {r.pair} {r.device} {_dtype_name(r.dtype)}"
                lines.append(_wrap(f"{label}: {where}: {r.error}", width))
        lines += [_wrap(f"{level}: {g}", width) for g in [*self.gaps, *self.missing]]
        if not self.rows:
            lines.append("error: no check ran (no example row has a registered rule).")
        return [""] + lines if lines else []

    def _failure(self, r: VerifyRow, width: int) -> str:
        res = r.result
        if res is None:
            what = f"{r.error}"
        else:
            i = res.worst()
            what = f"z = {res.z.reshape(-1)[i].item():+.2f} at element {i}"
        text = f"- {r.divergence} {r.pair} {r.device} {_dtype_name(r.dtype)}: {what}"
        command = textwrap.wrap(r.reproduce(self.num_samples, self.seed), width - 6)
        return _wrap(text, width) + "\n    " + " \\\n      ".join(command)


def _line(cells: tuple[str, ...], widths: list[int]) -> str:
    fitted = [c if len(c) <= w else c[: w - 1] + "~" for c, w in zip(cells, widths)]
    return "  ".join(c.ljust(w) for c, w in zip(fitted, widths)).rstrip()


def _wrap(text: str, width: int) -> str:
    return "\n".join(textwrap.wrap(text, width, subsequent_indent="  ", break_on_hyphens=False))
