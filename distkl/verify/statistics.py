r"""The z-tests behind `distkl verify`: a registered divergence against naive Monte Carlo.

`check_kl` compares what `kl_divergence(p, q)` returns with the naive estimate

$$
\widehat{\mathrm{KL}}(p \| q) = \frac1n \sum_{i=1}^n \log p(x_i) - \log q(x_i), \qquad x_i \sim p,
$$

reduced in float64 with its standard error $s / \sqrt n$, and flags each batch element whose
z-score $|\mathrm{KL} - \widehat{\mathrm{KL}}| / \sigma$ exceeds a threshold $z^*$ chosen for a
false-failure rate `alpha` over all elements checked (Bonferroni,
$z^* = \Phi^{-1}(1 - \alpha / 2m)$ for $m$ elements). Rules whose kind for the pair is
`"estimate"` are evaluated with a different seed, by quadrature for 1-D events (deterministic) and
by Monte Carlo otherwise, and their own standard error enters $\sigma$. `check_jsd` does the same
for `distkl.js_divergence` against the two-sample estimate with $\log m$ by `logaddexp`.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.distributions import Distribution

import distkl
from distkl._checks import check_positive_int, check_skew, describe
from distkl._options import options
from distkl.montecarlo import kl_mc
from distkl.registry import js_divergence, lookup_jsd, lookup_kl
from distkl.verify.sampling import (
    device_of,
    naive_jsd,
    naive_kl,
    sampling_scope,
    sampling_seed,
)

__all__ = [
    "CHECK_SAMPLES",
    "DEFAULT_ALPHA",
    "CheckResult",
    "check_jsd",
    "check_kl",
    "check_values",
    "z_threshold",
]

#: Monte Carlo samples per check of `check_kl` / `check_jsd`.
CHECK_SAMPLES = 100_000
#: Samples of the extra Monte Carlo run that measures an estimate rule's standard error
#: (scaled by `sqrt(RULE_SE_SAMPLES / n)` to the rule's `n`).
RULE_SE_SAMPLES = 8_192
#: Family-wise false-failure rate: the chance that a correct table reports any failure.
DEFAULT_ALPHA = 1e-3
_RULE_SEED = 0x5EED  # xor-ed into the sampling seed: the rule's own Monte Carlo is independent


def z_threshold(num_tests: int, alpha: float = DEFAULT_ALPHA) -> float:
    r"""Two-sided Bonferroni threshold $z^* = \Phi^{-1}(1 - \alpha / (2 m))$ for $m$ tests.

    A correct rule fails any of `num_tests` z-tests with probability at most `alpha` (for
    normally distributed estimates).

    Raises:
        ValueError: if `alpha` is not in (0, 1) or `num_tests` is not a positive int.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}.")
    check_positive_int("num_tests", num_tests)
    return statistics.NormalDist().inv_cdf(1.0 - alpha / (2.0 * num_tests))


