r"""Check registered divergences against independent Monte Carlo estimates (``distkl verify``).

:func:`check_kl` compares what ``kl_divergence(p, q)`` returns with the naive estimate

.. math::
    \widehat{\mathrm{KL}}(p \| q) = \frac1n \sum_{i=1}^n \log p(x_i) - \log q(x_i),
    \qquad x_i \sim p,

reduced in float64 with its standard error :math:`s / \sqrt n`, and flags each batch element whose
z-score :math:`|\mathrm{KL} - \widehat{\mathrm{KL}}| / \sigma` exceeds a threshold :math:`z^*`
chosen for a false-failure rate ``alpha`` over all elements checked (Bonferroni:
:math:`z^* = \Phi^{-1}(1 - \alpha / 2m)` for ``m`` elements). Rules of kind ``"estimate"`` (Gaussian
mixtures) are evaluated with a different seed, by quadrature for 1-D events (deterministic) and by
Monte Carlo otherwise, and their own standard error enters :math:`\sigma`. :func:`check_jsd` does
the same for ``distkl.js_divergence`` against

.. math::
    \widehat{\mathrm{JS}}_\alpha = \alpha \,\frac1n \sum_i \log\frac{p(x_i)}{m(x_i)}
    + (1-\alpha)\,\frac1n \sum_i \log\frac{q(y_i)}{m(y_i)}, \quad x_i \sim p,\ y_i \sim q.

:func:`run_verify` runs the checks over every row of :data:`distkl.examples.EXAMPLES` whose pair
has a rule, on every device and dtype, and lists the registered rules that no row exercises.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import statistics
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from distkl._options import options
from distkl.examples import EXAMPLES, Example
from distkl.registry import (
    RuleInfo,
    js_divergence,
    jsd_rules,
    kl_rules,
    lookup_jsd,
    lookup_kl,
)

__all__ = [
    "CheckResult",
    "VerifyRow",
    "VerifyReport",
    "check_kl",
    "check_jsd",
    "check_values",
    "run_verify",
    "z_threshold",
    "plot_convergence",
    "CHECK_SAMPLES",
    "DEFAULT_SAMPLES",
    "QUICK_SAMPLES",
    "DEFAULT_ALPHA",
]

#: Monte Carlo samples per check of :func:`check_kl` / :func:`check_jsd`.
CHECK_SAMPLES = 100_000
#: Samples per check of ``distkl verify`` (the whole table in under two minutes on two CPU
#: cores); ``--quick`` uses :data:`QUICK_SAMPLES`.
DEFAULT_SAMPLES = 32_768
QUICK_SAMPLES = 8_192
#: Samples of the extra Monte Carlo run that measures an estimate rule's standard error
#: (scaled by ``sqrt(RULE_SE_SAMPLES / n)`` to the rule's ``n``).
RULE_SE_SAMPLES = 8_192
#: Family-wise false-failure rate: the chance that a correct table reports any failure.
DEFAULT_ALPHA = 1e-3
_CHUNK = 16_384


def z_threshold(num_tests: int, alpha: float = DEFAULT_ALPHA) -> float:
    r"""Two-sided Bonferroni threshold :math:`z^* = \Phi^{-1}(1 - \alpha / (2 m))`.

    A correct rule fails any of ``m`` independent-or-not z-tests with probability at most
    ``alpha`` (for normally distributed estimates).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}.")
    if num_tests < 1:
        raise ValueError(f"num_tests must be a positive int, got {num_tests}.")
    return statistics.NormalDist().inv_cdf(1.0 - alpha / (2.0 * num_tests))


