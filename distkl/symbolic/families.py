"""How sympy sees a distribution class (`Family`), and the built-in families."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import sympy as sp
from torch.distributions import (
    Categorical,
    Exponential,
    Gamma,
    HalfNormal,
    Laplace,
    Normal,
    OneHotCategorical,
)

__all__ = ["CATEGORIES", "FAMILIES", "K_INDEX", "X_REAL", "Family", "Support", "family"]

#: The sum over categories, marked as a support.
CATEGORIES = "categories"
Support = Union[tuple[Any, Any], str]


@dataclass(frozen=True)
class Family:
    r"""A distribution class as sympy sees it.

    Args:
        cls: the `Distribution` subclass.
        log_prob: `log p(x)` as a sympy expression in `x`; every other symbol is named like
            an attribute of `cls` (`loc`, `scale`), with its assumptions (`positive=True`
            for a scale). For `support="categories"` the expression is in the category index
            `x` and parameters are `sympy.IndexedBase` (`probs[x]`) read from the last
            dimension of the attribute.
        x: the variable of `log_prob`.
        support: `(low, high)` of `x` (sympy numbers, `sympy.oo` allowed) or
            `"categories"`.
    """

    cls: type
    log_prob: sp.Expr
    x: sp.Symbol
    support: Support = (-sp.oo, sp.oo)

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def discrete(self) -> bool:
        return self.support == CATEGORIES

    @property
    def params(self) -> tuple[str, ...]:
        """The attribute names read from a distribution object, sorted."""
        names = {
            s.name for s in self.log_prob.free_symbols if s != self.x and isinstance(s, sp.Symbol)
        }
        names |= {str(b.label) for b in self.log_prob.atoms(sp.IndexedBase)}
        names -= {self.x.name}
        return tuple(sorted(names))

    def bounds(self) -> tuple[sp.Expr, sp.Expr]:
        if self.discrete:
            raise ValueError(f"{self.name} is discrete: it has categories, not bounds.")
        lo, hi = self.support[0], self.support[1]
        return sp.sympify(lo), sp.sympify(hi)

    def renamed(self, suffix: str, x: sp.Symbol) -> tuple[sp.Expr, dict[str, str]]:
        """`log_prob` with every parameter `a` renamed `a_<suffix>` and `x` replaced by
        `x`; and the map from new symbol names to attribute names."""
        expr = self.log_prob.subs(self.x, x)
        names: dict[str, str] = {}
        sub: dict[Any, Any] = {}
        for s in self.log_prob.free_symbols:
            if isinstance(s, sp.Symbol) and s != self.x and not isinstance(s, sp.Dummy):
                new = sp.Symbol(f"{s.name}_{suffix}", **s.assumptions0)
                sub[s] = new
                names[new.name] = s.name
        for base in self.log_prob.atoms(sp.IndexedBase):
            label = str(base.label)
            new_base = sp.IndexedBase(f"{label}_{suffix}", **base.assumptions0)
            sub[base] = new_base
            names[f"{label}_{suffix}"] = label
        return expr.xreplace(sub), names


X_REAL = sp.Symbol("x", real=True)
K_INDEX = sp.Symbol("k", integer=True, nonnegative=True)
_loc = sp.Symbol("loc", real=True)
_scale = sp.Symbol("scale", positive=True)
_rate = sp.Symbol("rate", positive=True)
_conc = sp.Symbol("concentration", positive=True)
_probs = sp.IndexedBase("probs", positive=True)
_pos = (sp.S.Zero, sp.oo)


def _builtin_families() -> dict[str, Family]:
    z = (X_REAL - _loc) / _scale
    fams = [
        Family(Normal, -(z**2) / 2 - sp.log(_scale) - sp.log(2 * sp.pi) / 2, X_REAL),
        Family(Laplace, -sp.Abs(X_REAL - _loc) / _scale - sp.log(2 * _scale), X_REAL),
        Family(Exponential, sp.log(_rate) - _rate * X_REAL, X_REAL, _pos),
        Family(
            HalfNormal,
            sp.log(2) / 2 - sp.log(sp.pi) / 2 - sp.log(_scale) - X_REAL**2 / (2 * _scale**2),
            X_REAL,
            _pos,
        ),
        Family(
            Gamma,
            _conc * sp.log(_rate)
            + (_conc - 1) * sp.log(X_REAL)
            - _rate * X_REAL
            - sp.log(sp.gamma(_conc)),
            X_REAL,
            _pos,
        ),
        Family(Categorical, sp.log(_probs[K_INDEX]), K_INDEX, CATEGORIES),
        Family(OneHotCategorical, sp.log(_probs[K_INDEX]), K_INDEX, CATEGORIES),
    ]
    return {f.name: f for f in fams}


#: The built-in families by class name: Normal, Laplace, Exponential, HalfNormal, Gamma,
#: Categorical, OneHotCategorical.
FAMILIES: dict[str, Family] = _builtin_families()


def family(spec: Union[Family, type, str]) -> Family:
    """The [`Family`][distkl.symbolic.Family] for a Family, a built-in class or its name
    (case-insensitive)."""
    if isinstance(spec, Family):
        return spec
    if isinstance(spec, type):
        spec = spec.__name__
    if isinstance(spec, str):
        for name, fam in FAMILIES.items():
            if name.lower() == spec.lower():
                return fam
    raise NotImplementedError(
        f"distkl.symbolic has no built-in family {spec!r}; supported: {', '.join(FAMILIES)}. "
        "Describe your own with distkl.symbolic.Family(cls, log_prob, x, support)."
    )