@dataclass(frozen=True)
class CheckResult:
    r"""One comparison of a registered divergence with an independent Monte Carlo estimate.

    Tensors are float64 on the CPU, of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Attributes:
        pair: `"P-Q"` names of the two distributions.
        divergence: `"KL"` or `"JSD"`.
        analytic: the registered rule's value.
        estimate: the naive Monte Carlo estimate.
        stderr: the standard error used in `z`: Monte Carlo, rule (estimate rules) and a
            rounding floor for the rule's dtype, combined in quadrature.
        mc_stderr: the Monte Carlo estimate's standard error.
        rule_stderr: the rule's own standard error (0 for exact rules and quadrature).
        z: `(analytic - estimate) / stderr`.
        z_threshold: elements with `|z| > z_threshold` fail.
        num_samples: samples per Monte Carlo estimate.
        kind: `"exact"` or `"estimate"`: what the rule computed for this pair.
        method: how an estimate rule was evaluated (`"quadrature"` or `"mc"`), else None.
        element_passed: bool tensor, `|z| <= z_threshold` per batch element.
    """

    pair: str
    divergence: str
    analytic: Tensor
    estimate: Tensor
    stderr: Tensor
    mc_stderr: Tensor
    rule_stderr: Tensor
    z: Tensor
    z_threshold: float
    num_samples: int
    kind: str = "exact"
    method: Optional[str] = None
    element_passed: Tensor = field(default_factory=lambda: torch.ones((), dtype=torch.bool))

    @property
    def passed(self) -> bool:
        """True when every batch element passed."""
        return bool(self.element_passed.all())

    def worst(self) -> int:
        """Flat index of the element with the largest `|z|` (a NaN counts as largest)."""
        az = self.z.abs().reshape(-1)
        az = torch.where(torch.isnan(az), torch.full_like(az, math.inf), az)
        return int(az.argmax()) if az.numel() else 0

    def __str__(self) -> str:
        method = f", {self.method}" if self.method else ""
        lines = [
            f"{self.divergence}({self.pair}) [{self.kind}{method}]"
            f": {'passed' if self.passed else 'FAILED'} with |z| <= {self.z_threshold:.2f}, "
            f"N = {self.num_samples}"
        ]
        shape = tuple(self.z.shape)
        flat = [t.reshape(-1) for t in (self.analytic, self.estimate, self.stderr, self.z)]
        ok = self.element_passed.reshape(-1)
        for i in range(flat[0].numel()):
            lines.append(
                f"  {_unravel(i, shape)}: exact {flat[0][i]:.6g}  estimate {flat[1][i]:.6g} "
                f"+- {flat[2][i]:.2g}  z {flat[3][i]:+.2f}  {'ok' if ok[i] else 'FAIL'}"
            )
        return "\n".join(lines)


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(i % s)
        i //= s
    return tuple(reversed(out))


# --------------------------------------------------------------------------------------------
# Evaluating the registered rule

StderrFn = Callable[[int, torch.Generator], Tensor]


def _first_difference(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and then {tuple(b.shape)}"
    i = int((a != b).reshape(-1).nonzero()[0])
    return f"{a.reshape(-1)[i].item():.6g} and then {b.reshape(-1)[i].item():.6g}"


def _rule_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _evaluate_exact(value_fn: Callable[[], Tensor], seed: int, device: torch.device) -> Tensor:
    """The rule's value, checked to be the same under two seeds (an exact rule is not random)."""
    values = []
    for s in (seed, seed + 1):
        g = _rule_generator(s, device)
        with sampling_scope(s, device), options(method="mc", generator=g):
            values.append(value_fn())
    a, b = (v.detach().nan_to_num(nan=0.0) for v in values)
    # reductions on some devices are not bitwise reproducible; a seed-dependent (Monte Carlo)
    # value differs by far more than this
    tol = 1e3 * torch.finfo(a.dtype).eps if a.dtype.is_floating_point else 0.0
    if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol):
        raise ValueError(
            "the rule is registered as kind='exact', but its value changes with the random "
            f"seed ({_first_difference(a, b)}); register it with kind='estimate'."
        )
    return values[0]


def _evaluate_estimate(
    p: Distribution,
    value_fn: Callable[[], Tensor],
    stderr_fn: StderrFn,
    n: int,
    seed: int,
) -> tuple[Tensor, Tensor, str]:
    """`(value, stderr, method)`: quadrature for 1-D events when it applies, else Monte Carlo."""
    device = device_of(p)
    if p.event_shape == ():
        try:
            with options(method="quadrature"):
                return value_fn(), torch.zeros(()), "quadrature"
        except (NotImplementedError, ValueError):
            pass
    with options(method="mc", num_samples=n, generator=_rule_generator(seed, device)):
        value = value_fn()
    m = min(n, RULE_SE_SAMPLES)
    stderr = stderr_fn(m, _rule_generator(seed + 1, device)) * math.sqrt(m / n)
    return value, stderr, "mc"


def _kl_mc_stderr(p: Distribution, q: Distribution) -> StderrFn:
    def stderr(n: int, g: torch.Generator) -> Tensor:
        with torch.no_grad():
            est = kl_mc(p, q, num_samples=n, generator=g)
        return torch.as_tensor(est.stderr).detach().to(torch.float64).cpu()

    return stderr


def _jsd_mc_stderr(p: Distribution, q: Distribution, skew: float) -> StderrFn:
    def stderr(n: int, g: torch.Generator) -> Tensor:
        with torch.no_grad():
            est = distkl.jsd_mc(p, q, skew=skew, num_samples=n, generator=g)
        return torch.as_tensor(est.stderr).detach().to(torch.float64).cpu()

    return stderr


