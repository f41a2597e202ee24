"""Derive a user's pair with sympy, check it against sampling, register it with torch."""

from __future__ import annotations

from typing import Optional

import torch
from torch.distributions import Distribution

from distkl._torch_compat import kl_table
from distkl.registry import register_kl
from distkl.symbolic.derive import DEFAULT_TIMEOUT, Derivation, derive
from distkl.symbolic.families import Family
from distkl.verify import check_values

__all__ = ["derive_and_register"]


def derive_and_register(
    p: Family,
    q: Family,
    *,
    example: tuple[Distribution, Distribution],
    num_samples: int = 100_000,
    generator: Optional[torch.Generator] = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Derivation:
    r"""Derive `KL(p || q)` for a user's pair, check it against sampling, register it.

    The closed form is derived by sympy ([`derive`][distkl.symbolic.derive.derive]), compiled to
    torch, compared on `example` with an independent Monte Carlo estimate
    ([`distkl.verify.check_kl`][distkl.check_kl]'s test, $|z| \le z^*$ with a false-failure rate of
    `1e-3` over the example's batch), and registered with
    [`distkl.registry.register_kl`][distkl.register_kl] as an `"exact"` rule, which refuses a pair
    torch already has.

    Args:
        p: the family of the first argument; its class is registered as `type_p`.
        q: the family of the second argument; its class is registered as `type_q`.
        example: an instance `(p, q)` of the pair to check the formula on (float64 advised).
        num_samples: Monte Carlo samples for the check.
        generator: makes the check reproducible.
        timeout: seconds sympy may take.

    Returns:
        The [`Derivation`][distkl.symbolic.Derivation]; `kl_divergence` now uses it for the pair.

    Raises:
        ValueError: if the pair is already registered, or the formula disagrees with sampling.
        DerivationTimeout, DerivationError: as [`derive`][distkl.symbolic.derive.derive].
    """
    for t in (p.cls, q.cls):
        if not (isinstance(t, type) and issubclass(t, Distribution)):
            raise TypeError(f"Family.cls must be a Distribution subclass, got {t!r}.")
    existing = kl_table().get((p.cls, q.cls))
    if existing is not None:
        raise ValueError(
            f"KL({p.name} || {q.name}) is already registered with torch (by "
            f"{existing.__module__}.{existing.__qualname__}); distkl does not overwrite it."
        )
    derivation = derive(p, q, timeout=timeout, cache=False)
    ep, eq = example
    value = derivation(ep, eq)
    result = check_values(
        ep, eq, value, num_samples=num_samples, generator=generator, pair=derivation.name
    )
    if not result.passed:
        raise ValueError(
            f"The derived KL({derivation.name}) disagrees with sampling on the example; not "
            f"registered.\n{result}"
        )
    register_kl(p.cls, q.cls, kind="exact")(derivation.as_rule())
    return derivation
