r"""The sympy core of `distkl.symbolic`: `KL(p || q)` as an integral (or sum), in nats.

This file imports only sympy and the standard library, so it can run as a script in a child
process that is killed when a derivation takes too long (`python _engine.py` reads a JSON
request on stdin and writes a JSON answer on stdout). `distkl.symbolic.derive` does that.

The method:

$$
\mathrm{KL}(p \| q) = \int p(x) \, (\log p(x) - \log q(x)) \, dx
= c_0 + \sum_i c_i \, \mathbb{E}_p[g_i(x)]
$$

`log p - log q` is expanded into x-free coefficients `c_i` times x-dependent terms `g_i`,
and each expectation is integrated on its own. Absolute values `|a x + b|` (Laplace) split the
support at their zeros; when the order of two split points depends on the parameters (the two
locations of a Laplace pair) both orders are derived and, when they agree up to the sign of the
difference, joined into one formula in `|difference|`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import sympy as sp

__all__ = ["kl_integral", "kl_sum", "numeric_constants", "solve_request"]


class DerivationError(ValueError):
    """sympy could not derive a closed form (or the input is not a normalised density)."""


def _split_terms(diff: sp.Expr, x: sp.Symbol) -> tuple[sp.Expr, dict[sp.Expr, sp.Expr]]:
    """`diff = c0 + sum_g coeff[g] * g` with `c0` and `coeff[g]` free of `x`."""
    c0, rest = diff.as_independent(x, as_Add=True)
    groups: dict[sp.Expr, sp.Expr] = {}
    for term in sp.Add.make_args(rest):
        coeff, g = term.as_independent(x, as_Add=False)
        groups[g] = groups.get(g, sp.S.Zero) + coeff
    return c0, groups


def _abs_points(expr: sp.Expr, x: sp.Symbol) -> list[sp.Expr]:
    """Zeros of the arguments of every `Abs(...)` in `expr` that depends on `x`."""
    points: list[sp.Expr] = []
    for a in expr.atoms(sp.Abs):
        if not a.has(x):
            continue
        poly = sp.Poly(a.args[0], x)
        if poly.degree() != 1:
            raise DerivationError(f"only |a x + b| is supported inside the densities, got {a}.")
        root = sp.solve(a.args[0], x)[0]
        if all(sp.simplify(root - r) != 0 for r in points):
            points.append(root)
    return points


def _order(points: list[sp.Expr]) -> list[sp.Expr] | tuple[sp.Expr, sp.Expr]:
    """Sort `points` if their order is decided by the symbols' assumptions, else the first
    pair `(a, b)` whose order is not."""
    out: list[sp.Expr] = []
    for pt in points:
        i = 0
        while i < len(out):
            d = sp.simplify(pt - out[i])
            if d.is_extended_negative:
                break
            if not d.is_extended_positive:
                return (out[i], pt)
            i += 1
        out.insert(i, pt)
    return out


def _replace_abs(expr: sp.Expr, x: sp.Symbol, mid: sp.Expr) -> sp.Expr:
    def sign_of(arg: sp.Expr) -> sp.Expr:
        s = sp.sign(sp.simplify(arg.subs(x, mid)))
        if s not in (1, -1, 0):
            raise DerivationError(f"cannot decide the sign of {arg} between split points.")
        return arg * s

    return expr.replace(lambda t: isinstance(t, sp.Abs) and t.has(x), lambda t: sign_of(t.args[0]))


def _integrate_pieces(f: sp.Expr, x: sp.Symbol, points: list[sp.Expr]) -> sp.Expr:
    total = sp.S.Zero
    for a, b in zip(points[:-1], points[1:]):
        if a == -sp.oo and b == sp.oo:
            mid = sp.S.Zero
        elif a == -sp.oo:
            mid = b - 1
        elif b == sp.oo:
            mid = a + 1
        else:
            mid = (a + b) / 2
        piece = sp.expand(_replace_abs(f, x, mid))
        value = sp.integrate(piece, (x, a, b), conds="none")
        if value.has(sp.Integral):
            raise DerivationError(f"sympy could not integrate {piece} over ({a}, {b}).")
        total += value
    return total


def _case_split(
    log_p: sp.Expr, log_q: sp.Expr, x: sp.Symbol, lo: sp.Expr, hi: sp.Expr, a: sp.Expr, b: sp.Expr
) -> sp.Expr:
    """Derive for `b - a = d > 0` and `b - a = -d < 0` and join the two."""
    delta = sp.expand(b - a)
    candidates = [s for s in sorted(delta.free_symbols, key=str) if sp.Poly(delta, s).degree() == 1]
    if not candidates:
        raise DerivationError(f"cannot order the split points {a} and {b}.")
    s = candidates[-1]
    d = sp.Dummy("d", positive=True)
    results = []
    for sign in (1, -1):
        (s_of_d,) = sp.solve(sp.Eq(delta, sign * d), s)
        sub = {s: s_of_d}
        r = kl_integral(log_p.subs(sub), log_q.subs(sub), x, lo.subs(sub), hi.subs(sub))
        results.append(r)
    if sp.simplify(results[0] - results[1]) == 0:
        return _tidy(results[0].subs(d, sp.Abs(delta)))
    return sp.Piecewise((results[0].subs(d, delta), delta >= 0), (results[1].subs(d, -delta), True))


def _density(log_p: sp.Expr) -> sp.Expr:
    """`exp(log_p)` as a product of powers (`x**(a-1) / gamma(a)`, not `exp((a-1) log x)`)."""

    def as_power(t: sp.Expr) -> sp.Expr:
        arg = t.args[0]
        for lg in arg.atoms(sp.log):
            c = sp.cancel(arg / lg)
            if not c.has(sp.log):
                return lg.args[0] ** c
        return t

    density = sp.expand_power_exp(sp.exp(sp.expand(log_p)))
    return density.replace(lambda t: isinstance(t, sp.exp), as_power)


def kl_integral(
    log_p: sp.Expr, log_q: sp.Expr, x: sp.Symbol, lo: sp.Expr = -sp.oo, hi: sp.Expr = sp.oo
) -> sp.Expr:
    r"""`KL(p || q) = \int_lo^hi p(x) (log p(x) - log q(x)) dx` in nats, simplified.

    `log_p` and `log_q` are log-densities in `x`; `(lo, hi)` is the support of `p`.
    Raises [`DerivationError`][distkl.symbolic.DerivationError] when sympy cannot do an integral or
    `p` does not integrate to one.
    """
    lo, hi = sp.sympify(lo), sp.sympify(hi)
    points = [lo] + [pt for pt in _abs_points(log_p + log_q, x) if pt not in (lo, hi)] + [hi]
    ordered = _order(points)
    if isinstance(ordered, tuple):
        return _case_split(log_p, log_q, x, lo, hi, *ordered)
    # split points outside the support of p do not split it
    inside = [
        pt
        for pt in ordered
        if not (
            sp.simplify(pt - lo).is_extended_negative or sp.simplify(pt - hi).is_extended_positive
        )
    ]
    density = _density(log_p)
    mass = sp.simplify(_integrate_pieces(density, x, inside))
    if mass != 1:
        raise DerivationError(f"p's density integrates to {mass} over ({lo}, {hi}), not 1.")
    c0, groups = _split_terms(sp.expand(sp.expand_log(log_p - log_q, force=True)), x)
    total = c0
    for g, coeff in groups.items():
        expectation = sp.simplify(_integrate_pieces(sp.expand(density * g), x, inside))
        total += sp.expand(coeff * expectation)
    return _tidy(total)


def kl_sum(log_p: sp.Expr, log_q: sp.Expr, k: sp.Symbol, num: sp.Expr) -> sp.Expr:
    r"""`KL(p || q) = \sum_{k=0}^{num-1} p(k) (log p(k) - log q(k))` in nats, for categories."""
    summand = sp.exp(log_p) * sp.expand(sp.expand_log(log_p - log_q, force=True))
    return sp.Sum(sp.expand(summand), (k, 0, num - 1))


def _tidy(expr: sp.Expr) -> sp.Expr:
    """A readable form: logs expanded (`log(a / b)` as `log a - log b`), then simplified
    without recombining them."""
    expr = sp.expand(sp.expand_log(sp.simplify(expr), force=True))
    expr = sp.powsimp(expr, combine="exp")
    return expr.replace(
        lambda t: isinstance(t, (sp.exp, sp.erf)) and len(t.free_symbols) > 1,
        lambda t: t.func(sp.factor(t.args[0])),
    )


def numeric_constants(expr: sp.Expr, digits: int = 25) -> sp.Expr:
    """Replace every irrational number subexpression (`pi`, `sqrt(2)`, `log(2)`) by a Float,
    so that code printed for torch never calls a torch function on a Python int."""
    if expr.is_number and not expr.is_Rational:
        return sp.Float(expr.evalf(digits), digits)
    if not expr.args:
        return expr
    return expr.func(*(numeric_constants(a, digits) for a in expr.args))


def solve_request(request: dict[str, Any]) -> dict[str, Any]:
    """Answer one JSON request (`srepr` strings in, `srepr` string out)."""
    try:
        log_p = sp.sympify(request["log_p"])
        log_q = sp.sympify(request["log_q"])
        x = sp.sympify(request["x"])
        if request["support"] == "categories":
            expr = kl_sum(log_p, log_q, x, sp.sympify(request["num"]))
        else:
            lo, hi = (sp.sympify(s) for s in request["support"])
            expr = kl_integral(log_p, log_q, x, lo, hi)
    except DerivationError as e:
        return {"ok": False, "error": str(e)}
    return {"ok": True, "expr": sp.srepr(expr)}


if __name__ == "__main__":
    json.dump(solve_request(json.load(sys.stdin)), sys.stdout)