@dataclass(frozen=True)
class _Claim:
    """What a check compares: the rule's value and its own standard error and method."""

    value: Tensor
    stderr: Tensor
    kind: str
    method: Optional[str]


def _claim(
    p: Distribution,
    value_fn: Callable[[], Tensor],
    stderr_fn: StderrFn,
    kind: str,
    n: int,
    seed: int,
) -> _Claim:
    with torch.no_grad():
        if kind == "exact":
            value = _evaluate_exact(value_fn, seed, device_of(p))
            return _Claim(value, torch.zeros(()), kind, None)
        value, stderr, method = _evaluate_estimate(p, value_fn, stderr_fn, n, seed)
    return _Claim(value, stderr, kind, method)


def _compare(
    pair: str,
    divergence: str,
    claim: _Claim,
    naive: tuple[Tensor, Tensor],
    num_samples: int,
    z: Optional[float],
    alpha: float,
) -> CheckResult:
    estimate, mc_stderr = naive
    rule_dtype = claim.value.dtype
    a = claim.value.detach().to(torch.float64).cpu()
    shape = torch.broadcast_shapes(a.shape, estimate.shape)
    a, est = a.expand(shape), estimate.expand(shape)
    mc_se, rule_se = mc_stderr.expand(shape), claim.stderr.expand(shape)
    eps = torch.finfo(rule_dtype).eps if rule_dtype.is_floating_point else 0.0
    floor = 64.0 * eps * (1.0 + a.abs().nan_to_num(posinf=0.0))
    se = torch.sqrt(mc_se**2 + rule_se**2 + floor**2)
    diff = a - est
    both_inf = torch.isinf(a) & torch.isinf(est) & (torch.sign(a) == torch.sign(est))
    zscore = torch.where(both_inf, torch.zeros_like(diff), diff / se)
    zscore = torch.where((diff == 0) & (se == 0), torch.zeros_like(diff), zscore)
    threshold = z if z is not None else z_threshold(max(a.numel(), 1), alpha)
    return CheckResult(
        pair=pair,
        divergence=divergence,
        analytic=a,
        estimate=est,
        stderr=se,
        mc_stderr=mc_se,
        rule_stderr=rule_se,
        z=zscore,
        z_threshold=float(threshold),
        num_samples=num_samples,
        kind=claim.kind,
        method=claim.method,
        element_passed=zscore.abs() <= threshold,  # NaN compares False: fails
    )


def _pair_name(p: Distribution, q: Distribution) -> str:
    return f"{describe(p)}-{describe(q)}".replace(", 1)", ")")


def _num_samples(n: object) -> int:
    return check_positive_int("num_samples", n, minimum=2)


# --------------------------------------------------------------------------------------------
# The checks


def check_values(
    p: Distribution,
    q: Distribution,
    value: Tensor,
    *,
    num_samples: int = CHECK_SAMPLES,
    generator: Optional[torch.Generator] = None,
    z: Optional[float] = None,
    alpha: float = DEFAULT_ALPHA,
    pair: Optional[str] = None,
) -> CheckResult:
    """Compare a claimed KL(p || q) in nats (any tensor of the batch shape) with sampling.

    The z-test of `check_kl` for a value computed elsewhere (a derived formula before it is
    registered). Arguments as `check_kl`; `pair` names the pair in the result.

    Returns:
        `CheckResult` of kind `"exact"`.
    """
    n = _num_samples(num_samples)
    naive = naive_kl(p, q, n, sampling_seed(generator))
    claim = _Claim(torch.as_tensor(value), torch.zeros(()), "exact", None)
    return _compare(pair or _pair_name(p, q), "KL", claim, naive, n, z, alpha)


