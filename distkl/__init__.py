"""distkl: the divergences torch.distributions lacks.

``import distkl`` registers KL rules with :func:`torch.distributions.kl.register_kl` for pairs
torch refuses today (it never overwrites one torch has), and adds a Jensen-Shannon registry,
Monte Carlo estimators with standard errors, deterministic methods and bounds for mixtures, and a
verifier that checks every analytic rule against sampling. ``distkl.symbolic`` (sympy) is
imported only when used.
"""

from distkl import functional
from distkl._options import Options, get_options, options
from distkl.approx import kl_unscented, kl_variational
from distkl.bounded import bounded_kl, js_distance, js_divergence_normalized
from distkl.bounds import kl_bounds
from distkl.density import mixture_log_prob
from distkl.jsd import jsd_mc
from distkl.latent import kl_annealing, kl_free_bits
from distkl.losses import JSDLoss, KLLoss
from distkl.montecarlo import Estimate, expectation, kl_mc
from distkl.quadrature import jsd_quadrature, kl_quadrature
from distkl.registry import js_divergence, jsd_rules, kl_rules, register_jsd, register_kl
from distkl.rules import categorical as _categorical  # noqa: F401  (registers the rules)
from distkl.rules import mixture as _mixture  # noqa: F401  (registers the rules)
from distkl.rules import normal as _normal  # noqa: F401  (registers the rules)
from distkl.verify import check_jsd, check_kl

__version__ = "0.1.0"

__all__ = [
    "Estimate",
    "JSDLoss",
    "KLLoss",
    "Options",
    "bounded_kl",
    "check_jsd",
    "check_kl",
    "expectation",
    "functional",
    "get_options",
    "js_distance",
    "js_divergence",
    "js_divergence_normalized",
    "jsd_mc",
    "jsd_quadrature",
    "jsd_rules",
    "kl_annealing",
    "kl_bounds",
    "kl_free_bits",
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
