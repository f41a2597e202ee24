"""Presenting a derived KL: a cheaper, readable simplification and ready-to-register torch code."""

from __future__ import annotations

from typing import Any

import sympy as sp
from sympy.printing.pytorch import torch_code

from distkl.symbolic._engine import numeric_constants

__all__ = ["simplified", "torch_source"]


def simplified(expr: sp.Expr) -> sp.Expr:
    """`expr` with like factors collected and logs of parameters and constants combined."""
    if isinstance(expr, sp.Sum):
        return expr
    funcs = sorted((a for a in expr.atoms(sp.Function) if not isinstance(a, sp.log)), key=str)
    collected = sp.collect(expr, funcs) if funcs else expr
    logs: list[sp.Expr] = []
    rest: list[sp.Expr] = []
    for term in sp.Add.make_args(collected):
        _, factor = term.as_coeff_Mul()
        plain = isinstance(factor, sp.log) and (
            factor.args[0].is_Symbol or factor.args[0].is_number
        )
        (logs if plain else rest).append(term)
    return sp.Add(*rest) + sp.logcombine(sp.Add(*logs), force=True)


def _torch_expression(expr: sp.Expr, args: dict[str, tuple[str, str]]) -> tuple[str, list[str]]:
    """`(code, symbol names)` of `expr` as one torch expression; a sum over categories is a
    masked `.sum(-1)` over the last dimension (0 log 0 = 0)."""
    summand = expr.function if isinstance(expr, sp.Sum) else None
    body = summand if summand is not None else expr
    if summand is not None:
        body = body.xreplace({i: sp.Symbol(str(i.base.label)) for i in body.atoms(sp.Indexed)})
    body = body.xreplace({s: sp.Symbol(s.name) for s in body.free_symbols})
    body = body.replace(
        lambda t: isinstance(t, sp.log) and isinstance(t.args[0], sp.gamma),
        lambda t: sp.loggamma(t.args[0].args[0]),
    )
    code = torch_code(numeric_constants(body))
    if summand is not None:
        probs = sorted(n for n in args if args[n][0] == "p")[0]
        code = f"torch.where({probs} > 0, {code}, 0.0).sum(-1)"
    return code, sorted(s.name for s in body.free_symbols)


def torch_source(p: Any, q: Any, expr: sp.Expr, args: dict[str, tuple[str, str]]) -> str:
    """Python source of `@register_kl(P, Q) def _kl_p_q(p, q): ...` for families `p`, `q`."""
    code, names = _torch_expression(expr, args)
    unpack = [f"    {n} = {args[n][0]}.{args[n][1]}" for n in names]
    classes = (p.cls, q.cls)
    return "\n".join(
        [
            "import torch",
            *dict.fromkeys(f"from {c.__module__} import {c.__name__}" for c in classes),
            "from torch.distributions import register_kl",
            "",
            "",
            f"@register_kl({classes[0].__name__}, {classes[1].__name__})",
            f"def _kl_{p.name.lower()}_{q.name.lower()}(p, q):",
            f'    """KL(p || q) in nats, derived by sympy (distkl derive {p.name} {q.name})."""',
            *unpack,
            f"    return {code}",
        ]
    )
