"""`distkl.options`: how the registered estimate rules (mixtures, continuous JSD) compute.

`options(...)` sets the options when it is called and, used as a context manager, restores the
previous ones on exit:

```python
distkl.options(method="mc", num_samples=8192)        # set from here on
with distkl.options(method="quadrature"):             # only inside the block
    kl_divergence(p, q)
```

The settings live in a `contextvars.ContextVar`, like `torch.set_grad_enabled` keeps its
flag per thread: each thread (and asyncio task) sees its own settings, so concurrent `with`
blocks in different threads never interfere. A new thread starts from distkl's defaults.
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Optional

import torch

from distkl._checks import check_choice, check_positive_int

__all__ = ["Options", "options", "get_options", "METHODS", "SAMPLE_BUDGET", "samples_per_pair"]

METHODS = ("auto", "mc", "quadrature", "variational", "unscented")
#: Monte Carlo samples per call when `num_samples` is not set, shared by the pairs of the batch.
SAMPLE_BUDGET = 4096


@dataclass(frozen=True)
class Options:
    """The settings in force.

    Attributes:
        method: how rules without a closed form compute. `"auto"` (default): `"quadrature"`
            when the event is 1-D (event shape `()`) and every component family supports it,
            `"mc"` otherwise. `"mc"`: stratified Monte Carlo (unbiased, differentiable, noisy).
            `"quadrature"`: deterministic composite Gauss-Legendre quadrature over the
            components' breakpoints, 1-D events only.
            `"variational"`: Hershey & Olsen (2007) variational approximation (deterministic,
            biased). `"unscented"`: unscented transform, 2D+1 sigma points per component
            (deterministic, biased).
        num_samples: Monte Carlo samples per pair (per batch element). Default `None`: a budget
            of `SAMPLE_BUDGET` (4096) samples per call shared by the batch, at least one per
            pair (see `samples_per_pair`): one pair alone gets 4096 samples, a training
            batch of 128 gets 32 each, so a default call inside a training loop stays cheap.
        generator: a `torch.Generator` making Monte Carlo reproducible (default: torch's
            global generator).
        chunk_size: samples drawn and reduced at a time (default: chosen from a memory budget).
        quadrature_nodes: quadrature nodes per mixture component (default 128).
    """

    method: str = "auto"
    num_samples: Optional[int] = None
    generator: Optional[torch.Generator] = None
    chunk_size: Optional[int] = None
    quadrature_nodes: int = 128

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        if self.num_samples is not None:
            check_positive_int("num_samples", self.num_samples)
        check_positive_int("quadrature_nodes", self.quadrature_nodes)
        if self.chunk_size is not None:
            check_positive_int("chunk_size", self.chunk_size)
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(self.generator).__name__}."
            )


def samples_per_pair(num_samples: Optional[int], num_pairs: int) -> int:
    """Samples per pair: `num_samples` if set, else the per-call budget shared by the batch.

    Args:
        num_samples: the explicit count per pair, or `None` for the default budget.
        num_pairs: pairs in the call (the broadcast batch's number of elements).

    Returns:
        `num_samples`, or `max(1, ceil(SAMPLE_BUDGET / num_pairs))`.
    """
    if num_samples is not None:
        return num_samples
    return max(1, -(-SAMPLE_BUDGET // max(1, num_pairs)))


class _OptionsVar:
    """The options' ContextVar, mirrored in a plain attribute for `torch.compile`.

    Dynamo cannot trace `ContextVar.get`; it can read `mirror` and guards on it, so a compiled
    function recompiles when the options change. The mirror holds the options last set in any
    thread: compiled code in several threads with different options sees the latest ones.
    """

    def __init__(self) -> None:
        self._var: contextvars.ContextVar[Options] = contextvars.ContextVar(
            "distkl_options",
            default=Options(),  # noqa: B039 (a frozen dataclass: immutable)
        )
        self.mirror = Options()

    def get(self) -> Options:
        return self._var.get()

    def set(self, value: Options) -> contextvars.Token[Options]:
        self.mirror = value
        return self._var.set(value)

    def reset(self, token: contextvars.Token[Options]) -> None:
        self._var.reset(token)
        self.mirror = self._var.get()


_CURRENT = _OptionsVar()


def get_options() -> Options:
    """The options in force in this thread (under `torch.compile`: the ones last set)."""
    if torch.compiler.is_compiling():
        return _CURRENT.mirror
    return _CURRENT.get()


class _Unset(enum.Enum):
    """The default of every `options` keyword: leave that option as it is."""

    UNSET = "UNSET"


_UNSET = _Unset.UNSET


class _Entry:
    """One active `with options(...)` block: the options before it and the changes it made."""

    __slots__ = ("previous", "changes")

    def __init__(self, previous: Options, changes: dict[str, Any]) -> None:
        self.previous = previous
        self.changes = changes


#: The `with` blocks active in this context, outermost first.
_ACTIVE: contextvars.ContextVar[tuple[_Entry, ...]] = contextvars.ContextVar(
    "distkl_options_active", default=()
)


class options:
    """Set distkl's options now; as a context manager, restore the previous ones on exit.

    Every keyword is optional; one that is not given keeps its current value (see `Options`
    for the defaults and meanings).

    Args:
        method: `"auto"`, `"mc"`, `"quadrature"`, `"variational"` or `"unscented"`.
        num_samples: Monte Carlo samples per pair, or None for a budget of 4096 per call shared
            by the batch.
        generator: `torch.Generator` for reproducible Monte Carlo, or None for torch's global one.
        chunk_size: samples drawn and reduced at a time, or None to choose from a memory budget.
        quadrature_nodes: quadrature nodes per component.

    Raises:
        TypeError: an unknown option name, or a `generator` that is not a `torch.Generator`.
        ValueError: an invalid value, naming the option.

    A context object applies its settings on every `__enter__` (so one object can serve
    several `with` blocks) and undoes them on `__exit__`; its first block restores what was
    in force before the call that created it. Blocks exited out of order leave the blocks still
    open in force, on top of the options from before the one that exited.

    Example:
        ```python
        g = torch.Generator().manual_seed(0)
        with distkl.options(method="mc", num_samples=8192, generator=g):
            kl = kl_divergence(mixture_p, mixture_q)
        distkl.options(method="quadrature")  # from here on
        ```
    """

    def __init__(
        self,
        *,
        method: str | _Unset = _UNSET,
        num_samples: Optional[int] | _Unset = _UNSET,
        generator: Optional[torch.Generator] | _Unset = _UNSET,
        chunk_size: Optional[int] | _Unset = _UNSET,
        quadrature_nodes: int | _Unset = _UNSET,
    ) -> None:
        given = {
            "method": method,
            "num_samples": num_samples,
            "generator": generator,
            "chunk_size": chunk_size,
            "quadrature_nodes": quadrature_nodes,
        }
        self._changes: dict[str, Any] = {k: v for k, v in given.items() if v is not _UNSET}
        previous = _CURRENT.get()
        self.current = dataclasses.replace(previous, **self._changes)  # validates
        _CURRENT.set(self.current)
        self._pending_previous: Optional[Options] = previous
        self._entries: list[_Entry] = []

    def __enter__(self) -> Options:
        now = _CURRENT.get()
        # The first block of an object began when the call applied it: it restores what was in
        # force before that call. Later blocks begin at their ``__enter__``.
        previous = now if self._pending_previous is None else self._pending_previous
        self._pending_previous = None
        if now is not self.current:  # (right after the call `now` already is the result)
            self.current = dataclasses.replace(now, **self._changes)
        _CURRENT.set(self.current)
        entry = _Entry(previous, self._changes)
        self._entries.append(entry)
        _ACTIVE.set((*_ACTIVE.get(), entry))
        return self.current

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if not self._entries:
            raise RuntimeError("distkl.options: __exit__ without a matching __enter__.")
        entry = self._entries.pop()
        active = _ACTIVE.get()
        index = next((i for i, e in enumerate(active) if e is entry), None)
        if index is None:  # entered in another context (thread or task): restore by value
            _CURRENT.set(entry.previous)
            return
        # Blocks opened after this one and still open stay in force, replayed on top of what
        # was in force before this one.
        value = entry.previous
        for later in active[index + 1 :]:
            later.previous = value
            value = dataclasses.replace(value, **later.changes)
        _ACTIVE.set(active[:index] + active[index + 1 :])
        _CURRENT.set(value)

    def __repr__(self) -> str:
        return f"distkl.options({self.current})"
