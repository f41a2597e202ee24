r"""Closed forms of `KL(p || q)` (nats) derived by sympy, compiled to torch, cached on disk.

A [`Family`][distkl.symbolic.Family] says how sympy sees a distribution class: its log-density as a
sympy expression in a variable `x` whose other symbols are named like the class's attributes (`loc`,
`scale`, `rate`, `probs`), and its support. [`derive`][distkl.symbolic.derive.derive] integrates

$$
\mathrm{KL}(p \| q) = \int p(x) \, (\log p(x) - \log q(x)) \, dx
$$

(a sum over the categories for discrete families) in a child process that is killed after
`timeout` seconds, simplifies it and returns a [`Derivation`][distkl.symbolic.Derivation]: the
expression (`.latex`, `.pretty()`) and a torch function of two distribution objects
(`derivation(p, q)`), which also accepts `Independent` wrappers of the families (the KL of a product
is the sum over the event).

The built-in families ([`FAMILIES`][distkl.symbolic.FAMILIES]) are derived once and stored in
`cache.json` next to this file, so that tests and `distkl derive` are fast;
[`refresh_cache`][distkl.symbolic.refresh_cache] derives them again and compares.
[`derive_and_register`][distkl.symbolic.derive_and_register] does the whole path for a user's own
pair: derive, compile, check against sampling, register with
    [`distkl.register_kl`][distkl.register_kl].
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import sympy as sp
import torch
from torch import Tensor
from torch.distributions import (
    Distribution,
    Independent,
)

from distkl.symbolic._codegen import simplified, torch_source
from distkl.symbolic._engine import DerivationError, numeric_constants
from distkl.symbolic.families import (
    CATEGORIES,
    FAMILIES,
    K_INDEX,
    X_REAL,
    Family,
    Support,
    family,
)

__all__ = [
    "Family",
    "Derivation",
    "DerivationError",
    "DerivationTimeout",
    "FAMILIES",
    "family",
    "derive",
    "derive_expr",
    "derived_kl",
    "cached_pairs",
    "refresh_cache",
    "CACHE_PATH",
]

ENGINE_PATH = Path(__file__).with_name("_engine.py")
CACHE_PATH = Path(__file__).with_name("cache.json")
DEFAULT_TIMEOUT = 60.0


class DerivationTimeout(TimeoutError):
    """sympy did not finish a derivation within the time limit (the child process was killed)."""


# --------------------------------------------------------------------------------------------
# Deriving (in a child process that can be killed)


def _request(p: Family, q: Family) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """The JSON request for the engine, and the map from symbol name to (which, attribute)."""
    if p.discrete != q.discrete:
        raise NotImplementedError(
            f"KL({p.name} || {q.name}): one family is discrete and the other continuous; "
            "distkl.symbolic derives pairs of the same kind only."
        )
    if p.discrete:
        x: sp.Symbol = K_INDEX
    else:
        lo = p.bounds()[0]
        x = sp.Symbol("x", positive=True) if (lo - 0).is_nonnegative else X_REAL
    log_p, names_p = p.renamed("p", x)
    log_q, names_q = q.renamed("q", x)
    args = {n: ("p", a) for n, a in names_p.items()}
    args.update({n: ("q", a) for n, a in names_q.items()})
    request: dict[str, Any] = {"log_p": sp.srepr(log_p), "log_q": sp.srepr(log_q), "x": sp.srepr(x)}
    if p.discrete:
        request["support"] = CATEGORIES
        request["num"] = sp.srepr(sp.Symbol("K", integer=True, positive=True))
    else:
        request["support"] = [sp.srepr(b) for b in p.bounds()]
    return request, args


def _request_key(request: dict[str, Any]) -> str:
    """A hash of what a request derives: expressions and their symbols' assumptions, in a
    canonical order (`srepr` lists assumptions in an order that varies between processes)."""
    parts: dict[str, Any] = {}
    for key, value in request.items():
        if key in ("log_p", "log_q", "x", "num"):
            expr = sp.sympify(value)
            symbols = sorted(
                (s.name, sorted(s.assumptions0.items())) for s in expr.atoms(sp.Symbol)
            )
            parts[key] = [str(expr), symbols]
        else:
            parts[key] = value
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _outside_support(p: Family, q: Family) -> bool:
    """True when p's support is provably not inside q's (then KL(p || q) = +inf)."""
    if p.discrete:
        return False
    (plo, phi), (qlo, qhi) = p.bounds(), q.bounds()
    return bool((plo - qlo).is_extended_negative or (phi - qhi).is_extended_positive)


def _run_engine(request: dict[str, Any], timeout: float, what: str) -> sp.Expr:
    try:
        proc = subprocess.run(
            [sys.executable, str(ENGINE_PATH)],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise DerivationTimeout(
            f"sympy did not derive {what} within {timeout:g} s and was stopped. The integral may "
            "have no closed form (a Normal against a Gaussian mixture has none); pass a larger "
            "timeout= to wait longer."
        ) from None
    if proc.returncode != 0:
        raise DerivationError(
            f"deriving {what} failed in the sympy process:\n{proc.stderr[-3000:]}"
        )
    answer = json.loads(proc.stdout)
    if not answer["ok"]:
        raise DerivationError(f"sympy could not derive {what}: {answer['error']}")
    return sp.sympify(answer["expr"])


def derive_expr(
    log_p: sp.Expr,
    log_q: sp.Expr,
    x: sp.Symbol,
    support: Support = (-sp.oo, sp.oo),
    *,
    timeout: float = DEFAULT_TIMEOUT,
) -> sp.Expr:
    r"""`KL(p || q)` in nats from two log-densities in `x`, as a sympy expression.

    $$
    \mathrm{KL}(p \| q) = \int_{\mathrm{supp}\, p} p(x) (\log p(x) - \log q(x)) \, dx
    $$

    sympy runs in a child process that is killed after `timeout` seconds.

    Raises:
        DerivationTimeout: when sympy takes longer than `timeout` seconds.
        DerivationError: when sympy cannot do an integral, or `exp(log_p)` does not integrate
            to one.
    """
    request: dict[str, Any] = {"log_p": sp.srepr(log_p), "log_q": sp.srepr(log_q), "x": sp.srepr(x)}
    if support == CATEGORIES:
        request["support"] = CATEGORIES
        request["num"] = sp.srepr(sp.Symbol("K", integer=True, positive=True))
    else:
        request["support"] = [sp.srepr(sp.sympify(b)) for b in support]
    return _run_engine(request, timeout, "KL(p || q)")


# --------------------------------------------------------------------------------------------
# The result, compiled to torch


def _sum_index(expr: sp.Sum) -> sp.Symbol:
    """The summation index of a derived sum over categories."""
    index: sp.Symbol = expr.limits[0][0]
    return index


def _torch_namespace() -> dict[str, Any]:
    return {
        "gamma": lambda t: torch.exp(torch.lgamma(t)),
        "polygamma": lambda n, t: torch.polygamma(int(n), t),
    }


@dataclass(frozen=True)
class Derivation:
    r"""A derived `KL(p || q)` in nats: the sympy expression and its torch function.

    Symbols are the attribute names with `_p` or `_q` appended (`loc_p`, `scale_q`).
    Calling `derivation(p, q)` on two distribution objects (or `Independent` wrappers of
    them, summed over the event) returns a tensor of shape
    `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """

    p: Family
    q: Family
    expr: sp.Expr
    args: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.p.name}-{self.q.name}"

    @property
    def latex(self) -> str:
        """`sympy.latex` of the expression: the single source of truth for the formula."""
        return sp.latex(self.expr)

    def pretty(self, width: Optional[int] = None) -> str:
        """The simplified formula as 2-D text if it fits `width` columns, else as one wrapped line.

        `width` defaults to the terminal's (at most 100).
        """
        if width is None:
            width = min(100, shutil.get_terminal_size().columns)
        expr = self.simplified()
        text = str(sp.pretty(expr, use_unicode=True, num_columns=10_000))
        if max(len(line) for line in text.splitlines()) <= width:
            return text
        return "\n".join(textwrap.wrap(f"KL = {sp.sstr(expr)}", width, subsequent_indent="     "))

    def simplified(self) -> sp.Expr:
        """The expression with like factors collected and logs of parameters combined.

        Equal to `expr` (`sympy.simplify` of the difference is 0); cheap, unlike `sp.simplify`.
        """
        return simplified(self.expr)

    def torch_source(self) -> str:
        """Python source of a torch function for this pair, decorated with `register_kl`."""
        return torch_source(self.p, self.q, self.simplified(), self.args)

    @functools.cached_property
    def _compiled(
        self,
    ) -> tuple[Callable[..., Any], Optional[Callable[..., Any]], list[tuple[str, str]]]:
        expr = self.expr
        density = None
        if isinstance(expr, sp.Sum):
            # sum over the last dimension: compile the summand elementwise in the categories
            summand = expr.function
            plain = {
                i: sp.Symbol(str(i.base.label), positive=True) for i in summand.atoms(sp.Indexed)
            }
            expr = summand.xreplace(plain)
            log_p, _ = self.p.renamed("p", _sum_index(self.expr))
            density = sp.exp(log_p).xreplace(
                {i: sp.Symbol(str(i.base.label), positive=True) for i in log_p.atoms(sp.Indexed)}
            )
        names = sorted(
            s.name for s in expr.free_symbols | (density.free_symbols if density else set())
        )
        unknown = [n for n in names if n not in self.args]
        if unknown:
            raise DerivationError(f"the derived form has symbols {unknown} that are no attributes.")
        symbols = [sp.Symbol(n) for n in names]
        plain_expr = expr.xreplace({s: sp.Symbol(s.name) for s in expr.free_symbols})
        plain_expr = plain_expr.replace(
            lambda t: isinstance(t, sp.log) and isinstance(t.args[0], sp.gamma),
            lambda t: sp.loggamma(t.args[0].args[0]),
        )
        modules = [_torch_namespace(), "torch"]
        fn = sp.lambdify(symbols, numeric_constants(plain_expr), modules=modules)
        dens_fn = None
        if density is not None:
            plain_dens = density.xreplace({s: sp.Symbol(s.name) for s in density.free_symbols})
            dens_fn = sp.lambdify(symbols, plain_dens, modules=modules)
        return fn, dens_fn, [self.args[n] for n in names]

    def __call__(self, p: Distribution, q: Distribution) -> Tensor:
        if isinstance(p, Independent) or isinstance(q, Independent):
            if not (isinstance(p, Independent) and isinstance(q, Independent)) or (
                p.reinterpreted_batch_ndims != q.reinterpreted_batch_ndims
            ):
                raise ValueError(
                    "p and q must both be Independent with the same reinterpreted_batch_ndims, got "
                    f"{type(p).__name__} and {type(q).__name__}."
                )
            value = self(p.base_dist, q.base_dist)
            n = p.reinterpreted_batch_ndims
            return value.sum(tuple(range(-n, 0))) if n else value
        for which, d, fam in (("p", p, self.p), ("q", q, self.q)):
            if not isinstance(d, fam.cls):
                raise NotImplementedError(
                    f"This derivation is KL({self.name}); {which} is a {type(d).__name__}."
                )
        fn, dens_fn, sources = self._compiled
        values = [getattr(p if which == "p" else q, attr) for which, attr in sources]
        ref = values[0] if values else p.mean
        out = torch.as_tensor(fn(*values), dtype=ref.dtype, device=ref.device)
        if dens_fn is not None:
            out = torch.where(torch.as_tensor(dens_fn(*values)) > 0, out, 0.0).sum(-1)
        shape = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
        return torch.broadcast_to(out, shape)

    def as_rule(self) -> Callable[[Distribution, Distribution], Tensor]:
        """The torch function with a rule's name and docstring, ready for `register_kl`."""

        def rule(p: Distribution, q: Distribution) -> Tensor:
            return self(p, q)

        rule.__name__ = rule.__qualname__ = f"_kl_{self.p.name.lower()}_{self.q.name.lower()}"
        rule.__module__ = __name__
        rule.__doc__ = (
            f"KL(p || q) of {self.p.name} and {self.q.name} in nats, derived by sympy:\n\n"
            f".. math::\n    {self.latex}\n"
        )
        return rule


# --------------------------------------------------------------------------------------------
# The cache


@functools.lru_cache(maxsize=1)
def _load_cache() -> dict[str, dict[str, str]]:
    if not CACHE_PATH.exists():
        return {}
    pairs: dict[str, dict[str, str]] = json.loads(CACHE_PATH.read_text())["pairs"]
    return pairs


def cached_pairs() -> list[str]:
    """The pair names (`"Normal-Laplace"`) whose derivations ship in `cache.json`."""
    return sorted(_load_cache())


def derive(
    p: Union[Family, type, str],
    q: Union[Family, type, str],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    cache: bool = True,
) -> Derivation:
    r"""Derive `KL(p || q)` in nats for two families (a [`Family`][distkl.symbolic.Family], a class
    or its name).

    Built-in pairs come from `cache.json` when its entry was derived from the same log-densities
    (`cache=False` derives again). When the support of `p` is not inside that of `q` the
    result is `+inf`.

    Raises:
        NotImplementedError: for a name or class without a built-in
            [`Family`][distkl.symbolic.Family].
        DerivationTimeout: when sympy takes longer than `timeout` seconds.
        DerivationError: when sympy cannot do the integral.
    """
    fp, fq = family(p), family(q)
    request, args = _request(fp, fq)
    name = f"{fp.name}-{fq.name}"
    if _outside_support(fp, fq):
        return Derivation(fp, fq, sp.oo, args)
    entry = _load_cache().get(name) if cache else None
    if entry is not None and entry["request"] == _request_key(request):
        expr = sp.sympify(entry["expr"])
    else:
        expr = _run_engine(request, timeout, f"KL({fp.name} || {fq.name})")
    return Derivation(fp, fq, expr, args)


def derived_kl(p: Distribution, q: Distribution) -> Tensor:
    r"""`KL(p || q)` in nats by the derived closed form of the built-in families.

    Accepts `Independent` wrappers (summed over the event). Returns a tensor of shape
    `broadcast_shapes(p.batch_shape, q.batch_shape)`.
    """
    bp = p.base_dist if isinstance(p, Independent) else p
    bq = q.base_dist if isinstance(q, Independent) else q
    return derive(type(bp), type(bq))(p, q)


def _builtin_pairs() -> Iterable[tuple[Family, Family]]:
    for a in FAMILIES.values():
        for b in FAMILIES.values():
            if a.discrete == b.discrete:
                yield a, b


def refresh_cache(
    pairs: Optional[Iterable[str]] = None, *, write: bool = False, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, str]:
    """Derive the built-in pairs again and compare with `cache.json`.

    Args:
        pairs: pair names (`"Normal-Laplace"`); default every built-in pair.
        write: write the fresh derivations to `cache.json`.
        timeout: seconds per derivation.

    Returns:
        `{pair: status}` with status `"same"` (the cached form simplifies to the new one),
        `"new"` (not cached before), `"changed"`, `"infinite"` (supports do not nest;
        nothing to cache) or `"failed: <reason>"`.
    """
    wanted = set(pairs) if pairs is not None else None
    old = dict(_load_cache())
    new: dict[str, dict[str, str]] = {}
    status: dict[str, str] = {}
    for fp, fq in _builtin_pairs():
        name = f"{fp.name}-{fq.name}"
        if wanted is not None and name not in wanted:
            if name in old:
                new[name] = old[name]
            continue
        if _outside_support(fp, fq):
            status[name] = "infinite"
            continue
        request, _ = _request(fp, fq)
        try:
            expr = _run_engine(request, timeout, f"KL({fp.name} || {fq.name})")
        except (DerivationError, DerivationTimeout) as e:
            status[name] = f"failed: {e}"
            if name in old:
                new[name] = old[name]
            continue
        new[name] = {"request": _request_key(request), "expr": sp.srepr(expr)}
        if name not in old:
            status[name] = "new"
        else:
            same = sp.simplify(sp.sympify(old[name]["expr"]) - expr) == 0
            status[name] = "same" if same else "changed"
    if write:
        payload = {"sympy_version": sp.__version__, "pairs": dict(sorted(new.items()))}
        CACHE_PATH.write_text(json.dumps(payload, indent=1) + "\n")
        _load_cache.cache_clear()
    return status
