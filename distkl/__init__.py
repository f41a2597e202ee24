"""distkl: the divergences torch.distributions lacks.

`import distkl` registers KL rules with `torch.distributions.kl.register_kl` for pairs
torch refuses today (it never overwrites one torch has), and adds a Jensen-Shannon registry,
Monte Carlo estimators with standard errors, deterministic methods and bounds for mixtures, and a
verifier that checks every analytic rule against sampling. `distkl.symbolic` (sympy) is
imported only when used.

Names. Every function takes `(p, q)` in torch's order and computes the divergence of `p`
from `q`. The divergence itself is named like torch's `kl_divergence`: `js_divergence`
(and `js_distance`, its square root, as `scipy.spatial.distance.jensenshannon`); the ways
to compute one are named by divergence and method, `kl_*` and `jsd_*` alike (`kl_mc` /
`jsd_mc`, `kl_quadrature` / `jsd_quadrature`, `kl_rules` / `jsd_rules`, `register_kl` /
`register_jsd`). `kl_bounds` returns guaranteed bounds (`KLBounds`); `bounded_kl` is a KL
squashed into `[0, bound)` for use as a loss. `distkl.functional` holds the same maths on raw
logits/probabilities, with keyword-only `p_*`/`q_*` arguments. Helpers for one use live in
their modules: `distkl.latent` (`kl_free_bits(posterior=, prior=)`, `kl_annealing`),
`distkl.montecarlo` (`expectation`), `distkl.verify` (`check_jsd`).
"""

import importlib
import warnings
from typing import Any

import distkl.latent  # noqa: F401  (kl_free_bits, kl_annealing)
from distkl import functional
from distkl._options import Options, get_options, options
from distkl.approx import kl_unscented, kl_variational
from distkl.bounded import bounded_kl, js_distance, js_divergence_normalized
from distkl.bounds import KLBounds, kl_bounds
from distkl.density import mixture_log_prob
from distkl.losses import JSDLoss, KLLoss
from distkl.montecarlo import Estimate, jsd_mc, kl_mc
from distkl.quadrature import jsd_quadrature, kl_quadrature
from distkl.registry import (
    RuleInfo,
    js_divergence,
    jsd_rules,
    kl_rules,
    register_jsd,
    register_kl,
)
from distkl.rules import categorical as _rules_categorical  # noqa: F401  (registers the rules)
from distkl.rules import mixture as _rules_mixture  # noqa: F401  (registers the rules)
from distkl.rules import normal as _rules_normal  # noqa: F401  (registers the rules)
from distkl.verify import check_kl

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "JSDLoss",
    "KLBounds",
    "KLLoss",
    "Options",
    "RuleInfo",
    "bounded_kl",
    "check_kl",
    "functional",
    "get_options",
    "js_distance",
    "js_divergence",
    "js_divergence_normalized",
    "jsd_mc",
    "jsd_quadrature",
    "jsd_rules",
    "kl_bounds",
    "kl_mc",
    "kl_quadrature",
    "kl_rules",
    "kl_unscented",
    "kl_variational",
    "mixture_log_prob",
    "options",
    "register_jsd",
    "register_kl",
]

#: Top-level names of distkl 0.1 that moved to their modules; still found here, with a warning.
_MOVED = {
    "check_jsd": "distkl.verify",
    "expectation": "distkl.montecarlo",
    "kl_annealing": "distkl.latent",
    "kl_free_bits": "distkl.latent",
}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        module = _MOVED[name]
        warnings.warn(
            f"distkl.{name} moved to {module}.{name}; the top-level name will be removed.",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(module), name)
    raise AttributeError(f"module 'distkl' has no attribute {name!r}")
