r"""`distkl verify --plot`: the running Monte Carlo estimate of each KL check converging.

Needs matplotlib (the `plot` extra), imported only here and only when a plot is drawn.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from distkl.verify.report import VerifyReport, VerifyRow, short_name
from distkl.verify.sampling import log_ratio_chunks, sampling_seed

__all__ = ["figure_class", "plot_convergence"]

_NCOLS = 4


def figure_class() -> Any:
    """`matplotlib.figure.Figure` (no pyplot, no backend switch), or a clear ImportError."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "distkl verify --plot needs matplotlib; install it with: pip install 'distkl[plot]'"
        ) from None
    return Figure


def _running_mean(row: VerifyRow, index: int) -> tuple[Tensor, Tensor, Tensor]:
    """`(n, running mean, running s.e.)` of the check's own samples for one batch element."""
    res, ex = row.result, row.example
    assert res is not None and ex is not None
    p, q = ex.build(row.device, getattr(torch, row.dtype))
    seed = sampling_seed(torch.Generator().manual_seed(row.seed))
    shape = res.z.shape
    chunks = [
        lr.to(torch.float64).cpu().expand(lr.shape[0], *shape).reshape(lr.shape[0], -1)[:, index]
        for lr in log_ratio_chunks(p, q, res.num_samples, seed)
    ]
    v = torch.cat(chunks)
    count = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    shifted = v - v.mean()  # running moments of shifted values: no cancellation
    s1, s2 = shifted.cumsum(0), (shifted**2).cumsum(0)
    mean = s1 / count + v.mean()
    var = (s2 - s1**2 / count) / (count - 1).clamp(min=1)
    return count, mean, (var.clamp(min=0) / count).sqrt()


def _panel(ax: Any, rows: list[VerifyRow], zstar: float) -> None:
    """One pair: a running estimate and band per device and dtype, and each rule's value."""
    first = rows[0].result
    assert first is not None
    i = first.worst()
    for row in rows:
        res = row.result
        assert res is not None
        count, mean, se = _running_mean(row, i)
        start = min(50, count.numel() - 1)
        xs, ms, bs = count[start:].numpy(), mean[start:].numpy(), zstar * se[start:].numpy()
        label = f"{row.device} {row.dtype}"
        line = ax.plot(xs, ms, lw=1, label=f"MC, {label}")[0]
        ax.fill_between(xs, ms - bs, ms + bs, alpha=0.2, color=line.get_color())
        rule = res.analytic.reshape(-1)[i].item()
        ax.axhline(rule, color=line.get_color(), ls="--", lw=1, label=f"rule ({res.kind}), {label}")
    family = rows[0].example.family if rows[0].example is not None else ""
    ax.set_xscale("log")
    ax.set_title(f"{family}: KL({short_name(rows[0].pair)}) [{i}]", fontsize=8)
    ax.set_xlabel("samples", fontsize=7)
    ax.set_ylabel("nats", fontsize=7)
    ax.legend(fontsize=5)


def plot_convergence(report: VerifyReport, path: str) -> None:
    r"""Draw every KL check's running Monte Carlo estimate converging on the rule's value.

    One panel per example pair, grouped by family, for the batch element with the largest
    $|z|$; in each panel one running mean of $\log p(x) - \log q(x)$ with its band
    $\pm z^* s / \sqrt{n}$ per device and dtype checked, and the rule's value for each.

    Args:
        report: a `VerifyReport` from `run_verify`.
        path: the image to write (any format matplotlib writes, by extension).

    Raises:
        ImportError: when matplotlib is not installed, naming the extra to install.
        ValueError: when the report has no KL check that ran.
    """
    figure = figure_class()
    pairs: dict[str, list[VerifyRow]] = {}
    for r in report.rows:
        if r.divergence == "KL" and r.result is not None and r.example is not None:
            pairs.setdefault(r.pair, []).append(r)
    if not pairs:
        raise ValueError("no KL check in the report to plot.")
    groups = sorted(pairs.values(), key=lambda rows: rows[0].example.family)  # type: ignore[union-attr]
    ncols = min(_NCOLS, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = figure(figsize=(4.2 * ncols, 3.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).reshape(-1)
    for ax, rows in zip(axes, groups):
        _panel(ax, rows, report.z_threshold)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
