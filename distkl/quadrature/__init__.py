r"""Deterministic 1-D `KL(p || q)` and `JS_alpha(p, q)` (nats) of scalar Gaussian mixtures.

Every supported family (`Normal` and `MixtureSameFamily(Normal)`, or any Normal-family
distribution whose event has one element) is a 1-D Gaussian mixture

$$
p(x) = \sum_k w_k\, \mathcal{N}(x; \mu_k, \sigma_k^2), \qquad
q(x) = \sum_j v_j\, \mathcal{N}(x; \nu_j, \tau_j^2).
$$

**The rule.** A composite Gauss-Legendre rule over breakpoints. Every component of `p` and of
`q` contributes the breakpoints $\mu_k + c\,\sigma_k$,
$c \in \{0, \pm 0.75, \pm 1.5, \pm 2.25, \pm 3, \pm 4, \pm 5, \pm 6.5, \pm 8.5, \pm 12\}$, and every
pair of components of one mixture contributes the points where their weighted densities cross,
$r$, with $r + c\,\delta$, $c \in \{\pm 1, \pm 3, \pm 10\}$, $\delta = 1/|\ell_i'(r) - \ell_j'(r)|$
the width of the near-kink of $\log q$ (or $\log p$) where its dominant component switches.
Each interval between consecutive breakpoints gets `ceil(nodes / 18)` Gauss-Legendre nodes.
Outside $\mu \pm 12\sigma$ of every component both densities are below $e^{-72}$ of their peaks.

**The integrands** are pointwise non-negative and second order in $\log p - \log q$, so a
small divergence keeps its relative accuracy (and `KL(p || p)` is exactly 0):

$$
\mathrm{KL}(p \| q) = \int p\,\bigl(f + e^{-f} - 1\bigr)\,dx, \qquad f = \log p - \log q,
$$

since $\int (q - p)\,dx = 0$; and with $m = \alpha p + (1-\alpha) q$, $\pi = \alpha p / m$,

$$
\mathrm{JS}_\alpha(p, q) = \int m(x)\, \mathrm{kl}\bigl(\pi(x) \,\|\, \alpha\bigr)\,dx,
$$

where $\mathrm{kl}$ is the KL divergence between Bernoulli distributions.

**Accuracy** (float64, default 128 nodes; `tests/test_quadrature.py`). Against
`scipy.integrate.quad` (relative tolerance 1e-12, breakpoints at every component and crossing)
on 100 seeded random pairs (up to 4 components each, means $N(0, 3^2)$, scales log-uniform on
[1e-3, 1e2]): worst relative error 1.2e-11 for KL and 1.9e-11 for JSD (before the crossing
breakpoints: 13 of 100 above 1e-7). The hard cases against `mpmath.quad` at 30 digits stay
below 1e-8. The tests assert 1e-9 on fresh seeded pairs.

**Single Normal `p`** (a Bayesian network's posterior against a scale-mixture prior):
[`kl_quadrature`][distkl.kl_quadrature] splits `log q` into its upper envelope, integrated in closed
form, and a remainder that lives near the crossings, integrated by a composite rule with
`ceil(nodes / 16)` nodes per interval (see `distkl/quadrature/_normal.py`). Against the
512-node composite rule: worst relative error 1.1e-8 over 4 x 300 random pairs (K = 1..4,
scales 1e-3..1e2) and 1.8e-11 on Blundell et al.'s prior (posterior scales 1e-5..1) with the
default 128 nodes.

**Many Normals against one prior** (a batch of at least 4096 posteriors and a prior of batch
shape `()`, in eager mode): the shared-prior rule of `distkl/quadrature/_shared.py` integrates
`log q` less its widest component, a function of the prior alone, by Gauss-Hermite where it is
smooth on the posterior's scale and by product weights on cells shared by the whole batch
elsewhere; `nodes` does not apply to it. Worst relative error 8.9e-10 against the 1024-node
composite rule on random shared priors, and 4.8e-11 on Blundell's prior at 10^6 weights
(`tests/test_quadrature_shared.py`, `tests/test_quadrature.py`); 10^6 weights in about 1 s,
forward and backward, on one CPU thread (`benchmarks/bench_1d_network.py`). It computes first
derivatives only (a backward with `create_graph=True` raises) and hands a call back to the
per-pair rule when two components share the widest scale, a parameter is not finite, or the
posteriors are too narrow for its finest cells.

All functions here compile under `torch.compile(fullgraph=True)` (a compiled call uses the
per-pair rule).
"""

from distkl.quadrature._api import expect_1d, jsd_quadrature, kl_composite, kl_quadrature
from distkl.quadrature._integrands import kl_integrand
from distkl.quadrature._rule import loc_scale

__all__ = ["kl_quadrature", "kl_composite", "jsd_quadrature", "expect_1d", "kl_integrand"]

# Old private names, still imported by ``distkl.bounds`` on other branches until it moves to
# ``kl_integrand`` and ``distkl._gaussian.loc_scale_1d``.
_h_kl = kl_integrand
_loc_scale = loc_scale
