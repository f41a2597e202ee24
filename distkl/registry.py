r"""Registries: a safe wrapper around torch's `register_kl`, distkl's JSD registry, and lookups.

torch's `torch.distributions.kl.register_kl` silently overwrites an existing entry. distkl never
changes what torch already answers, so every distkl rule goes through `register_kl` here, which
refuses a pair that torch (or anyone) has registered already, and records what kind of rule it is
(`"exact"` closed form, `"estimate"` computed by the method in force, or a per-call kind decided
from the actual components) for `distkl list`.

The JSD registry uses torch's KL dispatch semantics: the most specific `(P, Q)` match by
subclass, a `RuntimeWarning` on ambiguity, a memoised lookup, refusal to overwrite, and a
`NotImplementedError` that lists what is registered. `lookup_kl` / `lookup_jsd` answer "which
rule runs for these types, and what kind is it"; `registered_kl` / `registered_jsd` register a
rule for the duration of a `with` block and restore every table afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar, Union

from torch import Tensor
from torch.distributions import Distribution
from torch.distributions import kl as _torch_kl

from distkl._checks import check_skew
from distkl._torch_compat import kl_memo, kl_table

__all__ = [
    "KindFn",
    "PerCallKind",
    "RuleInfo",
    "register_kl",
    "register_jsd",
    "js_divergence",
    "kl_rules",
    "jsd_rules",
    "skipped_kl_rules",
    "lookup_kl",
    "lookup_jsd",
    "registered_kl",
    "registered_jsd",
    "preserved_registries",
]

Pair = tuple[type[Distribution], type[Distribution]]
KLFn = TypeVar("KLFn", bound=Callable[..., Tensor])
JSDFn = TypeVar("JSDFn", bound=Callable[..., Tensor])
#: A per-call kind: `kind(p, q)` returns `"exact"` or `"estimate"` for the actual arguments.
KindFn = Callable[[Distribution, Distribution], str]

KINDS = ("exact", "estimate")
#: The kind `skipped_kl_rules` reports for a rule another library registered.
EXTERNAL = "external"


@dataclass(frozen=True)
class PerCallKind:
    """A rule's kind decided per call from the actual distributions, with a summary for listings.

    Example:
        >>> kind = PerCallKind(lambda p, q: "exact", "exact for every pair")
        >>> kind.summary
        'exact for every pair'
    """

    decide: KindFn
    summary: str

    def __call__(self, p: Distribution, q: Distribution) -> str:
        return self.decide(p, q)


@dataclass(frozen=True)
class RuleInfo:
    """What distkl knows about one registered rule.

    Attributes:
        type_p: the registered type of `p`.
        type_q: the registered type of `q`.
        fn: the rule.
        kind: the kind at type level: `"exact"` when every call returns a closed form,
            `"estimate"` when some calls may return an estimate (see `kind_for` for a given
            pair of distributions), `"external"` for another library's rule.
        kind_of: for a rule whose kind depends on the components, `kind_of(p, q)`.
        summary: the kind in words for listings, e.g. "exact for categorical components,
            estimate otherwise".
    """

    type_p: type
    type_q: type
    fn: Callable[..., Tensor]
    kind: str
    kind_of: Optional[KindFn] = None
    summary: Optional[str] = None

    @property
    def module(self) -> str:
        return self.fn.__module__

    @property
    def name(self) -> str:
        return f"{self.type_p.__name__}-{self.type_q.__name__}"

    @property
    def kind_summary(self) -> str:
        """The kind in words: `"exact"`, `"estimate"`, or the per-call summary."""
        return self.summary or self.kind

    def kind_for(self, p: Distribution, q: Distribution) -> str:
        """`"exact"` or `"estimate"`: what this rule computes for these distributions."""
        if self.kind_of is None:
            return self.kind
        kind = self.kind_of(p, q)
        if kind not in KINDS:
            raise ValueError(
                f"the kind function of rule {self.name} returned {kind!r}; expected one of {KINDS}."
            )
        return kind


_KL_RULES: dict[Pair, RuleInfo] = {}
_SKIPPED_KL: dict[Pair, RuleInfo] = {}  # distkl rules not registered: someone else had the pair
_JSD_RULES: dict[Pair, RuleInfo] = {}


def _check_types(type_p: object, type_q: object, what: str) -> None:
    for name, t in (("type_p", type_p), ("type_q", type_q)):
        if not (isinstance(t, type) and issubclass(t, Distribution)):
            raise TypeError(
                f"{what} expects {name} to be a torch.distributions.Distribution subclass, "
                f"got {t!r}."
            )


def _check_kind(kind: object) -> None:
    if not callable(kind) and kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS} or a function (p, q) -> kind, got {kind!r}.")


def _rule_info(
    type_p: type, type_q: type, fn: Callable[..., Tensor], kind: Union[str, KindFn]
) -> RuleInfo:
    """A RuleInfo for `kind` given as a string or as a per-call kind function."""
    if callable(kind):
        summary = kind.summary if isinstance(kind, PerCallKind) else "exact or estimate, per call"
        return RuleInfo(type_p, type_q, fn, "estimate", kind, summary)
    return RuleInfo(type_p, type_q, fn, kind)


def _same_rule(existing: Callable[..., Tensor], fn: Callable[..., Tensor]) -> bool:
    """True for the same function, or its new copy after `importlib.reload` of its module."""
    return existing is fn or (
        existing.__module__ == fn.__module__ and existing.__qualname__ == fn.__qualname__
    )


def register_kl(
    type_p: type[Distribution],
    type_q: type[Distribution],
    *,
    kind: Union[str, KindFn] = "exact",
    on_conflict: str = "raise",
) -> Callable[[KLFn], KLFn]:
    """Register a rule with torch's `kl_divergence`; never overwrite.

    Args:
        type_p: a `Distribution` subclass.
        type_q: a `Distribution` subclass.
        kind: `"exact"` for a closed form, `"estimate"` for a rule that computes by the method
            in force (`distkl.options`), or a function `(p, q) -> "exact" | "estimate"` when it
            depends on the components: a `PerCallKind` carries a summary for listings, e.g.
            "exact for categorical components, estimate otherwise".
        on_conflict: what to do when another library already registered `(type_p, type_q)`:
            `"raise"` (default) raises `ValueError`; `"skip"` leaves the existing rule in place
            and records the pair in `skipped_kl_rules`. distkl's own rules use `"skip"`, so
            `import distkl` after, e.g., Pyro (which registers `(Independent,
            MultivariateNormal)`) keeps Pyro's answer and does not fail.

    Returns:
        A decorator that registers its function and returns it unchanged.

    Raises:
        TypeError: if a type is not a Distribution subclass.
        ValueError: if `(type_p, type_q)` is already in torch's KL registry and
            `on_conflict="raise"`, or `kind` or `on_conflict` is invalid.
    """
    _check_types(type_p, type_q, "register_kl")
    _check_kind(kind)
    if on_conflict not in ("raise", "skip"):
        raise ValueError(f"on_conflict must be 'raise' or 'skip', got {on_conflict!r}.")

    def decorator(fn: KLFn) -> KLFn:
        existing = kl_table().get((type_p, type_q))
        if existing is not None and not _same_rule(existing, fn):
            if on_conflict == "skip":
                _SKIPPED_KL[type_p, type_q] = RuleInfo(type_p, type_q, existing, EXTERNAL)
                return fn
            raise ValueError(
                f"KL({type_p.__name__} || {type_q.__name__}) is already registered with torch "
                f"(by {existing.__module__}.{existing.__qualname__}); distkl does not overwrite it."
            )
        _torch_kl.register_kl(type_p, type_q)(fn)
        _KL_RULES[type_p, type_q] = _rule_info(type_p, type_q, fn, kind)
        return fn

    return decorator


def _is_live(info: RuleInfo) -> bool:
    """True when torch's table still holds distkl's function for the pair."""
    return kl_table().get((info.type_p, info.type_q)) is info.fn


def kl_rules() -> list[RuleInfo]:
    """Every KL rule of distkl's that torch's live registry still dispatches to, by pair name.

    A pair another library registered over distkl's after `import distkl` (Pyro's
    `(Independent, MultivariateNormal)` after `import pyro`) is listed by `skipped_kl_rules`.
    """
    return sorted((r for r in _KL_RULES.values() if _is_live(r)), key=lambda r: r.name)


def skipped_kl_rules() -> list[RuleInfo]:
    """Pairs distkl has a rule for but torch's registry answers with another library's rule.

    Either the other rule was registered first (distkl skipped the pair) or it replaced
    distkl's later. Each `RuleInfo` holds the function torch dispatches to now (e.g. Pyro's),
    with kind `"external"`.
    """
    out = dict(_SKIPPED_KL)
    for key, info in _KL_RULES.items():
        current = kl_table().get(key)
        if current is not info.fn and current is not None:
            out[key] = RuleInfo(info.type_p, info.type_q, current, EXTERNAL)
    return sorted(out.values(), key=lambda r: r.name)


def jsd_rules() -> list[RuleInfo]:
    """Every JSD rule in distkl's registry, sorted by pair name."""
    return sorted(_JSD_RULES.values(), key=lambda r: r.name)


