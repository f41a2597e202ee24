r"""Bayes by backprop with a scale-mixture prior: distkl's deterministic 1-D KL vs one sample.

A regression network (2 hidden layers of 100 units by default) has a factorised Normal
posterior $q(w) = \mathcal N(\mu, \sigma^2)$ on every weight and the scale-mixture prior of
Blundell et al. (2015), "Weight Uncertainty in Neural Networks", eq. (7):

$$
p(w) = \tfrac12\,\mathcal N(w; 0, e^{-2}) + \tfrac12\,\mathcal N(w; 0, e^{-14}).
$$

It maximises the ELBO $\mathbb E_q[\log p(y \mid x, w)] - \mathrm{KL}(q \| p)$ twice, from the
same seed:

* ``kl="distkl"``: ``torch.distributions.kl_divergence(posterior, prior)``, which distkl
  answers deterministically (the registered rule's default: 1-D quadrature, the single-Normal
  fast path);
* ``kl="sample"``: the single-sample estimate $\log q(w) - \log p(w)$ at the weights drawn for
  the likelihood term (what the paper does).

It prints each run's wall time, final ELBO (per data point) and test log-likelihood.

Usage: ``python examples/bayes_by_backprop.py [--steps 400] [--hidden 100] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Categorical, MixtureSameFamily, Normal, kl_divergence

import distkl  # noqa: F401  (registers the Normal-vs-mixture KL rule)

NOISE = 0.1  # standard deviation of the observation noise


def make_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``y = sin(3x) + x^2 / 4 + noise`` on ``x ~ U(-2, 2)``: shapes ``(n, 1)`` and ``(n,)``."""
    x = torch.rand(n, 1, generator=generator) * 4.0 - 2.0
    y = torch.sin(3.0 * x[:, 0]) + 0.25 * x[:, 0].square()
    return x, y + NOISE * torch.randn(n, generator=generator)


def scale_mixture_prior() -> MixtureSameFamily:
    """Blundell et al.'s prior: weights 1/2, scales e^-1 and e^-7, both centred at 0."""
    return MixtureSameFamily(
        Categorical(probs=torch.tensor([0.5, 0.5])),
        Normal(torch.zeros(2), torch.tensor([math.exp(-1.0), math.exp(-7.0)])),
    )


class BayesMLP(torch.nn.Module):
    """Fully connected tanh network whose weights and biases all have Normal posteriors."""

    def __init__(self, sizes: Sequence[int], generator: torch.Generator) -> None:
        super().__init__()
        shapes = [s for a, b in zip(sizes, sizes[1:]) for s in ((b, a), (b,))]
        self.loc = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, generator=generator) * 0.1) for s in shapes
        )
        self.rho = torch.nn.ParameterList(torch.nn.Parameter(torch.full(s, -5.0)) for s in shapes)

    def posterior(self) -> Normal:
        """One Normal over every parameter, flattened: batch shape ``(num_weights,)``."""
        loc = torch.cat([p.reshape(-1) for p in self.loc])
        scale = F.softplus(torch.cat([p.reshape(-1) for p in self.rho])) + 1e-6
        return Normal(loc, scale)

    def forward(self, x: Tensor, weights: Tensor) -> Tensor:
        """Network output ``(n,)`` for one flat weight vector."""
        h, start = x, 0
        layers = len(self.loc) // 2
        for i in range(layers):
            w_shape, b_shape = self.loc[2 * i].shape, self.loc[2 * i + 1].shape
            w = weights[start : start + w_shape.numel()].reshape(w_shape)
            start += w_shape.numel()
            b = weights[start : start + b_shape.numel()]
            start += b_shape.numel()
            h = h @ w.T + b
            if i < layers - 1:
                h = torch.tanh(h)
        return h[:, 0]


@dataclass
class History:
    kl: str
    elbo: list[float] = field(default_factory=list)  # per data point, per step
    seconds: float = 0.0
    test_log_lik: float = math.nan


def train(
    kl: str,
    *,
    steps: int = 400,
    hidden: int = 100,
    num_train: int = 256,
    num_test: int = 512,
    lr: float = 1e-2,
    seed: int = 0,
) -> History:
    """Train with ``kl`` in ``{"distkl", "sample"}``; return the per-step ELBO and test score."""
    g = torch.Generator().manual_seed(seed)
    x, y = make_data(num_train, g)
    x_test, y_test = make_data(num_test, g)
    net = BayesMLP([1, hidden, hidden, 1], g)
    prior = scale_mixture_prior()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    hist = History(kl)
    start = time.perf_counter()
    for _ in range(steps):
        post = net.posterior()
        w = post.rsample()
        log_lik = Normal(net(x, w), NOISE).log_prob(y).sum()
        if kl == "distkl":
            kl_term = kl_divergence(post, prior).sum()
        else:
            kl_term = (post.log_prob(w) - prior.log_prob(w.unsqueeze(-1)).squeeze(-1)).sum()
        elbo = log_lik - kl_term
        opt.zero_grad()
        (-elbo / num_train).backward()
        opt.step()
        hist.elbo.append(elbo.item() / num_train)
    hist.seconds = time.perf_counter() - start
    hist.test_log_lik = test_log_likelihood(net, x_test, y_test, g)
    return hist


@torch.no_grad()
def test_log_likelihood(
    net: BayesMLP, x: Tensor, y: Tensor, generator: torch.Generator, samples: int = 32
) -> float:
    """Mean over test points of ``log (1/S) sum_s N(y; f(x; w_s), NOISE^2)``."""
    post = net.posterior()
    draws = [
        post.loc + post.scale * torch.randn(post.loc.shape, generator=generator)
        for _ in range(samples)
    ]
    lp = torch.stack([Normal(net(x, w), NOISE).log_prob(y) for w in draws])
    return (lp.logsumexp(0) - math.log(samples)).mean().item()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'KL term':<10} {'wall s':>8} {'final ELBO':>12} {'test log-lik':>13}")
    for kl in ("distkl", "sample"):
        h = train(kl, steps=args.steps, hidden=args.hidden, seed=args.seed)
        final = sum(h.elbo[-50:]) / len(h.elbo[-50:])
        print(f"{kl:<10} {h.seconds:>8.2f} {final:>12.4f} {h.test_log_lik:>13.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
