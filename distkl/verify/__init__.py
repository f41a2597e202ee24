r"""Check registered divergences against independent Monte Carlo estimates (`distkl verify`).

- `distkl.verify.statistics`: the z-tests `check_kl`, `check_jsd`, `check_values` and the
  Bonferroni threshold `z_threshold`;
- `distkl.verify.run`: `plan_verify` / `execute_plan` / `run_verify` over the example table;
- `distkl.verify.report`: `VerifyRow`, `VerifyReport` (table, legend, failures, JSON);
- `distkl.verify.plot`: `plot_convergence` (matplotlib, imported only when drawing).

Which rule runs for a pair, and its kind, comes from `distkl.registry.lookup_kl` /
`lookup_jsd`: the verifier re-implements no dispatch.
"""

from distkl.verify.plot import plot_convergence
from distkl.verify.report import VerifyReport, VerifyRow
from distkl.verify.run import (
    DEFAULT_SAMPLES,
    QUICK_SAMPLES,
    VerifyPlan,
    execute_plan,
    plan_verify,
    run_verify,
)
from distkl.verify.statistics import (
    CHECK_SAMPLES,
    DEFAULT_ALPHA,
    CheckResult,
    check_jsd,
    check_kl,
    check_values,
    z_threshold,
)

__all__ = [
    "CHECK_SAMPLES",
    "DEFAULT_ALPHA",
    "DEFAULT_SAMPLES",
    "QUICK_SAMPLES",
    "CheckResult",
    "VerifyPlan",
    "VerifyReport",
    "VerifyRow",
    "check_jsd",
    "check_kl",
    "check_values",
    "execute_plan",
    "plan_verify",
    "plot_convergence",
    "run_verify",
    "z_threshold",
]
