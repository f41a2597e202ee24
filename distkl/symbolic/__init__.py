r"""Closed forms of `KL(p || q)` in nats derived with sympy (imported only when asked for).

`import distkl` never imports this package (sympy is slow to import); `import distkl.symbolic`
does:

```python
from distkl.symbolic import derive
d = derive("Normal", "Laplace")
print(d.pretty())        # the formula
d.latex                  # its LaTeX
d(p, q)                  # evaluated with torch on two distribution objects
```

See `distkl.symbolic.derive` and `docs/symbolic.md`.
"""

from distkl.symbolic.derive import (
    CACHE_PATH,
    FAMILIES,
    Derivation,
    DerivationError,
    DerivationTimeout,
    Family,
    cached_pairs,
    derive,
    derive_expr,
    derived_kl,
    family,
    refresh_cache,
)
from distkl.symbolic.register import derive_and_register

__all__ = [
    "CACHE_PATH",
    "FAMILIES",
    "Derivation",
    "DerivationError",
    "DerivationTimeout",
    "Family",
    "cached_pairs",
    "derive",
    "derive_and_register",
    "derive_expr",
    "derived_kl",
    "family",
    "refresh_cache",
]
