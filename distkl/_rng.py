"""One way to sample from a user's `torch.Generator` with torch's own samplers.

`Distribution.sample`/`rsample` take no generator: they draw from the global generator of the
device their tensors live on. `rng_scope` runs a block under that rule, or, given a generator,
seeds a *forked* copy of exactly the global generator the block will use (the CPU one, and the one
CUDA device's when `device` is CUDA) from one draw of the user's generator, and restores it after.
No other device's generator is touched, so a CPU-seeded call never moves a GPU training run's
random stream. Without a generator it does nothing, which keeps the block traceable by
`torch.compile(fullgraph=True)`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch

__all__ = ["rng_scope", "seed_from"]


def seed_from(generator: torch.Generator) -> int:
    """One 62-bit seed drawn from `generator` (advances it by one draw)."""
    return int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))


@contextlib.contextmanager
def rng_scope(generator: Optional[torch.Generator], device: torch.device) -> Iterator[None]:
    """Run the block drawing from `generator` if given, else from the global generator.

    Args:
        generator: the user's generator, or `None` for torch's global generator of `device`.
        device: where the block's tensors live; its global generator is the one forked.
    """
    if generator is None:
        yield
        return
    seed = seed_from(generator)
    cuda = device.type == "cuda"
    index = 0
    if cuda:
        index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield
