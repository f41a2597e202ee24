"""The ``distkl`` command: ``distkl list``, ``distkl verify``, ``distkl derive P Q``.

Also ``python -m distkl ...``. Exit status: 0 success, 1 a check failed (or a derivation
failed), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch

from distkl import __version__, examples
from distkl._options import get_options
from distkl.registry import jsd_rules, kl_rules, skipped_kl_rules
from distkl.verify import DEFAULT_ALPHA, run_verify
from distkl.verify import plot as plot
from distkl.verify.run import available_devices

__all__ = ["main", "build_parser"]


def _method_in_force() -> str:
    opts = get_options()
    if opts.method == "auto":
        return f"auto: quadrature for 1-D events, mc ({opts.num_samples} samples) otherwise"
    if opts.method == "mc":
        return f"mc ({opts.num_samples} samples)"
    if opts.method == "quadrature":
        return f"quadrature ({opts.quadrature_nodes} nodes per component)"
    return opts.method


def rule_table() -> list[dict[str, Any]]:
    """Every registered KL and JSD rule as a dict (what ``distkl list --json`` prints)."""
    method = _method_in_force()
    rows = []
    for label, rules in (("KL", kl_rules()), ("JSD", jsd_rules())):
        for r in rules:
            rows.append(
                {
                    "divergence": label,
                    "pair": r.name,
                    "p": r.type_p.__name__,
                    "q": r.type_q.__name__,
                    "kind": r.kind,
                    "kind_summary": r.kind_summary,
                    "method": method if r.kind == "estimate" else None,
                    "module": r.module,
                    "function": r.fn.__qualname__,
                }
            )
    return rows


def _cmd_list(args: argparse.Namespace) -> int:
    rows = rule_table()
    if args.json:
        print(json.dumps({"method": _method_in_force(), "rules": rows}, indent=1))
        return 0
    if not rows:
        print("No rules registered.")
        return 0
    head = ("divergence", "p", "q", "kind", "module")
    cells = [head] + [
        (
            r["divergence"],
            r["p"],
            r["q"],
            r["kind_summary"]
            if r["kind_summary"] != "estimate"
            else f"estimate ({get_options().method})",
            f"{r['module']}.{r['function']}",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for k, c in enumerate(cells):
        print("  ".join(x.ljust(w) for x, w in zip(c, widths)).rstrip())
        if k == 0:
            print("  ".join("-" * w for w in widths))
    n_kl = sum(r["divergence"] == "KL" for r in rows)
    n_est = sum(r["kind"] == "estimate" for r in rows)
    print(
        f"\n{n_kl} KL and {len(rows) - n_kl} JSD rules; {n_est} compute an estimate by the method "
        f"in force ({_method_in_force()}; set it with distkl.options), the rest are exact."
    )
    for r in skipped_kl_rules():
        print(
            f"KL {r.name}: torch dispatches to {r.fn.__module__}.{r.fn.__qualname__} "
            "(another library's rule), not to distkl's."
        )
    return 0


def _progress_printer(enabled: bool) -> Any:
    if not enabled:
        return None
    tty = sys.stderr.isatty()

    def show(line: str) -> None:
        if tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


# --------------------------------------------------------------------------------------------
# Argument types: a bad value is a usage error (exit 2, argparse's message), never a traceback


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected an int >= {minimum}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value

    return parse


def _float_in(lo: float, hi: float, what: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (math.isfinite(value) and lo < value < hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def _writable_file(parser: argparse.ArgumentParser, path: str) -> None:
    """Exit 2 now, not after every check ran, when `path` cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"argument --plot: {path!r} is a directory, expected an image file")
    if not os.path.isdir(folder):
        parser.error(f"argument --plot: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        parser.error(f"argument --plot: cannot write {path!r} (permission denied)")


def _check_verify_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Validate what argparse cannot (before any check runs); return the devices to use."""
    if args.plot:
        try:
            plot.figure_class()
        except ImportError as e:
            parser.error(str(e))
        _writable_file(parser, args.plot)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda, but CUDA is not available")
    if args.only is not None and not any(args.only in ex.id for ex in examples.EXAMPLES):
        ids = "\n  ".join(ex.id for ex in examples.EXAMPLES)
        parser.error(f"argument --only: no example id contains {args.only!r}; ids:\n  {ids}")
    return available_devices() if args.device == "all" else [args.device]


def _cmd_verify(args: argparse.Namespace) -> int:
    devices = _check_verify_args(args, args.parser)
    dtypes = [torch.float32, torch.float64] if args.dtype == "all" else [getattr(torch, args.dtype)]
    show = _progress_printer(not args.no_progress)
    report = run_verify(
        devices=devices,
        dtypes=dtypes,
        quick=args.quick,
        num_samples=args.num_samples,
        alpha=args.alpha,
        only=args.only,
        divergences=("KL", "JSD") if args.kind == "all" else (args.kind.upper(),),
        seed=args.seed,
        progress=show,
        threads=args.threads,
    )
    if show is not None and sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if args.plot and any(r.result is not None and r.divergence == "KL" for r in report.rows):
        plot.plot_convergence(report, args.plot)
    ok = report.passed(strict=args.strict)
    if args.json:
        print(json.dumps(report.to_json(strict=args.strict), indent=1))
        return 0 if ok else 1
    width = min(100, shutil.get_terminal_size((100, 24)).columns)
    print(report.render(strict=args.strict, width=max(width, 60)))
    if args.plot:
        print(f"convergence plot written to {args.plot}")
    return 0 if ok else 1


def _cmd_derive(args: argparse.Namespace) -> int:
    from distkl.symbolic import FAMILIES, cached_pairs, derive
    from distkl.symbolic.derive import DerivationError, DerivationTimeout

    if args.list:
        print("families: " + ", ".join(FAMILIES))
        print("cached pairs: " + ", ".join(cached_pairs()))
        return 0
    if args.p is None or args.q is None:
        args.parser.error(
            "give two families, e.g. distkl derive Normal Laplace "
            f"(families: {', '.join(FAMILIES)})"
        )
    try:
        d = derive(args.p, args.q, timeout=args.timeout, cache=not args.rederive)
    except NotImplementedError as e:
        args.parser.error(str(e))
    except (DerivationError, DerivationTimeout) as e:
        print(f"distkl derive: error: {e}", file=sys.stderr)
        return 1
    if args.latex:
        print(d.latex)
        return 0
    if args.torch:
        print(d.torch_source())
        return 0
    params_p = ", ".join(f"{a}_p" for a in d.p.params)
    params_q = ", ".join(f"{a}_q" for a in d.q.params)
    print(f"KL(p || q) in nats, p = {d.p.name}({params_p}), q = {d.q.name}({params_q}):\n")
    print(d.pretty())
    print("\nLaTeX (distkl derive ... --latex), torch code (--torch).")
    return 0


def _add_verify(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="check every registered rule against Monte Carlo on the example table",
        description="Check every registered KL and JSD rule on every row of the example table "
        "(distkl.examples) against an independent Monte Carlo estimate. Exit 1 on any failure, "
        "2 on a usage error.",
    )
    p.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="device(s) to check on (default: every available one)",
    )
    p.add_argument("--dtype", choices=["float32", "float64", "all"], default="all")
    p.add_argument("--kind", choices=["kl", "jsd", "all"], default="all", help="divergences")
    p.add_argument("--quick", action="store_true", help="fewer samples (faster, less power)")
    p.add_argument(
        "--num-samples", type=_int_at_least(2), default=None, help="Monte Carlo samples per check"
    )
    p.add_argument(
        "--alpha",
        type=_float_in(0.0, 1.0, "a false-failure rate strictly between 0 and 1"),
        default=DEFAULT_ALPHA,
        help=f"false-failure rate for the whole run (default {DEFAULT_ALPHA:g})",
    )
    p.add_argument("--only", metavar="SUBSTR", help="only the rows whose id contains SUBSTR")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="base seed (default 0)")
    p.add_argument(
        "--threads",
        type=_int_at_least(1),
        default=1,
        help="torch intra-op threads while checking (default 1: as fast on a busy machine)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="draw the running MC estimate of every KL check (needs matplotlib: distkl[plot])",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="also fail on registered rules without an example row, and rows without a rule",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_cmd_verify, parser=p)


def _add_derive(sub: Any) -> None:
    p = sub.add_parser("derive", help="the sympy-derived closed form of KL(P || Q)")
    p.add_argument("p", nargs="?", help="family of p, e.g. Normal")
    p.add_argument("q", nargs="?", help="family of q, e.g. Laplace")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--latex", action="store_true", help="print only the LaTeX")
    out.add_argument("--torch", action="store_true", help="print a torch function to register")
    p.add_argument("--rederive", action="store_true", help="derive again, ignoring the cache")
    p.add_argument(
        "--timeout",
        type=_float_in(0.0, math.inf, "a positive number of seconds"),
        default=60.0,
        help="seconds sympy may take (default 60)",
    )
    p.add_argument("--list", action="store_true", help="the supported families and pairs")
    p.set_defaults(func=_cmd_derive, parser=p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distkl",
        description="Divergences torch.distributions lacks: list the rules, verify them against "
        "sampling, show derived closed forms.",
    )
    parser.add_argument("--version", action="version", version=f"distkl {__version__}")
    sub = parser.add_subparsers(dest="command")
    p_list = sub.add_parser("list", help="every registered KL and JSD rule")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)
    _add_verify(sub)
    _add_derive(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``distkl`` command line; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        status: int = args.func(args)
    except SystemExit as e:  # argparse: --help, --version, usage errors (exit 2)
        return e.code if isinstance(e.code, int) else 1
    except BrokenPipeError:  # `distkl list | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