@dataclass(frozen=True)
class CheckResult:
    r"""One comparison of a registered divergence with an independent Monte Carlo estimate.

    Tensors are float64 on the CPU, of shape ``broadcast_shapes(p.batch_shape, q.batch_shape)``.

    Attributes:
        pair: ``"P-Q"`` names of the two distributions.
        divergence: ``"KL"`` or ``"JSD"``.
        analytic: the registered rule's value.
        estimate: the naive Monte Carlo estimate.
        stderr: the standard error used in ``z``: Monte Carlo, rule (estimate rules) and a
            rounding floor for the rule's dtype, combined in quadrature.
        mc_stderr: the Monte Carlo estimate's standard error.
        rule_stderr: the rule's own standard error (0 for exact rules and quadrature).
        z: ``(analytic - estimate) / stderr``.
        z_threshold: elements with ``|z| > z_threshold`` fail.
        num_samples: samples per Monte Carlo estimate.
        kind: ``"exact"`` or ``"estimate"``.
        method: how an estimate rule was evaluated (``"quadrature"`` or ``"mc"``), else None.
        element_passed: bool tensor, ``|z| <= z_threshold`` per batch element.
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
        """Flat index of the element with the largest ``|z|`` (a NaN counts as largest)."""
        az = self.z.abs().reshape(-1)
        az = torch.where(torch.isnan(az), torch.full_like(az, math.inf), az)
        return int(az.argmax()) if az.numel() else 0

    def __str__(self) -> str:
        method = f", {self.method}" if self.method else ""
        head = (
            f"{self.divergence}({self.pair}) [{self.kind}{method}]"
            f": {'passed' if self.passed else 'FAILED'} with |z| <= {self.z_threshold:.2f}, "
            f"N = {self.num_samples}"
        )
        lines = [head]
        shape = tuple(self.z.shape)
        flat = [t.reshape(-1) for t in (self.analytic, self.estimate, self.stderr, self.z)]
        ok = self.element_passed.reshape(-1)
        for i in range(flat[0].numel()):
            idx = _unravel(i, shape)
            lines.append(
                f"  {idx}: exact {flat[0][i]:.6g}  estimate {flat[1][i]:.6g} +- {flat[2][i]:.2g}  "
                f"z {flat[3][i]:+.2f}  {'ok' if ok[i] else 'FAIL'}"
            )
        return "\n".join(lines)


def _unravel(i: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(i % s)
        i //= s
    return tuple(reversed(out))


# --------------------------------------------------------------------------------------------
# Sampling helpers


def _seed_from(generator: Optional[torch.Generator]) -> int:
    return int(torch.randint(0, 2**62, (), generator=generator))


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generators (distributions sample from them) and restore them after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _chunks(n: int, size: int = _CHUNK) -> Iterator[int]:
    while n > 0:
        m = min(size, n)
        yield m
        n -= m


class _Moments:
    """Streaming mean and sum of squared deviations in float64 (Chan et al. merge)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None

    def add(self, values: Tensor) -> None:
        v = values.to(torch.float64)
        m = v.shape[0]
        mean = v.mean(0)
        m2 = ((v - mean) ** 2).sum(0)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = m, mean, m2
            return
        n = self.n + m
        delta = mean - self.mean
        self.mean = self.mean + delta * (m / n)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * m / n)
        self.n = n

    def result(self) -> tuple[Tensor, Tensor]:
        assert self.mean is not None and self.m2 is not None
        var = self.m2 / max(self.n - 1, 1)
        stderr = torch.sqrt(var / self.n)
        # an infinite mean (q = 0 where p > 0) has no spread to speak of
        stderr = torch.where(torch.isinf(self.mean), torch.zeros_like(stderr), stderr)
        return self.mean.cpu(), stderr.cpu()


def _float_dtype(d: Distribution) -> torch.dtype:
    for v in vars(d).values():
        if isinstance(v, Tensor) and v.dtype.is_floating_point:
            return v.dtype
        if isinstance(v, Distribution):
            return _float_dtype(v)
    return torch.get_default_dtype()


def _encode_for(x: Tensor, src: Distribution, dst: Distribution) -> Tensor:
    """Samples of ``src`` in the encoding ``dst.log_prob`` reads (category index <-> one-hot)."""
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
    """``d`` expanded to ``batch``, so every batch element gets samples of its own."""
    if d.batch_shape == batch:
        return d
    try:
        return d.expand(batch)
    except NotImplementedError:  # a user class without expand: rely on broadcasting
        return d


def _log_densities(
    src: Distribution, p: Distribution, q: Distribution, m: int
) -> tuple[Tensor, Tensor]:
    """``(log p(x), log q(x))`` for ``m`` draws ``x ~ src`` (``p`` or ``q``, expanded)."""
    x = src.sample((m,))
    return p.log_prob(_encode_for(x, src, p)), q.log_prob(_encode_for(x, src, q))


def _log_ratio(p: Distribution, q: Distribution, m: int) -> Tensor:
    lp, lq = _log_densities(p, p, q, m)
    return lp - lq


