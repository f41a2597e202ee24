r"""A small VAE with four priors, each KL term from ``torch.distributions.kl_divergence``.

The data are procedurally drawn 8x8 binary glyphs (bars, diagonals, boxes, crosses, blocks) with
pixel noise, so nothing is downloaded. The encoder gives a diagonal Normal posterior
``q(z|x) = Independent(Normal(mu(x), sigma(x)), 1)`` on a 2-D latent and the decoder a Bernoulli
likelihood. The ELBO, in nats per image,

    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z)),

is trained with four priors ``p(z)``:

* ``normal``: standard Normal; torch's own closed form (Independent(Normal) pair).
* ``mvn``: MultivariateNormal with a learnable mean and Cholesky factor; distkl's exact
  KL(Independent(Normal, 1) || MultivariateNormal).
* ``mixture-mc``: learnable K-component Gaussian mixture
  ``MixtureSameFamily(Categorical(logits), Independent(Normal(loc, softplus(raw_scale)), 1))``;
  ``distkl.kl_mc(q, prior, samples=z)`` at the sample ``z`` drawn for the reconstruction term
  (unbiased, pathwise gradient, no second sampling pass); the CLI prints its step time next to
  the naive single-sample estimate.
* ``mixture-variational``: the same prior with ``method="variational"`` (Hershey & Olsen 2007).
  For a single-Gaussian q it equals :math:`-\log \sum_k w_k e^{-KL(q \| p_k)}`, which is an
  *upper* bound on KL(q || p) (the KL of the joint over (z, k) bounds the marginal's), so the
  objective stays a lower bound on log p(x).

``mixture-unscented`` (not part of ``all``) trains with the unscented transform, an approximation
that is neither bound, as a warning: the learned prior grows narrow spikes on the posterior's
2D+1 sigma points, the training "ELBO" looks fine and the true test KL explodes (thousands of nats
after 2000 steps). Train on a bound or an unbiased estimate.

Test ELBOs are computed the same way for every prior: the closed form where there is one, and
Monte Carlo with 512 samples per image (fixed generator) for the mixtures, so the column compares
models, not KL methods.

Usage::

    python examples/vae.py                       # all priors, under a minute of CPU time
    python examples/vae.py --prior mixture-mc --steps 500 --out /tmp/vae
    python examples/vae.py --prior normal --free-bits 0.5 --warmup 300

Writes ``elbo.png`` (ELBO curves) and ``latent.png`` (posterior means of test images coloured by
glyph class, over the learned prior's density) to ``--out`` when matplotlib is installed
(``pip install distkl[plot]``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

import distkl
from distkl.latent import kl_annealing, kl_free_bits

PRIORS = ("normal", "mvn", "mixture-mc", "mixture-variational")
EXTRA_PRIORS = ("mixture-unscented",)
KL_METHOD = {
    "normal": "exact (torch)",
    "mvn": "exact (distkl)",
    "mixture-mc": "Monte Carlo",
    "mixture-variational": "variational bound",
    "mixture-unscented": "unscented approx.",
}
CLASSES = ("hbar", "vbar", "diag", "anti", "box", "plus", "block")
SIDE = 8
LATENT = 2


# ---------------------------------------------------------------------------------------------
# Data: 8x8 binary glyphs, generated.


def make_glyphs(
    n: int, *, seed: int, flip: float = 0.03
) -> tuple[Tensor, Tensor]:
    """``n`` random 8x8 binary glyphs ``(n, 64)`` (float 0/1) and their class labels ``(n,)``.

    Each class is a shape with a random position (and length/size): horizontal bar, vertical bar,
    diagonal, anti-diagonal, box outline, plus sign, filled block. Every pixel is then flipped with
    probability ``flip``.
    """
    g = torch.Generator().manual_seed(seed)

    def randint(low: int, high: int) -> Tensor:  # inclusive bounds, shape (n, 1, 1)
        return torch.randint(low, high + 1, (n, 1, 1), generator=g)

    label = torch.randint(0, len(CLASSES), (n,), generator=g)
    i = torch.arange(SIDE).view(1, SIDE, 1)
    j = torch.arange(SIDE).view(1, 1, SIDE)
    r, c = randint(1, 6), randint(1, 6)
    lo, hi = randint(0, 2), randint(5, 7)
    off = randint(-2, 2)
    top, left, size = randint(0, 2), randint(0, 2), randint(4, 5)
    in_box = (i >= top) & (i <= top + size) & (j >= left) & (j <= left + size)
    on_edge = (i == top) | (i == top + size) | (j == left) | (j == left + size)
    masks = torch.stack(
        [
            (i == r) & (j >= lo) & (j <= hi),  # hbar
            (j == c) & (i >= lo) & (i <= hi),  # vbar
            (j - i == off),  # diag
            (i + j == SIDE - 1 + off),  # anti
            in_box & on_edge,  # box
            ((i == r) & (j >= 1) & (j <= 6)) | ((j == c) & (i >= 1) & (i <= 6)),  # plus
            (i >= top + 1) & (i <= top + 3) & (j >= left + 1) & (j <= left + 3),  # block
        ]
    )  # (classes, n, 8, 8)
    x = masks[label, torch.arange(n)].float()
    noise = torch.rand(x.shape, generator=g) < flip
    x = torch.where(noise, 1.0 - x, x)
    return x.reshape(n, SIDE * SIDE), label


# ---------------------------------------------------------------------------------------------
# Model: MLP encoder/decoder, and the priors as modules that build a distribution.


class Encoder(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(SIDE * SIDE, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, 2 * LATENT),
        )

    def forward(self, x: Tensor) -> Independent:
        loc, raw = self.net(x).chunk(2, dim=-1)
        return Independent(Normal(loc, F.softplus(raw) + 1e-4), 1)


class Decoder(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(LATENT, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, SIDE * SIDE),
        )

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)  # Bernoulli logits


class StandardNormalPrior(nn.Module):
    loc: Tensor
    scale: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("loc", torch.zeros(LATENT))
        self.register_buffer("scale", torch.ones(LATENT))

    def forward(self) -> Distribution:
        return Independent(Normal(self.loc, self.scale), 1)


class FullCovariancePrior(nn.Module):
    """MultivariateNormal with learnable mean and Cholesky factor, initialised correlated."""

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        a = torch.randn(LATENT, LATENT, generator=generator)
        tril = torch.linalg.cholesky(a @ a.T / LATENT + 0.5 * torch.eye(LATENT))
        self.loc = nn.Parameter(torch.zeros(LATENT))
        self.off_diag = nn.Parameter(tril.tril(-1))
        self.raw_diag = nn.Parameter(tril.diagonal().expm1().log())  # softplus^-1

    def forward(self) -> Distribution:
        scale_tril = self.off_diag.tril(-1) + torch.diag_embed(F.softplus(self.raw_diag) + 1e-4)
        return MultivariateNormal(self.loc, scale_tril=scale_tril)


class MixturePrior(nn.Module):
    """K-component diagonal Gaussian mixture with learnable weights, means and scales."""

    def __init__(self, generator: torch.Generator, components: int = 8) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        self.loc = nn.Parameter(1.5 * torch.randn(components, LATENT, generator=generator))
        self.raw_scale = nn.Parameter(torch.full((components, LATENT), math.log(math.expm1(0.7))))

    def forward(self) -> Distribution:
        comp = Independent(Normal(self.loc, F.softplus(self.raw_scale) + 1e-4), 1)
        return MixtureSameFamily(Categorical(logits=self.logits), comp)


def _register_rules(prior: str) -> None:
    """Make sure distkl's KL rules for the prior's pair are registered with torch."""
    if prior == "mvn":
        importlib.import_module("distkl.rules.normal")
    elif prior.startswith("mixture"):
        importlib.import_module("distkl.rules.mixture")


def _make_prior(prior: str, generator: torch.Generator) -> nn.Module:
    if prior == "normal":
        return StandardNormalPrior()
    if prior == "mvn":
        return FullCovariancePrior(generator)
    return MixturePrior(generator)


def _kl_context(
    prior: str, *, num_samples: int, generator: torch.Generator
) -> contextlib.AbstractContextManager[Any]:
    """The distkl options under which KL(q || prior) is computed for training."""
    if prior == "mixture-mc":
        return distkl.options(method="mc", num_samples=num_samples, generator=generator)
    if prior == "mixture-variational":
        return distkl.options(method="variational")
    if prior == "mixture-unscented":
        return distkl.options(method="unscented")
    return contextlib.nullcontext()


def _log_likelihood(decoder: Decoder, z: Tensor, x: Tensor) -> Tensor:
    """``log p(x | z)`` summed over pixels: shape ``z.shape[:-1]``."""
    logits = decoder(z)
    return -F.binary_cross_entropy_with_logits(
        logits, x.expand_as(logits), reduction="none"
    ).sum(-1)


# ---------------------------------------------------------------------------------------------
# Training.


@dataclass
class History:
    """What :func:`train` records. ELBO, reconstruction and KL are in nats per image."""

    prior: str
    steps: list[int] = field(default_factory=list)
    elbo: list[float] = field(default_factory=list)  # minibatch ELBO at each step (beta = 1)
    recon: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_elbo: list[float] = field(default_factory=list)  # test-set ELBO, same method for all
    eval_recon: list[float] = field(default_factory=list)
    eval_kl: list[float] = field(default_factory=list)
    seconds: float = 0.0
    latent: Optional[Tensor] = None  # (n_test, 2) posterior means after training
    labels: Optional[Tensor] = None  # (n_test,)
    prior_dist: Optional[Distribution] = None  # the learned prior, detached, on the CPU


def train(
    prior: str,
    steps: int,
    seed: int,
    *,
    batch_size: int = 128,
    lr: float = 5e-3,
    num_train: int = 16384,
    num_test: int = 512,
    mc_samples: int = 16,
    eval_every: Optional[int] = None,
    eval_samples: int = 512,
    beta: float = 1.0,
    warmup: int = 0,
    free_bits: float = 0.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> History:
    r"""Train the VAE with one prior; return its :class:`History`.

    The loss is ``-E_q[log p(x|z)] + beta_t * KL~``, with one reparameterised sample of ``z`` per
    image, ``beta_t = kl_annealing(t, warmup=warmup, end=beta)`` and ``KL~`` the free-bits KL
    (:func:`distkl.latent.kl_free_bits`: per latent dimension for the factorised ``normal`` prior,
    the whole latent as one group otherwise); with the defaults it is the negative ELBO. The
    recorded ``elbo`` is always the unweighted, unclamped ``E_q[log p(x|z)] - KL``.

    Args:
        prior: one of ``PRIORS`` or ``"mixture-unscented"``.
        steps: optimiser steps (Adam).
        seed: seeds the data, the initialisation, the minibatches and all sampling.
        mc_samples: Monte Carlo samples per KL for ``mixture-mc`` during training.
        eval_every: steps between test-set evaluations (default ``steps // 10``); step 0 and the
            last step are always evaluated.
        eval_samples: Monte Carlo samples per image for the test KL of mixture priors.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    if prior not in PRIORS + EXTRA_PRIORS:
        raise ValueError(f"prior must be one of {PRIORS + EXTRA_PRIORS}, got {prior!r}.")
    _register_rules(prior)
    device = torch.device(device)
    g_init = torch.Generator().manual_seed(seed)
    x_train, _ = make_glyphs(num_train, seed=seed)
    x_test, y_test = make_glyphs(num_test, seed=seed + 10_000)
    x_train = x_train.to(device, dtype)
    x_test = x_test.to(device, dtype)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder, decoder = Encoder(), Decoder()
    prior_net = _make_prior(prior, g_init)
    modules = nn.ModuleList([encoder, decoder, prior_net]).to(device, dtype)
    opt = torch.optim.Adam(modules.parameters(), lr=lr)

    g = torch.Generator(device=device).manual_seed(seed + 1)  # minibatches, z, MC
    g_eval = torch.Generator(device=device).manual_seed(seed + 2)
    eps_eval = torch.randn(8, num_test, LATENT, generator=g_eval, device=device, dtype=dtype)
    eval_every = max(1, steps // 10) if eval_every is None else eval_every
    per_dim = prior == "normal"
    hist = History(prior)

    def evaluate(step: int) -> None:
        with torch.no_grad():
            q = encoder(x_test)
            p = prior_net()
            z = q.base_dist.loc + q.base_dist.scale * eps_eval  # common random numbers
            recon = _log_likelihood(decoder, z, x_test).mean()
            gen = torch.Generator(device=device).manual_seed(seed + 3)
            with distkl.options(method="mc", num_samples=eval_samples, generator=gen):
                kl = kl_divergence(q, p).mean()
        hist.eval_steps.append(step)
        hist.eval_recon.append(recon.item())
        hist.eval_kl.append(kl.item())
        hist.eval_elbo.append((recon - kl).item())

    start = time.perf_counter()
    evaluate(0)
    for step in range(1, steps + 1):
        idx = torch.randint(0, num_train, (batch_size,), generator=g, device=device)
        x = x_train[idx]
        q = encoder(x)
        p = prior_net()
        eps = torch.randn(x.shape[0], LATENT, generator=g, device=device, dtype=dtype)
        z = q.base_dist.loc + q.base_dist.scale * eps
        recon = _log_likelihood(decoder, z, x).mean()
        if prior == "mixture-mc":
            # Shared sample: the KL at the z drawn for the reconstruction term (one prior
            # log_prob, pathwise gradient through z, analytic entropy as a fitted control).
            kl = distkl.kl_mc(q, p, samples=z).value.mean()
        else:
            with _kl_context(prior, num_samples=mc_samples, generator=g):
                kl = kl_divergence(q, p).mean()  # minibatch mean of KL(q(z|x) || p(z))
        if free_bits > 0 and per_dim:
            kl_reg = kl_free_bits(posterior=q, prior=p, free_bits=free_bits)  # per latent dim
        elif free_bits > 0:
            # = kl_free_bits(posterior=q, prior=p, free_bits=..., per_dimension=False), once
            kl_reg = kl.clamp(min=free_bits)
        else:
            kl_reg = kl
        weight = kl_annealing(step - 1, warmup=warmup, end=beta)
        loss = -recon + weight * kl_reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.steps.append(step)
        hist.recon.append(recon.item())
        hist.kl.append(kl.item())
        hist.elbo.append(recon.item() - kl.item())
        if step % eval_every == 0 or step == steps:
            evaluate(step)
    hist.seconds = time.perf_counter() - start

    with torch.no_grad():
        hist.latent = encoder(x_test).base_dist.loc.cpu().float()
        hist.labels = y_test
        hist.prior_dist = _detached(prior_net)
    return hist


def kl_step_times(repeat: int = 101, batch: int = 128) -> tuple[float, float]:
    """Median CPU seconds (one thread) of the KL term of one step (forward + backward):
    ``kl_mc(q, p, samples=z)`` vs the naive ``q.log_prob(z) - p.log_prob(z)`` at the same ``z``."""
    g = torch.Generator().manual_seed(0)
    prior_net = MixturePrior(g)
    loc = torch.randn(batch, LATENT, generator=g).requires_grad_()
    raw = torch.zeros(batch, LATENT).requires_grad_()

    def step(shared: bool) -> None:
        q = Independent(Normal(loc, F.softplus(raw) + 1e-4), 1)
        p = prior_net()
        z = q.rsample()
        kl = distkl.kl_mc(q, p, samples=z).value if shared else q.log_prob(z) - p.log_prob(z)
        kl.mean().backward()

    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeat):
        for shared, out in ((True, times[0]), (False, times[1])):
            t0 = time.thread_time()  # CPU time of this thread: robust on a shared machine
            step(shared)
            out.append(time.thread_time() - t0)
    return tuple(sorted(t)[len(t) // 2] for t in times)  # type: ignore[return-value]


def _detached(prior_net: nn.Module) -> Distribution:
    """The learned prior rebuilt from CPU float32 copies of its parameters (for plotting)."""
    state = {k: v.detach().cpu().float() for k, v in prior_net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    new: nn.Module
    if isinstance(prior_net, MixturePrior):
        new = MixturePrior(g, components=prior_net.logits.shape[0])
    elif isinstance(prior_net, FullCovariancePrior):
        new = FullCovariancePrior(g)
    else:
        new = StandardNormalPrior()
    new.load_state_dict(state)
    return new.requires_grad_(False)()


# ---------------------------------------------------------------------------------------------
# Reporting.


def window_mean(values: Sequence[float], frac: float = 0.1) -> float:
    """Mean of the last ``frac`` of ``values`` (at least one)."""
    k = max(1, int(len(values) * frac))
    return sum(values[-k:]) / k


def table(histories: Sequence[History]) -> str:
    """The per-prior ELBO table (nats per image; higher is better)."""
    head = (
        f"{'prior':<22}{'KL in training':<20}{'train ELBO':>11}{'test ELBO':>11}"
        f"{'test recon':>12}{'test KL':>9}{'time s':>8}"
    )
    lines = [head, "-" * len(head)]
    for h in histories:
        lines.append(
            f"{h.prior:<22}{KL_METHOD[h.prior]:<20}{window_mean(h.elbo):>11.2f}"
            f"{h.eval_elbo[-1]:>11.2f}{h.eval_recon[-1]:>12.2f}{h.eval_kl[-1]:>9.2f}"
            f"{h.seconds:>8.1f}"
        )
    return "\n".join(lines)


def plot(histories: Sequence[History], out: Path) -> list[Path]:
    """Write ``elbo.png`` and ``latent.png`` to ``out``; return their paths (none without
    matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping elbo.png and latent.png "
              "(pip install 'distkl[plot]' to get them).")
        return []
    out.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for h in histories:
        k = max(1, len(h.elbo) // 50)
        smooth = torch.tensor(h.elbo).unfold(0, k, 1).mean(-1)  # moving average
        (line,) = ax.plot(h.eval_steps, h.eval_elbo, "o-", ms=3, label=f"{h.prior} (test)")
        ax.plot(h.steps[k - 1:], smooth, color=line.get_color(), alpha=0.35, lw=1)
    finals = [h.eval_elbo[-1] for h in histories]
    ax.set_ylim(min(finals) - 12, max(finals) + 3)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (nats per image)")
    ax.set_title("VAE on 8x8 glyphs: test ELBO (markers), training minibatch ELBO (faint)")
    ax.legend()
    fig.tight_layout()
    elbo_png = out / "elbo.png"
    fig.savefig(elbo_png, dpi=120)
    plt.close(fig)

    n = len(histories)
    fig, axes = plt.subplots(1, n, figsize=(max(3.6 * n, 7.0), 4.2), squeeze=False)
    for ax, h in zip(axes[0], histories):
        assert h.latent is not None and h.labels is not None and h.prior_dist is not None
        lat = h.latent
        lim = float(lat.abs().max()) * 1.15 + 0.5
        grid = torch.linspace(-lim, lim, 150)
        gx, gy = torch.meshgrid(grid, grid, indexing="xy")
        log_dens = h.prior_dist.log_prob(torch.stack([gx, gy], -1))
        top = float(log_dens.max())
        levels = [top - d for d in (8.0, 6.0, 4.0, 3.0, 2.0, 1.0, 0.5)]  # log-density contours
        ax.contour(gx, gy, log_dens, levels=levels, colors="0.6", linewidths=0.7,
                   linestyles="solid")
        sc = ax.scatter(lat[:, 0], lat[:, 1], c=h.labels, cmap="tab10", s=5,
                        vmin=-0.5, vmax=9.5)
        ax.set_title(f"{h.prior}\ntest ELBO {h.eval_elbo[-1]:.2f}", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    handles = [
        plt.Line2D([], [], ls="", marker="o", color=sc.cmap(sc.norm(i)), label=name)
        for i, name in enumerate(CLASSES)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(CLASSES), fontsize=8)
    fig.suptitle("posterior means of test glyphs; contours: learned prior log-density, "
                 "0.5 to 8 nats below its peak", fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    latent_png = out / "latent.png"
    fig.savefig(latent_png, dpi=120)
    plt.close(fig)
    return [elbo_png, latent_png]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="all", choices=[*PRIORS, *EXTRA_PRIORS, "all"])
    parser.add_argument("--steps", type=int, default=2000, help="optimiser steps per prior")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("vae_out"), help="folder for the PNGs")
    parser.add_argument("--mc-samples", type=int, default=16,
                        help="Monte Carlo samples per KL for mixture-mc")
    parser.add_argument("--beta", type=float, default=1.0, help="KL weight after warm-up")
    parser.add_argument("--warmup", type=int, default=0, help="KL annealing steps (linear)")
    parser.add_argument("--free-bits", type=float, default=0.0,
                        help="free bits lambda in nats (per dimension for the normal prior)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    # The matrices are tiny: one thread is fastest (several threads contend on a 2-core machine).
    torch.set_num_threads(1)

    priors = PRIORS if args.prior == "all" else (args.prior,)
    histories = []
    for name in priors:
        print(f"training with the {name} prior ({args.steps} steps) ...", flush=True)
        histories.append(
            train(name, args.steps, args.seed, mc_samples=args.mc_samples, beta=args.beta,
                  warmup=args.warmup, free_bits=args.free_bits, device=args.device)
        )
    print()
    print("ELBO in nats per image (higher is better); train = mean of the last 10% of steps;")
    print("test KL: closed form, or Monte Carlo with 512 samples per image for mixtures.")
    print(table(histories))
    if "mixture-mc" in priors:
        ours, naive = kl_step_times()
        print(f"KL of one training step (batch 128, K=8 mixture prior, fwd+bwd, median): "
              f"distkl shared-sample {1e3 * ours:.3f} ms, naive single-sample {1e3 * naive:.3f} ms")
    for path in plot(histories, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
