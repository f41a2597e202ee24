"""The ``distkl`` command: ``distkl list``, ``distkl verify``, ``distkl derive P Q``.

Also ``python -m distkl ...``. Exit status: 0 success, 1 a check failed (or a derivation
failed), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

__all__ = ["main", "build_parser"]


def _method_in_force() -> str:
    from distkl._options import get_options

    opts = get_options()
    n = "4096 samples per call" if opts.num_samples is None else f"{opts.num_samples} samples"
    if opts.method == "auto":
        return f"auto: quadrature for 1-D events, mc ({n}) otherwise"
    if opts.method == "mc":
        return f"mc ({n})"
    if opts.method == "quadrature":
        return f"quadrature ({opts.quadrature_nodes} nodes per component)"
    return opts.method


def rule_table() -> list[dict[str, Any]]:
    """Every registered KL and JSD rule as a dict (what ``distkl list --json`` prints)."""
    from distkl.registry import jsd_rules, kl_rules

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
                    "method": method if r.kind == "estimate" else None,
                    "module": r.module,
                    "function": r.fn.__qualname__,
                }
            )
    return rows


def _cmd_list(args: argparse.Namespace) -> int:
    from distkl._options import get_options

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
            r["kind"] if r["kind"] == "exact" else f"estimate ({get_options().method})",
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
    from distkl.registry import skipped_kl_rules

    for r in skipped_kl_rules():
        print(
            f"KL {r.name}: left to {r.fn.__module__}.{r.fn.__qualname__}, registered before "
            "distkl was imported."
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


def _cmd_verify(args: argparse.Namespace) -> int:
    import torch

    from distkl import verify

    if args.plot:
        try:
            verify._figure_class()
        except ImportError as e:
            print(f"distkl verify: error: {e}", file=sys.stderr)
            return 2
    if args.device == "all":
        devices = verify._available_devices()
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            print(
                "distkl verify: error: --device cuda, but CUDA is not available.", file=sys.stderr
            )
            return 2
        devices = [args.device]
    dtypes = [torch.float32, torch.float64] if args.dtype == "all" else [getattr(torch, args.dtype)]
    show = _progress_printer(not args.no_progress)
    report = verify.run_verify(
        devices=devices,
        dtypes=dtypes,
        quick=args.quick,
        num_samples=args.num_samples,
        alpha=args.alpha,
        only=args.only,
        seed=args.seed,
        progress=show,
    )
    if show is not None and sys.stderr.isatty():
        sys.stderr.write("\r\033[K")
    if args.plot:
        verify.plot_convergence(report, args.plot)
    ok = report.passed(strict=args.strict)
    if args.json:
        print(json.dumps(report.to_json(strict=args.strict), indent=1))
        return 0 if ok else 1
    kinds = ", ".join(str(d).replace("torch.", "") for d in dtypes)
    print(
        f"distkl verify: {len(report.rows)} checks on {', '.join(devices)} ({kinds}), "
        f"{report.num_samples} samples each; pass when |z| <= {report.z_threshold:.2f} "
        f"(false-failure rate {report.alpha:g} over {report.num_elements} batch elements, "
        "Bonferroni)\n"
    )
    if report.rows:
        print(report.table())
    for gap in report.gaps:
        print(f"{'error' if args.strict else 'warning'}: {gap}")
    for miss in report.missing:
        print(f"{'error' if args.strict else 'warning'}: {miss}")
    failed = len(report.failures)
    if not report.rows:
        print("error: no check ran (no example row has a registered rule).")
    if args.plot:
        print(f"convergence plot written to {args.plot}")
    print(
        f"\n{len(report.rows)} checks: {len(report.rows) - failed} passed, {failed} failed "
        f"({report.seconds:.1f} s)"
    )
    return 0 if ok else 1


def _cmd_derive(args: argparse.Namespace) -> int:
    from distkl.symbolic import FAMILIES, cached_pairs, derive
    from distkl.symbolic.derive import DerivationError, DerivationTimeout

    if args.list:
        print("families: " + ", ".join(FAMILIES))
        print("cached pairs: " + ", ".join(cached_pairs()))
        return 0
    if args.p is None or args.q is None:
        print(
            "distkl derive: error: give two families, e.g. distkl derive Normal Laplace "
            f"(families: {', '.join(FAMILIES)}).",
            file=sys.stderr,
        )
        return 2
    try:
        d = derive(args.p, args.q, timeout=args.timeout, cache=not args.rederive)
    except NotImplementedError as e:
        print(f"distkl derive: error: {e}", file=sys.stderr)
        return 2
    except (DerivationError, DerivationTimeout) as e:
        print(f"distkl derive: error: {e}", file=sys.stderr)
        return 1
    if args.latex:
        print(d.latex)
        return 0
    params_p = ", ".join(f"{a}_p" for a in d.p.params)
    params_q = ", ".join(f"{a}_q" for a in d.q.params)
    print(f"KL(p || q) in nats, p = {d.p.name}({params_p}), q = {d.q.name}({params_q}):\n")
    print(d.pretty())
    print("\nLaTeX:")
    print(d.latex)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distkl",
        description="Divergences torch.distributions lacks: list the rules, verify them against "
        "sampling, show derived closed forms.",
    )
    sub = parser.add_subparsers(dest="command")

    p_list = sub.add_parser("list", help="every registered KL and JSD rule")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=_cmd_list)

    p_ver = sub.add_parser(
        "verify",
        help="check every registered rule against Monte Carlo on the example table",
        description="Check every registered KL and JSD rule on every row of the example table "
        "(distkl.examples) against an independent Monte Carlo estimate. Exit 1 on any failure.",
    )
    p_ver.add_argument(
        "--device",
        choices=["cpu", "cuda", "all"],
        default="all",
        help="device(s) to check on (default: every available one)",
    )
    p_ver.add_argument("--dtype", choices=["float32", "float64", "all"], default="all")
    p_ver.add_argument("--quick", action="store_true", help="fewer samples (faster, less power)")
    p_ver.add_argument(
        "--num-samples", type=int, default=None, help="Monte Carlo samples per check"
    )
    p_ver.add_argument(
        "--alpha",
        type=float,
        default=1e-3,
        help="false-failure rate for the whole run (default 1e-3)",
    )
    p_ver.add_argument(
        "--only",
        default=None,
        metavar="SUBSTR",
        help="only the example rows whose id contains SUBSTR",
    )
    p_ver.add_argument("--seed", type=int, default=0)
    p_ver.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p_ver.add_argument(
        "--plot",
        default=None,
        metavar="FILE",
        help="draw the running MC estimates (needs matplotlib: distkl[plot])",
    )
    p_ver.add_argument(
        "--strict",
        action="store_true",
        help="also fail on registered rules without an example row, and rows without a rule",
    )
    p_ver.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    p_ver.set_defaults(func=_cmd_verify)

    p_der = sub.add_parser("derive", help="the sympy-derived closed form of KL(P || Q)")
    p_der.add_argument("p", nargs="?", help="family of p, e.g. Normal")
    p_der.add_argument("q", nargs="?", help="family of q, e.g. Laplace")
    p_der.add_argument("--latex", action="store_true", help="print only the LaTeX")
    p_der.add_argument("--rederive", action="store_true", help="derive again, ignoring the cache")
    p_der.add_argument("--timeout", type=float, default=60.0, help="seconds sympy may take")
    p_der.add_argument("--list", action="store_true", help="the supported families and pairs")
    p_der.set_defaults(func=_cmd_derive)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``distkl`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    import distkl  # noqa: F401  (registers the rules)

    try:
        status: int = args.func(args)
    except BrokenPipeError:  # `distkl list | head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
