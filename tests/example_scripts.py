"""Shared support for the tests that run the scripts in examples/ (VAE, Bayes by backprop)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
#: One-sided normal tail 3e-5: a false failure per ~30,000 runs if the ELBO did not move.
Z_GAIN = 4.0


def load_example(stem: str) -> ModuleType:
    """Import `examples/<stem>.py` once, as module `distkl_examples_<stem>`."""
    name = f"distkl_examples_{stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{stem}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def step_noise(xs: list[float]) -> float:
    """Per-step noise of a trending series, from successive differences (von Neumann, 1941).

    ``sigma^2 = mean((x[t+1] - x[t])^2) / 2``: unaffected by a slow trend, unlike the variance
    of a window taken while the ELBO is still climbing.
    """
    diffs = [(b - a) ** 2 for a, b in zip(xs, xs[1:])]
    return math.sqrt(sum(diffs) / len(diffs) / 2)