def check_kl(
    p: Distribution,
    q: Distribution,
    *,
    num_samples: int = CHECK_SAMPLES,
    generator: Optional[torch.Generator] = None,
    z: Optional[float] = None,
    alpha: float = DEFAULT_ALPHA,
) -> CheckResult:
    r"""Check the registered KL(p || q) in nats against an independent Monte Carlo estimate.

    $$
    z = \frac{\mathrm{KL}(p \| q) - \widehat{\mathrm{KL}}}
             {\sqrt{s_{\mathrm{mc}}^2 / n + \sigma_{\mathrm{rule}}^2}}, \qquad
    \widehat{\mathrm{KL}} = \frac1n \sum_i \log p(x_i) - \log q(x_i),\ x_i \sim p
    $$

    The estimate is reduced in float64. A rule whose kind for this pair is `"estimate"` is
    evaluated with a different seed: by `method="quadrature"` for 1-D events
    ($\sigma_{\mathrm{rule}} = 0$), else by `method="mc"` with `num_samples` samples and
    $\sigma_{\mathrm{rule}}$ from `distkl.kl_mc`. A rounding floor $64\,\epsilon(1 + |\mathrm{KL}|)$
    of the rule's dtype is added in quadrature.

    Args:
        p: the first distribution.
        q: the second distribution; `kl_divergence(p, q)` must have a rule.
        num_samples: Monte Carlo samples (at least 2).
        generator: makes the check reproducible (seeds the sampling of `p`).
        z: pass when `|z| <= z`; default from `alpha` with Bonferroni over the batch.
        alpha: false-failure rate for the default `z`.

    Returns:
        `CheckResult` with tensors of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`;
        `.passed` overall, `.element_passed` per element.

    Raises:
        NotImplementedError: when no KL rule is registered for the pair.
        ValueError: for `num_samples` below 2.

    Example:
        >>> import torch, distkl
        >>> from torch.distributions import Categorical, OneHotCategorical
        >>> p = Categorical(probs=torch.tensor([0.2, 0.8]))
        >>> q = OneHotCategorical(probs=torch.tensor([0.5, 0.5]))
        >>> distkl.check_kl(p, q, generator=torch.Generator().manual_seed(0)).passed
        True
    """
    n = _num_samples(num_samples)
    fn, info = lookup_kl(type(p), type(q))
    if fn is None:
        raise NotImplementedError(
            f"No KL(p || q) is registered for p type {type(p).__name__} and q type "
            f"{type(q).__name__}; nothing to check."
        )
    kind = info.kind_for(p, q) if info is not None else "exact"
    seed = sampling_seed(generator)
    naive = naive_kl(p, q, n, seed)
    claim = _claim(p, lambda: fn(p, q), _kl_mc_stderr(p, q), kind, n, seed ^ _RULE_SEED)
    return _compare(_pair_name(p, q), "KL", claim, naive, n, z, alpha)


def check_jsd(
    p: Distribution,
    q: Distribution,
    *,
    skew: float = 0.5,
    num_samples: int = CHECK_SAMPLES,
    generator: Optional[torch.Generator] = None,
    z: Optional[float] = None,
    alpha: float = DEFAULT_ALPHA,
) -> CheckResult:
    r"""Check `distkl.js_divergence(p, q, skew=skew)` in nats against naive Monte Carlo.

    $$
    \widehat{\mathrm{JS}}_\alpha = \frac{\alpha}{n}\sum_i \log\frac{p(x_i)}{m(x_i)}
    + \frac{1-\alpha}{n}\sum_i \log\frac{q(y_i)}{m(y_i)},\quad
    m = \alpha p + (1 - \alpha) q,\ x_i \sim p,\ y_i \sim q
    $$

    with $\log m$ by `logaddexp`; otherwise as `check_kl` (an estimate rule's own standard
    error from `distkl.jsd_mc`).

    Returns:
        `CheckResult` with tensors of shape `broadcast_shapes(p.batch_shape, q.batch_shape)`.

    Raises:
        NotImplementedError: when no JSD rule is registered for the pair.
        ValueError: for `num_samples` below 2 or `skew` outside (0, 1).
    """
    n = _num_samples(num_samples)
    alpha_skew = check_skew(skew)
    _, info = lookup_jsd(type(p), type(q))
    if info is None:
        raise NotImplementedError(
            f"No JSD(p, q) is registered for p type {type(p).__name__} and q type "
            f"{type(q).__name__}; nothing to check."
        )
    seed = sampling_seed(generator)
    naive = naive_jsd(p, q, alpha_skew, n, seed)
    claim = _claim(
        p,
        lambda: js_divergence(p, q, skew=alpha_skew),
        _jsd_mc_stderr(p, q, alpha_skew),
        info.kind_for(p, q),
        n,
        seed ^ _RULE_SEED,
    )
    return _compare(_pair_name(p, q), "JSD", claim, naive, n, z, alpha)
