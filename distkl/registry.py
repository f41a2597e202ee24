r"""Registries: a safe wrapper around torch's ``register_kl`` and distkl's own JSD registry.

torch's :func:`torch.distributions.kl.register_kl` silently overwrites an existing entry. distkl
never changes what torch already answers, so every distkl rule goes through :func:`register_kl`
here, which refuses a pair that torch (or anyone) has registered already, and records what kind of
rule it is (``"exact"`` closed form, or ``"estimate"`` computed by the method in force) for
``distkl list``.

The JSD registry mirrors torch's KL dispatch: the most specific ``(P, Q)`` match by subclass, a
``RuntimeWarning`` on ambiguity, a memoised lookup, refusal to overwrite, and a
``NotImplementedError`` that lists what is registered.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Callable, TypeVar

from torch import Tensor
from torch.distributions import Distribution
from torch.distributions import kl as _torch_kl

from distkl._checks import check_skew
from distkl._torch_compat import kl_table

__all__ = [
    "RuleInfo",
    "register_kl",
    "register_jsd",
    "js_divergence",
    "kl_rules",
    "jsd_rules",
    "skipped_kl_rules",
]

Pair = tuple[type[Distribution], type[Distribution]]
KLFn = TypeVar("KLFn", bound=Callable[..., Tensor])
JSDFn = TypeVar("JSDFn", bound=Callable[..., Tensor])

KINDS = ("exact", "estimate")


@dataclass(frozen=True)
class RuleInfo:
    """What distkl knows about one registered rule."""

    type_p: type
    type_q: type
    fn: Callable[..., Tensor]
    kind: str  # "exact" or "estimate"

    @property
    def module(self) -> str:
        return self.fn.__module__

    @property
    def name(self) -> str:
        return f"{self.type_p.__name__}-{self.type_q.__name__}"


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


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")


def _same_rule(existing: Callable[..., Tensor], fn: Callable[..., Tensor]) -> bool:
    """True for the same function, or its new copy after ``importlib.reload`` of its module."""
    return existing is fn or (
        existing.__module__ == fn.__module__ and existing.__qualname__ == fn.__qualname__
    )


def register_kl(
    type_p: type[Distribution],
    type_q: type[Distribution],
    *,
    kind: str = "exact",
    on_conflict: str = "raise",
) -> Callable[[KLFn], KLFn]:
    """Register a rule with torch's :func:`~torch.distributions.kl.kl_divergence`; never overwrite.

    Args:
        type_p: a :class:`~torch.distributions.Distribution` subclass.
        type_q: a :class:`~torch.distributions.Distribution` subclass.
        kind: ``"exact"`` for a closed form, ``"estimate"`` for a rule that computes by the
            method in force (:func:`distkl.options`).
        on_conflict: what to do when another library already registered ``(type_p, type_q)``:
            ``"raise"`` (default) raises ``ValueError``; ``"skip"`` leaves the existing rule in
            place and records the pair in :func:`skipped_kl_rules`. distkl's own rules use
            ``"skip"``, so ``import distkl`` after, e.g., Pyro (which registers
            ``(Independent, MultivariateNormal)``) keeps Pyro's answer and does not fail.

    Raises:
        TypeError: if a type is not a Distribution subclass.
        ValueError: if ``(type_p, type_q)`` is already in torch's KL registry and
            ``on_conflict="raise"``, or ``on_conflict`` is invalid.
    """
    _check_types(type_p, type_q, "register_kl")
    _check_kind(kind)
    if on_conflict not in ("raise", "skip"):
        raise ValueError(f"on_conflict must be 'raise' or 'skip', got {on_conflict!r}.")

    def decorator(fn: KLFn) -> KLFn:
        existing = kl_table().get((type_p, type_q))
        if existing is not None and not _same_rule(existing, fn):
            if on_conflict == "skip":
                _SKIPPED_KL[type_p, type_q] = RuleInfo(type_p, type_q, existing, "external")
                return fn
            raise ValueError(
                f"KL({type_p.__name__} || {type_q.__name__}) is already registered with torch "
                f"(by {existing.__module__}.{existing.__qualname__}); distkl does not overwrite it."
            )
        _torch_kl.register_kl(type_p, type_q)(fn)
        _KL_RULES[type_p, type_q] = RuleInfo(type_p, type_q, fn, kind)
        return fn

    return decorator


def kl_rules() -> list[RuleInfo]:
    """Every KL rule distkl registered, sorted by pair name."""
    return sorted(_KL_RULES.values(), key=lambda r: r.name)


def skipped_kl_rules() -> list[RuleInfo]:
    """Pairs distkl has a rule for but left to a rule registered earlier by another library.

    Each :class:`RuleInfo` holds the *existing* function (e.g. Pyro's) with kind ``"external"``.
    """
    return sorted(_SKIPPED_KL.values(), key=lambda r: r.name)


def jsd_rules() -> list[RuleInfo]:
    """Every JSD rule in distkl's registry, sorted by pair name."""
    return sorted(_JSD_RULES.values(), key=lambda r: r.name)


# --------------------------------------------------------------------------------------------
# JSD registry: torch's KL dispatch semantics, on a table of its own.


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


def register_jsd(
    type_p: type[Distribution], type_q: type[Distribution], *, kind: str = "exact"
) -> Callable[[JSDFn], JSDFn]:
    """Register a Jensen-Shannon rule ``fn(p, q, skew) -> Tensor`` for :func:`js_divergence`.

    The rule receives the skew ``alpha`` as a float and returns
    ``JS_alpha(p, q) = alpha KL(p || m) + (1 - alpha) KL(q || m)`` with
    ``m = alpha p + (1 - alpha) q``, in nats. Lookup is by the most specific match, as in torch's
    ``kl_divergence``. Registering a pair twice raises ``ValueError``.
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
        _JSD_RULES[type_p, type_q] = RuleInfo(type_p, type_q, fn, kind)
        _dispatch_jsd.cache_clear()
        return fn

    return decorator


@functools.cache
def _dispatch_jsd(type_p: type, type_q: type) -> Callable[..., Tensor] | None:
    matches = [
        (sp, sq) for sp, sq in _JSD_RULES if issubclass(type_p, sp) and issubclass(type_q, sq)
    ]
    if not matches:
        return None
    left_p, left_q = min(_Match(*m) for m in matches).types
    right_q, right_p = min(_Match(*reversed(m)) for m in matches).types
    left_fn = _JSD_RULES[left_p, left_q].fn
    right_fn = _JSD_RULES[right_p, right_q].fn
    if left_fn is not right_fn:
        warnings.warn(
            f"Ambiguous js_divergence({type_p.__name__}, {type_q.__name__}). "
            f"Please register_jsd({left_p.__name__}, {right_q.__name__})",
            RuntimeWarning,
            stacklevel=3,
        )
    return left_fn


def js_divergence(p: Distribution, q: Distribution, *, skew: float = 0.5) -> Tensor:
    r"""Jensen-Shannon divergence ``JS_alpha(p, q)`` in nats.

    .. math::
        \mathrm{JS}_\alpha(p, q) = \alpha\,\mathrm{KL}(p \| m) + (1-\alpha)\,\mathrm{KL}(q \| m),
        \quad m = \alpha p + (1-\alpha) q

    ``skew=0.5`` is the usual JSD, symmetric and bounded by :math:`\log 2` (reached exactly for
    disjoint supports); in general :math:`0 \le \mathrm{JS}_\alpha \le H(\alpha)`, the binary
    entropy of ``alpha``, and ``JS_alpha(p, q) = JS_(1-alpha)(q, p)``. (TFP's ``jensen_shannon``
    is twice this quantity.)

    Source: Lin (1991), "Divergence measures based on the Shannon entropy", IEEE Trans. Inf.
    Theory 37(1).

    Returns:
        Tensor of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.

    Raises:
        NotImplementedError: when no rule is registered for ``(type(p), type(q))``; the message
            lists the registered pairs.
    """
    alpha = check_skew(skew)
    fn = _dispatch_jsd(type(p), type(q))  # type: ignore[arg-type]
    if fn is None:
        registered = ", ".join(r.name for r in jsd_rules()) or "none"
        raise NotImplementedError(
            f"No JSD(p, q) is registered for p type {type(p).__name__} and q type "
            f"{type(q).__name__}; registered pairs: {registered}."
        )
    return fn(p, q, alpha)


def rules_markdown() -> str:
    """The registered KL and JSD rules as a markdown table (used by the docs and README)."""
    rows = ["| divergence | p | q | kind | module |", "|---|---|---|---|---|"]
    for label, rules in (("KL", kl_rules()), ("JSD", jsd_rules())):
        for r in rules:
            kind = "exact" if r.kind == "exact" else "estimate (method in force)"
            p, q = r.type_p.__name__, r.type_q.__name__
            rows.append(f"| {label} | `{p}` | `{q}` | {kind} | `{r.module}` |")
    return "\n".join(rows)
