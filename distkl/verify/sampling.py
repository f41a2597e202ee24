r"""Naive Monte Carlo for the verifier: samples of $\log p(x) - \log q(x)$, in float64.

Sampling uses torch's own samplers from the global generator of the pair's device, forked and
seeded (`distkl._rng.rng_scope`), so a check never moves the caller's random stream.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from distkl._rng import rng_scope, seed_from
from distkl._stats import StreamingMoments

__all__ = [
    "device_of",
    "log_ratio_chunks",
    "naive_jsd",
    "naive_kl",
    "sampling_scope",
    "sampling_seed",
]

_CHUNK = 16_384


def sampling_seed(generator: Optional[torch.Generator]) -> int:
    """The seed of a check's sampling: one draw of `generator` (of the global one if None)."""
    if generator is None:
        return int(torch.randint(0, 2**62, ()))
    return seed_from(generator)


def sampling_scope(seed: int, device: torch.device) -> AbstractContextManager[None]:
    """Sample from torch's global generator of `device`, forked and seeded from `seed`."""
    return rng_scope(torch.Generator().manual_seed(seed), device)


def _chunks(n: int, size: int = _CHUNK) -> Iterator[int]:
    while n > 0:
        m = min(size, n)
        yield m
        n -= m


def _float_dtype(d: Distribution) -> torch.dtype:
    for v in vars(d).values():
        if isinstance(v, Tensor) and v.dtype.is_floating_point:
            return v.dtype
        if isinstance(v, Distribution):
            return _float_dtype(v)
    return torch.get_default_dtype()


def device_of(d: Distribution) -> torch.device:
    """The device of the first tensor among a distribution's attributes (cpu if none)."""
    for v in vars(d).values():
        if isinstance(v, Tensor):
            return v.device
        if isinstance(v, Distribution):
            return device_of(v)
    return torch.device("cpu")


def _encode_for(x: Tensor, src: Distribution, dst: Distribution) -> Tensor:
    """Samples of `src` in the encoding `dst.log_prob` reads (category index <-> one-hot)."""
    if src.event_shape == dst.event_shape:
        return x
    if dst.support is constraints.one_hot and src.event_shape == ():
        return F.one_hot(x.long(), dst.event_shape[-1]).to(_float_dtype(dst))
    if src.support is constraints.one_hot and dst.event_shape == ():
        return x.argmax(-1)
    raise ValueError(
        f"cannot evaluate {type(dst).__name__}.log_prob on samples of {type(src).__name__}: event "
        f"shapes {tuple(src.event_shape)} and {tuple(dst.event_shape)} differ."
    )


def _expanded(d: Distribution, batch: torch.Size) -> Distribution:
    """`d` expanded to `batch`, so every batch element gets samples of its own."""
    if d.batch_shape == batch:
        return d
    try:
        return d.expand(batch)
    except NotImplementedError:  # a user class without expand: rely on broadcasting
        return d


def _log_densities(
    src: Distribution, p: Distribution, q: Distribution, m: int
) -> tuple[Tensor, Tensor]:
    """`(log p(x), log q(x))` for `m` draws `x ~ src` (`p` or `q`, expanded)."""
    x = src.sample((m,))
    return p.log_prob(_encode_for(x, src, p)), q.log_prob(_encode_for(x, src, q))


def log_ratio_chunks(p: Distribution, q: Distribution, n: int, seed: int) -> Iterator[Tensor]:
    """`log p(x) - log q(x)` for `n` draws `x ~ p` (p expanded to the pair's batch), in chunks.

    The draws `check_kl` makes for the sampling seed `seed` (see `sampling_seed`).
    """
    p = _expanded(p, torch.broadcast_shapes(p.batch_shape, q.batch_shape))
    with sampling_scope(seed, device_of(p)), torch.no_grad():
        for m in _chunks(n):
            lp, lq = _log_densities(p, p, q, m)
            yield lp - lq


def naive_kl(p: Distribution, q: Distribution, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """`(mean, stderr)` of `log p(x) - log q(x)`, `x ~ p`, accumulated in float64 (CPU)."""
    acc = StreamingMoments()
    for values in log_ratio_chunks(p, q, n, seed):
        acc.add(values)
    mean, se = acc.result()
    return mean.cpu(), se.cpu()


def naive_jsd(
    p: Distribution, q: Distribution, alpha: float, n: int, seed: int
) -> tuple[Tensor, Tensor]:
    """`(value, stderr)` of the two-sample naive estimate of `JS_alpha(p, q)`."""
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    p, q = _expanded(p, batch), _expanded(q, batch)
    la, lb = math.log(alpha), math.log1p(-alpha)
    value = torch.zeros(batch, dtype=torch.float64)
    var = torch.zeros(batch, dtype=torch.float64)
    for k, (src, w) in enumerate(((p, alpha), (q, 1.0 - alpha))):
        acc = StreamingMoments()
        with sampling_scope(seed + k, device_of(src)), torch.no_grad():
            for m in _chunks(n):
                lp, lq = _log_densities(src, p, q, m)
                lm = torch.logaddexp(lp + la, lq + lb)
                acc.add((lp if k == 0 else lq) - lm)
        mean, se = acc.result()
        value = value + w * mean.cpu()
        var = var + (w * se.cpu()) ** 2
    return value, var.sqrt()