# --------------------------------------------------------------------------------------------
# Dispatch: torch's semantics (the most specific match), one implementation for lookups and JSD.


@functools.total_ordering
class _Match:
    """Lexicographic subclass order on type tuples, as in torch.distributions.kl."""

    __slots__ = ["types"]

    def __init__(self, *types: type) -> None:
        self.types = types

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Match) and self.types == other.types

    def __le__(self, other: _Match) -> bool:
        for x, y in zip(self.types, other.types):
            if not issubclass(x, y):
                return False
            if x is not y:
                break
        return True

    def __hash__(self) -> int:
        return hash(self.types)


def _most_specific(
    type_p: type, type_q: type, keys: Iterable[tuple[type, type]]
) -> tuple[Optional[tuple[type, type]], bool]:
    """`(key, ambiguous)`: the registered pair dispatch picks, as torch's `_dispatch_kl` does.

    `ambiguous` is True when the most specific match on `p` first and on `q` first differ (torch
    then warns and uses the former).
    """
    matches = [(sp, sq) for sp, sq in keys if issubclass(type_p, sp) and issubclass(type_q, sq)]
    if not matches:
        return None, False
    left = min(_Match(*m) for m in matches).types
    right_q, right_p = min(_Match(*reversed(m)) for m in matches).types
    return (left[0], left[1]), (left[0], left[1]) != (right_p, right_q)


