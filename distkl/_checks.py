"""Argument and pair checks, one message style: what was expected, what was received.

Every public function validates through these helpers, so a bad `num_samples` reads the same
whether it reached `kl_mc`, `options` or the CLI.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent, MixtureSameFamily

__all__ = [
    "batch_shape_of",
    "broadcast_shape",
    "check_choice",
    "check_finite",
    "check_positive_int",
    "check_same_event_shape",
    "check_same_num_categories",
    "check_skew",
    "describe",
    "unsupported",
]

#: The largest sample or node count any entry point accepts: beyond it a tensor could not be
#: allocated anyway, and Python ints that large overflow inside torch with an unrelated message.
MAX_COUNT = 2**40


def check_positive_int(
    name: str, value: object, *, minimum: int = 1, maximum: int = MAX_COUNT
) -> int:
    """Return `value` if it is an int in `[minimum, maximum]`; else raise naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}.")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum}, got {value!r}.")
    return value


def check_finite(name: str, value: object, *, minimum: float, strict: bool = False) -> float:
    """Return `value` as a float if it is a finite real `>= minimum` (`>` if `strict`).

    Raises:
        TypeError: not a real number (bools, strings, tensors and None included), naming `name`.
        ValueError: NaN, infinite or below the minimum, naming `name`.
    """
    wanted = f"a finite number {'>' if strict else '>='} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {wanted}, got {type(value).__name__} {value!r}.")
    v = float(value)
    if not (math.isfinite(v) and (v > minimum if strict else v >= minimum)):
        raise ValueError(f"{name} must be {wanted}, got {value!r}.")
    return v


def check_skew(skew: object, name: str = "skew") -> float:
    """Return `skew` as a float strictly inside (0, 1); else raise naming `name`."""
    if isinstance(skew, Tensor) or isinstance(skew, bool) or not isinstance(skew, (int, float)):
        raise TypeError(
            f"{name} must be a Python float in (0, 1), got {type(skew).__name__} {skew!r}."
        )
    value = float(skew)
    if math.isnan(value) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}.")
    return value


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Return `value` if it is one of `choices`; else raise naming `name` and the choices."""
    allowed = tuple(choices)
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}.")
    return value


def check_same_event_shape(p: Distribution, q: Distribution) -> None:
    """Raise `ValueError` unless `p` and `q` have the same event shape."""
    if p.event_shape != q.event_shape:
        raise ValueError(
            f"p and q must have the same event shape, got {tuple(p.event_shape)} for "
            f"{type(p).__name__} and {tuple(q.event_shape)} for {type(q).__name__}."
        )


def check_same_num_categories(kp: int, kq: int) -> None:
    """Raise `ValueError` unless two categoricals have the same number of categories."""
    if kp != kq:
        raise ValueError(f"p and q must have the same number of categories, got {kp} and {kq}.")


def unsupported(what: str, got: Distribution, supported: Iterable[str]) -> NotImplementedError:
    """A `NotImplementedError` naming the unsupported family and listing the supported ones."""
    return NotImplementedError(
        f"distkl has no rule for {what} of type {describe(got)}; supported: {', '.join(supported)}."
    )


def describe(d: Distribution) -> str:
    """`Independent(Normal, 1)`-style name of a distribution's family."""
    if isinstance(d, Independent):
        return f"Independent({describe(d.base_dist)}, {d.reinterpreted_batch_ndims})"
    if isinstance(d, MixtureSameFamily):
        return f"MixtureSameFamily({describe(d.component_distribution)})"
    return type(d).__name__


def broadcast_shape(*shapes: Sequence[int]) -> torch.Size:
    """`torch.broadcast_shapes(*shapes)` for concrete shapes, in plain Python.

    torch's version goes through its symbolic-shape machinery (about 40 us a call); a training
    step calls this a few times, so the difference is a measurable part of a small step.

    Raises:
        RuntimeError: the shapes do not broadcast (as torch's does).
    """
    ndim = 0
    for shape in shapes:
        ndim = ndim if len(shape) < ndim else len(shape)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, ndim - len(shape)):
            if size != 1 and out[i] != size:
                if out[i] != 1:
                    raise RuntimeError(
                        f"shapes {[tuple(s) for s in shapes]} do not broadcast (dimension {i})."
                    )
                out[i] = size
    return torch.Size(out)


def batch_shape_of(p: Distribution, q: Distribution) -> torch.Size:
    """`torch.broadcast_shapes(p.batch_shape, q.batch_shape)` with a clear error."""
    try:
        return broadcast_shape(p.batch_shape, q.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"p and q batch shapes must broadcast, got {tuple(p.batch_shape)} and "
            f"{tuple(q.batch_shape)}."
        ) from None
