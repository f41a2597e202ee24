"""distkl: the divergences torch.distributions lacks.

``import distkl`` registers KL rules with :func:`torch.distributions.kl.register_kl` for pairs
torch refuses today (it never overwrites one torch has), and adds a Jensen-Shannon registry,
Monte Carlo estimators with standard errors, deterministic methods and bounds for mixtures, and a
verifier that checks every analytic rule against sampling.
"""

from distkl import functional
from distkl._options import Options, get_options, options
from distkl.rules import categorical as _categorical  # noqa: F401  (registers the rules)
from distkl.rules import normal as _normal  # noqa: F401  (registers the rules)
from distkl.registry import js_divergence, jsd_rules, kl_rules, register_jsd, register_kl

__version__ = "0.1.0"

__all__ = [
    "functional",
    "Options",
    "get_options",
    "options",
    "js_divergence",
    "jsd_rules",
    "kl_rules",
    "register_jsd",
    "register_kl",
]