def lookup_kl(
    type_p: type, type_q: type
) -> tuple[Optional[Callable[..., Tensor]], Optional[RuleInfo]]:
    """The rule `kl_divergence` dispatches to for these types, and distkl's record of it.

    Args:
        type_p: the type of `p` (any class; subclasses match as in torch's dispatch).
        type_q: the type of `q`.

    Returns:
        `(fn, info)`: `fn` is the function torch's live registry dispatches to (None when no rule
        matches); `info` is distkl's `RuleInfo` for the matched pair, or None when the rule is
        torch's own or another library's.

    Example:
        >>> import distkl
        >>> from torch.distributions import Categorical, OneHotCategorical
        >>> fn, info = distkl.registry.lookup_kl(Categorical, OneHotCategorical)
        >>> info.kind
        'exact'
    """
    table = kl_table()
    key, _ = _most_specific(type_p, type_q, list(table))
    if key is None:
        return None, None
    fn = table[key]
    info = _KL_RULES.get(key)
    return fn, (info if info is not None and info.fn is fn else None)


def lookup_jsd(
    type_p: type, type_q: type
) -> tuple[Optional[Callable[..., Tensor]], Optional[RuleInfo]]:
    """The rule `js_divergence` dispatches to for these types, and its `RuleInfo`.

    Returns:
        `(fn, info)`, or `(None, None)` when no JSD rule matches.
    """
    key = _dispatch_jsd(type_p, type_q)
    if key is None:
        return None, None
    info = _JSD_RULES[key]
    return info.fn, info


@functools.cache
def _dispatch_jsd(type_p: type, type_q: type) -> Optional[Pair]:
    """The JSD table's key for the most specific match (memoised; cleared on registration)."""
    key, ambiguous = _most_specific(type_p, type_q, list(_JSD_RULES))
    if key is None:
        return None
    if ambiguous:
        warnings.warn(
            f"Ambiguous js_divergence({type_p.__name__}, {type_q.__name__}); register a rule "
            f"for the pair with register_jsd({type_p.__name__}, {type_q.__name__}).",
            RuntimeWarning,
            stacklevel=4,
        )
    return key


# --------------------------------------------------------------------------------------------
# Scoped registration


@contextlib.contextmanager
def preserved_registries() -> Iterator[None]:
    """Restore torch's KL table and memo and distkl's KL/JSD registries on leaving the block.

    Whatever the block registers (`register_kl`, `register_jsd`, `derive_and_register`, a
    docs example) is gone afterwards, and the tables hold exactly the objects they held before.

    Example:
        >>> from distkl.registry import preserved_registries
        >>> with preserved_registries():
        ...     pass  # register experimental rules here
    """
    tables: list[dict] = [kl_table(), kl_memo(), _KL_RULES, _SKIPPED_KL, _JSD_RULES]
    saved = [dict(t) for t in tables]
    try:
        yield
    finally:
        for table, old in zip(tables, saved):
            table.clear()
            table.update(old)
        _dispatch_jsd.cache_clear()