def _naive_kl(p: Distribution, q: Distribution, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``(mean, stderr)`` of ``log p(x) - log q(x)``, ``x ~ p``, accumulated in float64."""
    p = _expanded(p, torch.broadcast_shapes(p.batch_shape, q.batch_shape))
    acc = _Moments()
    with _seeded(seed), torch.no_grad():
        for m in _chunks(n):
            acc.add(_log_ratio(p, q, m))
    return acc.result()


def _naive_jsd(
    p: Distribution, q: Distribution, alpha: float, n: int, seed: int
) -> tuple[Tensor, Tensor]:
    """``(value, stderr)`` of the two-sample naive estimate of ``JS_alpha(p, q)``."""
    batch = torch.broadcast_shapes(p.batch_shape, q.batch_shape)
    p, q = _expanded(p, batch), _expanded(q, batch)
    la, lb = math.log(alpha), math.log1p(-alpha)
    value = torch.zeros(batch, dtype=torch.float64)
    var = torch.zeros(batch, dtype=torch.float64)
    for k, (src, w) in enumerate(((p, alpha), (q, 1.0 - alpha))):
        acc = _Moments()
        with _seeded(seed + k), torch.no_grad():
            for m in _chunks(n):
                lp, lq = _log_densities(src, p, q, m)
                lm = torch.logaddexp(lp + la, lq + lb)
                acc.add((lp if k == 0 else lq) - lm)
        mean, se = acc.result()
        value = value + w * mean
        var = var + (w * se) ** 2
    return value, var.sqrt()


# --------------------------------------------------------------------------------------------
# Finding and evaluating the registered rule


def kl_rule_for(
    type_p: type, type_q: type
) -> tuple[Optional[Callable[..., Tensor]], Optional[RuleInfo]]:
    """Deprecated alias of `distkl.registry.lookup_kl`."""
    return lookup_kl(type_p, type_q)


def jsd_rule_for(type_p: type, type_q: type) -> Optional[RuleInfo]:
    """distkl's JSD RuleInfo of the pair ``js_divergence`` dispatches to, or None."""
    return lookup_jsd(type_p, type_q)[1]


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _device_of(d: Distribution) -> torch.device:
    """The device of the first tensor among a distribution's attributes (cpu if none)."""
    for v in vars(d).values():
        if isinstance(v, Tensor):
            return v.device
        if isinstance(v, Distribution):
            return _device_of(v)
    return torch.device("cpu")


def _first_difference(a: Tensor, b: Tensor) -> str:
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and then {tuple(b.shape)}"
    i = int((a != b).reshape(-1).nonzero()[0])
    return f"{a.reshape(-1)[i].item():.6g} and then {b.reshape(-1)[i].item():.6g}"


def _rule_generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _evaluate(
    p: Distribution,
    q: Distribution,
    value_fn: Callable[[], Tensor],
    stderr_fn: Callable[[int, torch.Generator], Optional[Tensor]],
    kind: str,
    n: int,
    seed: int,
) -> tuple[Tensor, Optional[Tensor], Optional[str]]:
    """Value of the rule, its stderr (None: unknown, assume the naive estimator's), method."""
    device = _device_of(p)
    if kind != "estimate":
        values = []
        for s in (seed, seed + 1):
            with _seeded(s), options(method="mc", generator=_rule_generator(s, device)):
                values.append(value_fn())
        a, b = (v.detach().nan_to_num(nan=0.0) for v in values)
        # reductions on some devices are not bitwise reproducible; a seed-dependent (Monte
        # Carlo) value differs by far more than this
        tol = 1e3 * torch.finfo(a.dtype).eps if a.dtype.is_floating_point else 0.0
        if a.shape != b.shape or not torch.allclose(a, b, rtol=tol, atol=tol):
            raise ValueError(
                "the rule is registered as kind='exact', but its value changes with the random "
                f"seed ({_first_difference(a, b)}); register it with kind='estimate'."
            )
        return values[0], torch.zeros(()), None
    if p.event_shape == () and _has_module("distkl.quadrature"):
        try:
            with options(method="quadrature"):
                return value_fn(), torch.zeros(()), "quadrature"
        except (NotImplementedError, ValueError):
            pass
    with options(method="mc", num_samples=n, generator=_rule_generator(seed, device)):
        value = value_fn()
    m = min(n, RULE_SE_SAMPLES)
    stderr = stderr_fn(m, _rule_generator(seed + 1, device))
    if stderr is not None:
        stderr = stderr * math.sqrt(m / n)
    return value, stderr, "mc"


def _kl_mc_stderr(
    p: Distribution, q: Distribution
) -> Callable[[int, torch.Generator], Optional[Tensor]]:
    def stderr(n: int, g: torch.Generator) -> Optional[Tensor]:
        if not _has_module("distkl.montecarlo"):
            return None
        from distkl.montecarlo import kl_mc

        with torch.no_grad():
            est = kl_mc(p, q, num_samples=n, generator=g)
        return torch.as_tensor(est.stderr).detach().to(torch.float64).cpu()

    return stderr


def _jsd_mc_stderr(
    p: Distribution, q: Distribution, skew: float
) -> Callable[[int, torch.Generator], Optional[Tensor]]:
    def stderr(n: int, g: torch.Generator) -> Optional[Tensor]:
        if not _has_module("distkl.jsd"):
            return None
        import distkl.jsd as jsd_module

        jsd_mc = getattr(jsd_module, "jsd_mc", None)
        if jsd_mc is None:
            return None
        with torch.no_grad():
            est = jsd_mc(p, q, skew=skew, num_samples=n, generator=g)
        return torch.as_tensor(est.stderr).detach().to(torch.float64).cpu()

    return stderr


def _compare(
    pair: str,
    divergence: str,
    analytic: Tensor,
    estimate: Tensor,
    mc_stderr: Tensor,
    rule_stderr: Tensor,
    num_samples: int,
    z: Optional[float],
    alpha: float,
    kind: str,
    method: Optional[str],
) -> CheckResult:
    rule_dtype = analytic.dtype
    a = analytic.detach().to(torch.float64).cpu()
    shape = torch.broadcast_shapes(a.shape, estimate.shape)
    a = a.expand(shape)
    est = estimate.expand(shape)
    eps = torch.finfo(rule_dtype).eps if rule_dtype.is_floating_point else 0.0
    floor = 64.0 * eps * (1.0 + a.abs().nan_to_num(posinf=0.0))
    se = torch.sqrt(mc_stderr.expand(shape) ** 2 + rule_stderr.expand(shape) ** 2 + floor**2)
    diff = a - est
    both_inf = torch.isinf(a) & torch.isinf(est) & (torch.sign(a) == torch.sign(est))
    zscore = torch.where(both_inf, torch.zeros_like(diff), diff / se)
    zscore = torch.where((diff == 0) & (se == 0), torch.zeros_like(diff), zscore)
    threshold = z if z is not None else z_threshold(max(a.numel(), 1), alpha)
    passed = zscore.abs() <= threshold  # NaN compares False: fails
    return CheckResult(
        pair=pair,
        divergence=divergence,
        analytic=a,
        estimate=est,
        stderr=se,
        mc_stderr=mc_stderr.expand(shape),
        rule_stderr=rule_stderr.expand(shape),
        z=zscore,
        z_threshold=float(threshold),
        num_samples=num_samples,
        kind=kind,
        method=method,
        element_passed=passed,
    )


def _pair_name(p: Distribution, q: Distribution) -> str:
    from distkl._checks import describe

    return f"{describe(p)}-{describe(q)}".replace(", 1)", ")")


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
    r"""Compare a claimed ``KL(p || q)`` (nats, any tensor of the batch shape) with sampling.

    The z-test of :func:`check_kl` for a value computed elsewhere (a derived formula before it is
    registered).
    """
    _check_num_samples(num_samples)
    seed = _seed_from(generator)
    estimate, mc_se = _naive_kl(p, q, num_samples, seed)
    return _compare(
        pair or _pair_name(p, q),
        "KL",
        torch.as_tensor(value),
        estimate,
        mc_se,
        torch.zeros(()),
        num_samples,
        z,
        alpha,
        "exact",
        None,
    )


def _check_num_samples(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"num_samples must be an int >= 2, got {n!r}.")


def check_kl(
    p: Distribution,
    q: Distribution,
    *,
    num_samples: int = CHECK_SAMPLES,
    generator: Optional[torch.Generator] = None,
    z: Optional[float] = None,
    alpha: float = DEFAULT_ALPHA,
) -> CheckResult:
    r"""Check the registered ``KL(p || q)`` (nats) against an independent Monte Carlo estimate.

    .. math::
        z = \frac{\mathrm{KL}(p \| q) - \widehat{\mathrm{KL}}}
                 {\sqrt{s_{\mathrm{mc}}^2 / n + \sigma_{\mathrm{rule}}^2}}, \qquad
        \widehat{\mathrm{KL}} = \frac1n \sum_i \log p(x_i) - \log q(x_i),\ x_i \sim p

    The estimate is reduced in float64. Rules registered as ``"estimate"`` are evaluated with a
    different seed: by ``method="quadrature"`` for 1-D events (when ``distkl.quadrature`` exists;
    :math:`\sigma_{\mathrm{rule}} = 0`), else by ``method="mc"`` with ``num_samples`` samples,
    :math:`\sigma_{\mathrm{rule}}` from :func:`distkl.montecarlo.kl_mc` (or, without it, taken
    equal to the naive estimate's). A rounding floor ``64 eps (1 + |KL|)`` of the rule's dtype is
    added in quadrature.

    Args:
        p: the first distribution.
        q: the second distribution; ``kl_divergence(p, q)`` must have a rule.
        num_samples: Monte Carlo samples.
        generator: makes the check reproducible (seeds the sampling of ``p``).
        z: pass when ``|z| <= z``; default from ``alpha`` with Bonferroni over the batch.
        alpha: false-failure rate for the default ``z``.

    Returns:
        :class:`CheckResult` with tensors of shape ``broadcast_shapes(p.batch_shape,
        q.batch_shape)``; ``.passed`` overall, ``.element_passed`` per element.

    Raises:
        NotImplementedError: when no KL rule is registered for the pair.
    """
    _check_num_samples(num_samples)
    fn, info = kl_rule_for(type(p), type(q))
    if fn is None:
        raise NotImplementedError(
            f"No KL(p || q) is registered for p type {type(p).__name__} and q type "
            f"{type(q).__name__}; nothing to check."
        )
    kind = info.kind_for(p, q) if info is not None else "exact"
    seed = _seed_from(generator)
    estimate, mc_se = _naive_kl(p, q, num_samples, seed)
    with torch.no_grad():
        value, rule_se, method = _evaluate(
            p, q, lambda: fn(p, q), _kl_mc_stderr(p, q), kind, num_samples, seed ^ 0x5EED
        )
    return _compare(
        _pair_name(p, q),
        "KL",
        value,
        estimate,
        mc_se,
        mc_se if rule_se is None else rule_se,
        num_samples,
        z,
        alpha,
        kind,
        method,
    )


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
    r"""Check ``distkl.js_divergence(p, q, skew=skew)`` (nats) against naive Monte Carlo.

    .. math::
        \widehat{\mathrm{JS}}_\alpha = \frac{\alpha}{n}\sum_i \log\frac{p(x_i)}{m(x_i)}
        + \frac{1-\alpha}{n}\sum_i \log\frac{q(y_i)}{m(y_i)},\quad
        m = \alpha p + (1 - \alpha) q,\ x_i \sim p,\ y_i \sim q

    with ``log m`` by ``logaddexp``; otherwise as :func:`check_kl` (estimate rules' own standard
    error from ``distkl.jsd.jsd_mc`` when it exists).

    Returns:
        :class:`CheckResult` with tensors of shape ``broadcast_shapes(p.batch_shape,
        q.batch_shape)``.

    Raises:
        NotImplementedError: when no JSD rule is registered for the pair.
    """
    from distkl._checks import check_skew

    _check_num_samples(num_samples)
    alpha_skew = check_skew(skew)
    info = jsd_rule_for(type(p), type(q))
    if info is None:
        raise NotImplementedError(
            f"No JSD(p, q) is registered for p type {type(p).__name__} and q type "
            f"{type(q).__name__}; nothing to check."
        )
    seed = _seed_from(generator)
    kind = info.kind_for(p, q)
    estimate, mc_se = _naive_jsd(p, q, alpha_skew, num_samples, seed)
    with torch.no_grad():
        value, rule_se, method = _evaluate(
            p,
            q,
            lambda: js_divergence(p, q, skew=alpha_skew),
            _jsd_mc_stderr(p, q, alpha_skew),
            kind,
            num_samples,
            seed ^ 0x5EED,
        )
    return _compare(
        _pair_name(p, q),
        "JSD",
        value,
        estimate,
        mc_se,
        mc_se if rule_se is None else rule_se,
        num_samples,
        z,
        alpha,
        kind,
        method,
    )


# --------------------------------------------------------------------------------------------
# The runner behind `distkl verify`


@dataclass
class VerifyRow:
    """One check of ``distkl verify``: an example row, a divergence, a device and a dtype."""

    pair: str
    divergence: str
    device: str
    dtype: str
    kind: str
    module: str
    seed: int
    result: Optional[CheckResult] = None
    error: Optional[str] = None
    seconds: float = 0.0
    #: True when the rule does not support this pair (NotImplementedError): reported, not failed.
    unsupported: bool = False
    #: The example row (to rebuild the pair, e.g. for the plot).
    example: Optional[Example] = field(default=None, repr=False, compare=False)

    @property
    def passed(self) -> bool:
        return self.unsupported or (
            self.error is None and self.result is not None and self.result.passed
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pair": self.pair,
            "divergence": self.divergence,
            "device": self.device,
            "dtype": self.dtype,
            "kind": self.kind,
            "module": self.module,
            "passed": self.passed,
            "seconds": round(self.seconds, 4),
        }
        if self.error is not None:
            out["error"] = self.error
            out["unsupported"] = self.unsupported
        if self.result is not None:
            r = self.result
            out.update(
                method=r.method,
                num_samples=r.num_samples,
                shape=list(r.z.shape),
                analytic=_floats(r.analytic),
                estimate=_floats(r.estimate),
                stderr=_floats(r.stderr),
                z=_floats(r.z),
                element_passed=[bool(b) for b in r.element_passed.reshape(-1)],
            )
        return out


def _floats(t: Tensor) -> list[Optional[float]]:
    out: list[Optional[float]] = []
    for v in t.reshape(-1).tolist():
        out.append(
            None
            if math.isnan(v)
            else (v if math.isfinite(v) else (math.inf if v > 0 else -math.inf))
        )
    return out


@dataclass
class VerifyReport:
    """The outcome of :func:`run_verify`."""

    rows: list[VerifyRow]
    #: Registered rules that no example row exercises ("KL Normal-Foo (module)").
    gaps: list[str]
    #: Example rows whose pair has no registered KL rule.
    missing: list[str]
    z_threshold: float
    alpha: float
    num_samples: int
    num_elements: int
    seconds: float = 0.0

    @property
    def failures(self) -> list[VerifyRow]:
        return [r for r in self.rows if not r.passed]

    def passed(self, strict: bool = False) -> bool:
        """No failed check, at least one check run; with ``strict``, no gaps or missing rules."""
        ok = bool(self.rows) and not self.failures
        return ok and not (strict and (self.gaps or self.missing))

    def to_json(self, strict: bool = False) -> dict[str, Any]:
        return {
            "passed": self.passed(strict),
            "alpha": self.alpha,
            "z_threshold": self.z_threshold,
            "num_elements": self.num_elements,
            "num_samples": self.num_samples,
            "seconds": round(self.seconds, 3),
            "rows": [r.to_json() for r in self.rows],
            "gaps": self.gaps,
            "missing": self.missing,
        }

    def table(self) -> str:
        """A fixed-width table, one line per check (the element with the largest ``|z|``)."""
        head = ("pair", "div", "device", "dtype", "kind", "analytic", "MC +- stderr", "z", "ok")
        lines: list[tuple[str, ...]] = [head]
        for r in self.rows:
            kind = r.kind + (
                f"/{r.result.method}" if r.result is not None and r.result.method else ""
            )
            if r.result is None:
                status = "n/a" if r.unsupported else "ERROR"
                lines.append((r.pair, r.divergence, r.device, r.dtype, kind, "-", "-", "-", status))
                continue
            res = r.result
            i = res.worst()
            flat = [
                t.reshape(-1)[i].item() for t in (res.analytic, res.estimate, res.mc_stderr, res.z)
            ]
            n = res.z.numel()
            where = f" [{i}/{n}]" if n > 1 else ""
            lines.append(
                (
                    r.pair,
                    r.divergence,
                    r.device,
                    r.dtype.replace("torch.", ""),
                    kind,
                    f"{flat[0]:.6g}",
                    f"{flat[1]:.6g} +- {flat[2]:.1e}",
                    f"{flat[3]:+.2f}{where}",
                    "ok" if r.passed else "FAIL",
                )
            )
        widths = [max(len(row[c]) for row in lines) for c in range(len(head))]
        out = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        for r in self.rows:
            if r.error is not None:
                label = "unsupported" if r.unsupported else "error"
                out.append(f"{label}: {r.divergence} {r.pair} {r.device} {r.dtype}: {r.error}")
        return "\n".join(out)


def _available_devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _stable_seed(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def _coverage(examples: Sequence[Example]) -> tuple[list[str], list[str]]:
    """(gaps, missing): registered pairs that no row dispatches to, rows without a KL rule."""
    kl_keys, jsd_keys = set(), set()
    missing = []
    for ex in examples:
        p, q = ex.build("cpu", torch.float64)
        fn, info = lookup_kl(type(p), type(q))
        if fn is None:
            missing.append(
                f"example {ex.id}: no KL rule registered for "
                f"({type(p).__name__}, {type(q).__name__})"
            )
        elif info is not None:
            kl_keys.add((info.type_p, info.type_q))
        _, jinfo = lookup_jsd(type(p), type(q))
        if jinfo is not None:
            jsd_keys.add((jinfo.type_p, jinfo.type_q))
    gaps = [
        f"KL rule {r.name} ({r.module}) has no row in distkl.examples.EXAMPLES"
        for r in kl_rules()
        if (r.type_p, r.type_q) not in kl_keys
    ]
    gaps += [
        f"JSD rule {r.name} ({r.module}) has no row in distkl.examples.EXAMPLES"
        for r in jsd_rules()
        if (r.type_p, r.type_q) not in jsd_keys
    ]
    return gaps, missing


def run_verify(
    *,
    devices: Optional[Sequence[str]] = None,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    quick: bool = False,
    num_samples: Optional[int] = None,
    alpha: float = DEFAULT_ALPHA,
    only: Optional[str] = None,
    examples: Optional[Sequence[Example]] = None,
    seed: int = 0,
    progress: Optional[Callable[[str], None]] = None,
) -> VerifyReport:
    r"""Check every registered KL and JSD rule on the example table (``distkl verify``).

    For each row of ``examples`` (default :data:`distkl.examples.EXAMPLES`) whose pair has a KL
    rule (distkl's or torch's), on each device and dtype, run :func:`check_kl`, and
    :func:`check_jsd` when a JSD rule is registered for the pair. One z threshold serves the whole
    run: Bonferroni over every batch element checked, for a false-failure rate ``alpha``.

    Args:
        devices: default every available one (``"cpu"``, and ``"cuda"`` when present).
        dtypes: default ``(torch.float32, torch.float64)``.
        quick: :data:`QUICK_SAMPLES` samples instead of :data:`DEFAULT_SAMPLES`.
        num_samples: overrides both.
        alpha: family-wise false-failure rate.
        only: keep the rows whose id contains this substring.
        seed: base seed; each check's seed derives from it and the check's name.
        progress: called with a line of text before each check.
    """
    start = time.perf_counter()
    devices = list(devices) if devices is not None else _available_devices()
    dtypes = list(dtypes) if dtypes is not None else [torch.float32, torch.float64]
    n = num_samples if num_samples is not None else (QUICK_SAMPLES if quick else DEFAULT_SAMPLES)
    _check_num_samples(n)
    table = list(examples) if examples is not None else list(EXAMPLES)
    gaps, missing = _coverage(table)
    chosen = [ex for ex in table if only is None or only in ex.id]
    missing = [m for m in missing if only is None or only in m.split(":")[0]]

    plan: list[tuple[Example, str, str, str, int]] = []  # (row, divergence, kind, module, numel)
    for ex in chosen:
        p, q = ex.build("cpu", torch.float64)
        numel = torch.broadcast_shapes(p.batch_shape, q.batch_shape).numel()
        fn, info = kl_rule_for(type(p), type(q))
        if fn is not None:
            module = info.module if info is not None else f"{fn.__module__} (torch)"
            plan.append((ex, "KL", info.kind_for(p, q) if info else "exact", module, numel))
        jinfo = jsd_rule_for(type(p), type(q))
        if jinfo is not None:
            plan.append((ex, "JSD", jinfo.kind_for(p, q), jinfo.module, numel))
    num_elements = sum(t[4] for t in plan) * len(devices) * len(dtypes)
    zstar = z_threshold(max(num_elements, 1), alpha)

    rows: list[VerifyRow] = []
    total = len(plan) * len(devices) * len(dtypes)
    k = 0
    for ex, div, kind, module, _ in plan:
        for device in devices:
            for dtype in dtypes:
                k += 1
                dname = str(dtype).replace("torch.", "")
                row_seed = _stable_seed(seed, ex.id, div, device, dname)
                row = VerifyRow(ex.id, div, device, dname, kind, module, row_seed, example=ex)
                if progress is not None:
                    progress(f"[{k}/{total}] {div} {ex.id} {device} {dname}")
                t0 = time.perf_counter()
                g = torch.Generator().manual_seed(row_seed)
                try:
                    p, q = ex.build(device, dtype)
                    check = check_kl if div == "KL" else check_jsd
                    row.result = check(p, q, num_samples=n, generator=g, z=zstar)
                except NotImplementedError as e:
                    row.error = f"{type(e).__name__}: {e}"
                    row.unsupported = div == "JSD"
                except Exception as e:  # a rule that raises is a failed check, reported
                    row.error = f"{type(e).__name__}: {e}"
                row.seconds = time.perf_counter() - t0
                rows.append(row)
    return VerifyReport(
        rows=rows,
        gaps=gaps,
        missing=missing,
        z_threshold=zstar,
        alpha=alpha,
        num_samples=n,
        num_elements=num_elements,
        seconds=time.perf_counter() - start,
    )


def plot_convergence(report: VerifyReport, path: str, *, max_panels: int = 24) -> None:
    r"""Draw the running Monte Carlo estimate of each KL check converging on the rule's value.

    One panel per KL example row (its first device and dtype), for the batch element with the
    largest ``|z|``: the running mean of ``log p(x) - log q(x)`` against the number of samples,
    its band :math:`\pm z^* s / \sqrt{n}`, and the rule's value. Needs matplotlib (the ``plot``
    extra).

    Raises:
        ImportError: when matplotlib is not installed, naming the extra to install.
    """
    figure_cls = _figure_class()
    seen: dict[str, VerifyRow] = {}
    for r in report.rows:
        if r.divergence == "KL" and r.result is not None and r.pair not in seen:
            seen[r.pair] = r
    chosen = list(seen.values())[:max_panels]
    if not chosen:
        raise ValueError("no KL check in the report to plot.")
    ncols = min(3, len(chosen))
    nrows = math.ceil(len(chosen) / ncols)
    fig = figure_cls(figsize=(5.0 * ncols, 3.2 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, row in zip(axes.reshape(-1), chosen):
        res = row.result
        assert res is not None
        i = res.worst()
        assert row.example is not None
        p, q = row.example.build(row.device, getattr(torch, row.dtype))
        seed = _seed_from(torch.Generator().manual_seed(row.seed))
        p = _expanded(p, torch.broadcast_shapes(p.batch_shape, q.batch_shape))
        values = []
        with _seeded(seed), torch.no_grad():
            for m in _chunks(res.num_samples):
                lr = _log_ratio(p, q, m).to(torch.float64).cpu()
                values.append(lr.expand(m, *res.z.shape).reshape(m, -1)[:, i])
        v = torch.cat(values)
        count = torch.arange(1, v.numel() + 1, dtype=torch.float64)
        shifted = v - v.mean()  # running moments of shifted values: no cancellation
        s1, s2 = shifted.cumsum(0), (shifted**2).cumsum(0)
        mean = s1 / count + v.mean()
        var = (s2 - s1**2 / count) / (count - 1).clamp(min=1)
        band = res.z_threshold * (var.clamp(min=0) / count).sqrt()
        start = min(50, v.numel() - 1)
        xs, ms, bs = count[start:].numpy(), mean[start:].numpy(), band[start:].numpy()
        exact = res.analytic.reshape(-1)[i].item()
        ax.fill_between(xs, ms - bs, ms + bs, alpha=0.3, label=f"MC +- {res.z_threshold:.2f} s.e.")
        ax.plot(xs, ms, lw=1, label="running MC estimate")
        ax.axhline(exact, color="k", ls="--", lw=1, label=f"rule ({res.kind})")
        ax.set_xscale("log")
        ax.set_title(f"KL({row.pair}) [{i}]\n{row.device} {row.dtype}", fontsize=8)
        ax.set_xlabel("samples")
        ax.set_ylabel("nats")
    for ax in axes.reshape(-1)[len(chosen) :]:
        ax.set_visible(False)
    axes.reshape(-1)[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _figure_class() -> Any:
    """``matplotlib.figure.Figure`` (no pyplot, no backend switch), or a clear ImportError."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "distkl verify --plot needs matplotlib; install it with: pip install 'distkl[plot]'"
        ) from None
    return Figure
