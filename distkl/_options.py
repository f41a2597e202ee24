"""``distkl.options``: how the registered estimate rules (mixtures, continuous JSD) compute.

``options(...)`` sets the options when it is called and, used as a context manager, restores the
previous ones on exit::

    distkl.options(method="mc", num_samples=8192)        # set from here on
    with distkl.options(method="quadrature"):             # only inside the block
        kl_divergence(p, q)

The settings live in a :class:`contextvars.ContextVar`, like ``torch.set_grad_enabled`` keeps its
flag per thread: each thread (and asyncio task) sees its own settings, so concurrent ``with``
blocks in different threads never interfere. A new thread starts from distkl's defaults.
"""

from __future__ import annotations

import contextvars
import dataclasses
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Optional

import torch

from distkl._checks import check_positive_int

__all__ = ["Options", "options", "get_options", "METHODS", "SAMPLE_BUDGET", "samples_per_pair"]

METHODS = ("auto", "mc", "quadrature", "variational", "unscented")
#: Monte Carlo samples per call when ``num_samples`` is not set, shared by the pairs of the batch.
SAMPLE_BUDGET = 4096


@dataclass(frozen=True)
class Options:
    """The settings in force.

    Attributes:
        method: how rules without a closed form compute. ``"auto"`` (default): ``"quadrature"``
            when the event is 1-D (event shape ``()``) and every component family supports it,
            ``"mc"`` otherwise. ``"mc"``: stratified Monte Carlo (unbiased, differentiable, noisy).
            ``"quadrature"``: deterministic composite Gauss-Legendre quadrature over the
            components' breakpoints, 1-D events only.
            ``"variational"``: Hershey & Olsen (2007) variational approximation (deterministic,
            biased). ``"unscented"``: unscented transform, 2D+1 sigma points per component
            (deterministic, biased).
        num_samples: Monte Carlo samples per pair (per batch element). Default ``None``: a budget
            of ``SAMPLE_BUDGET`` (4096) samples per call shared by the batch, at least one per
            pair (see :func:`samples_per_pair`): one pair alone gets 4096 samples, a training
            batch of 128 gets 32 each, so a default call inside a training loop stays cheap.
        generator: a :class:`torch.Generator` making Monte Carlo reproducible (default: torch's
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
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}.")
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
    """Samples per pair: ``num_samples`` if set, else the per-call budget shared by the batch.

    Args:
        num_samples: the explicit count per pair, or ``None`` for the default budget.
        num_pairs: pairs in the call (the broadcast batch's number of elements).

    Returns:
        ``num_samples``, or ``max(1, ceil(SAMPLE_BUDGET / num_pairs))``.
    """
    if num_samples is not None:
        return num_samples
    return max(1, -(-SAMPLE_BUDGET // max(1, num_pairs)))


_FIELDS = tuple(f.name for f in dataclasses.fields(Options))


class _OptionsVar:
    """The options' ContextVar, mirrored in a plain attribute for ``torch.compile``.

    Dynamo cannot trace ``ContextVar.get``; it can read ``mirror`` and guards on it, so a compiled
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
    """The options in force in this thread (under ``torch.compile``: the ones last set)."""
    if torch.compiler.is_compiling():
        return _CURRENT.mirror
    return _CURRENT.get()


class options:
    """Set distkl's options now; as a context manager, restore the previous ones on exit.

    Keyword arguments (each optional; see :class:`Options` for the defaults):

        method: ``"auto"``, ``"mc"``, ``"quadrature"``, ``"variational"`` or ``"unscented"``.
        num_samples: Monte Carlo samples per pair (default: 4096 per call, shared by the batch).
        generator: :class:`torch.Generator` for reproducible Monte Carlo.
        chunk_size: samples drawn and reduced at a time.
        quadrature_nodes: quadrature nodes per component.

    Raises:
        TypeError: for an unknown option name.
        ValueError: for an invalid value.

    Example::

        g = torch.Generator().manual_seed(0)
        with distkl.options(method="mc", num_samples=8192, generator=g):
            kl = kl_divergence(mixture_p, mixture_q)
    """

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(_FIELDS))
        if unknown:
            raise TypeError(
                f"Unknown distkl option(s) {unknown}; valid options are {list(_FIELDS)}."
            )
        self.previous = _CURRENT.get()
        self.current = dataclasses.replace(self.previous, **kwargs)
        self._token = _CURRENT.set(self.current)

    def __enter__(self) -> Options:
        return self.current

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        try:
            _CURRENT.reset(self._token)
        except ValueError:  # token made in another context: restore by value instead
            _CURRENT.set(self.previous)

    def __repr__(self) -> str:
        return f"distkl.options({self.current})"