@contextlib.contextmanager
def registered_kl(
    type_p: type[Distribution],
    type_q: type[Distribution],
    fn: Callable[..., Tensor],
    *,
    kind: Union[str, KindFn] = "exact",
) -> Iterator[Callable[..., Tensor]]:
    """Register `fn` as KL(`type_p` || `type_q`) for the duration of a `with` block.

    As `register_kl` (it refuses a pair someone already registered); on leaving the block,
    torch's table and memo and distkl's registry are exactly as before.

    Example:
        >>> import torch
        >>> from torch.distributions import Normal, kl_divergence
        >>> class MyNormal(Normal): pass
        >>> with registered_kl(MyNormal, MyNormal, lambda p, q: torch.zeros(())):
        ...     kl_divergence(MyNormal(0.0, 1.0), MyNormal(1.0, 1.0)).item()
        0.0
    """
    with preserved_registries():
        yield register_kl(type_p, type_q, kind=kind)(fn)


@contextlib.contextmanager
def registered_jsd(
    type_p: type[Distribution],
    type_q: type[Distribution],
    fn: Callable[..., Tensor],
    *,
    kind: Union[str, KindFn] = "exact",
) -> Iterator[Callable[..., Tensor]]:
    """Register `fn(p, q, skew)` as JSD(`type_p`, `type_q`) for the duration of a `with` block."""
    with preserved_registries():
        yield register_jsd(type_p, type_q, kind=kind)(fn)


# --------------------------------------------------------------------------------------------
# JSD


def register_jsd(
    type_p: type[Distribution],
    type_q: type[Distribution],
    *,
    kind: Union[str, KindFn] = "exact",
) -> Callable[[JSDFn], JSDFn]:
    r"""Register a Jensen-Shannon rule `fn(p, q, skew) -> Tensor` for `js_divergence`.

    The rule receives the skew $\alpha$ as a float and returns
    $\mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1 - \alpha)\,\mathrm{KL}(q \| m)$
    with $m = \alpha p + (1 - \alpha) q$, in nats. Lookup is by the most specific match, as in
    torch's `kl_divergence`; `kind` as in `register_kl`.

    Raises:
        TypeError: if a type is not a Distribution subclass.
        ValueError: if the pair is registered with another function, or `kind` is invalid.
    """
    _check_types(type_p, type_q, "register_jsd")
    _check_kind(kind)

    def decorator(fn: JSDFn) -> JSDFn:
        existing = _JSD_RULES.get((type_p, type_q))
        if existing is not None and not _same_rule(existing.fn, fn):
            raise ValueError(
                f"JSD({type_p.__name__}, {type_q.__name__}) is already registered "
                f"(by {existing.module}.{existing.fn.__qualname__}); refusing to overwrite it."
            )
        _JSD_RULES[type_p, type_q] = _rule_info(type_p, type_q, fn, kind)
        _dispatch_jsd.cache_clear()
        return fn

    return decorator


def js_divergence(p: Distribution, q: Distribution, *, skew: float = 0.5) -> Tensor:
    r"""Jensen-Shannon divergence `JS_alpha(p, q)` in nats.

    $$
    \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m),
    \quad m = \alpha p + (1-\alpha) q
    $$

    `skew=0.5` is the usual JSD, symmetric and bounded by $\log 2$ (reached exactly for
    disjoint supports); in general $0 \le \mathrm{JS}_\alpha \le H(\alpha)$, the binary
    entropy of `alpha`, and `JS_alpha(p, q) = JS_(1-alpha)(q, p)`. (TFP's `jensen_shannon`
    is twice this quantity.)

    Source: Lin (1991), "Divergence measures based on the Shannon entropy", IEEE Trans. Inf.
    Theory 37(1).

    Returns:
        Tensor of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        NotImplementedError: when no rule is registered for `(type(p), type(q))`; the message
            lists the registered pairs.
    """
    alpha = check_skew(skew)
    fn, _ = lookup_jsd(type(p), type(q))
    if fn is None:
        registered = ", ".join(r.name for r in jsd_rules()) or "none"
        raise NotImplementedError(
            f"No JSD(p, q) is registered for p type {type(p).__name__} and q type "
            f"{type(q).__name__}; registered pairs: {registered}."
        )
    return fn(p, q, alpha)
