r"""Old home of the Jensen-Shannon rules, kept only for the names others still import.

Every JSD rule now lives with its family: categorical pairs in `distkl.rules.categorical`,
Normal families and every `MixtureSameFamily` pair in `distkl.rules.mixture` (one method table
for KL and JSD). `jsd_mc` lives in `distkl.montecarlo`, `js_from_log_probs` in
`distkl._logspace`. Delete this module once nothing imports it.
"""

from __future__ import annotations

from distkl._logspace import js_from_log_probs
from distkl.montecarlo import jsd_mc
from distkl.rules.mixture import JSD_SUPPORTED as SUPPORTED

__all__ = ["jsd_mc", "js_from_log_probs", "SUPPORTED"]
