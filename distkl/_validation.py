"""Shared input checks with messages that name what was expected and what was received."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributions import Distribution

__all__ = ["check_same_event_shape", "check_same_num_categories", "unsupported", "batch_shape_of"]


def check_same_event_shape(p: Distribution, q: Distribution) -> None:
    """Raise ``ValueError`` unless ``p`` and ``q`` have the same event shape."""
    if p.event_shape != q.event_shape:
        raise ValueError(
            f"p and q must have the same event shape, got {tuple(p.event_shape)} for "
            f"{type(p).__name__} and {tuple(q.event_shape)} for {type(q).__name__}."
        )


def check_same_num_categories(kp: int, kq: int) -> None:
    """Raise ``ValueError`` unless two categoricals have the same number of categories."""
    if kp != kq:
        raise ValueError(f"p and q must have the same number of categories, got {kp} and {kq}.")


def unsupported(what: str, got: Distribution, supported: Iterable[str]) -> NotImplementedError:
    """A ``NotImplementedError`` naming the unsupported family and listing the supported ones."""
    return NotImplementedError(
        f"distkl has no rule for {what} of type {describe(got)}; supported: {', '.join(supported)}."
    )


def describe(d: Distribution) -> str:
    """``Independent(Normal, 1)``-style name of a distribution's family."""
    from torch.distributions import Independent, MixtureSameFamily

    if isinstance(d, Independent):
        return f"Independent({describe(d.base_dist)}, {d.reinterpreted_batch_ndims})"
    if isinstance(d, MixtureSameFamily):
        return f"MixtureSameFamily({describe(d.component_distribution)})"
    return type(d).__name__


def batch_shape_of(p: Distribution, q: Distribution) -> torch.Size:
    """``torch.broadcast_shapes(p.batch_shape, q.batch_shape)`` with a clear error."""
    try:
        return torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    except RuntimeError:
        raise ValueError(
            f"p and q batch shapes must broadcast, got {tuple(p.batch_shape)} and "
            f"{tuple(q.batch_shape)}."
        ) from None
