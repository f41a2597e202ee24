"""examples/bayes_by_backprop.py: both KL terms (distkl's deterministic 1-D rule and the single
sample) train a small Bayesian network; the ELBO gain is a z-test, as for the VAE example."""

from __future__ import annotations

import math

import pytest
import torch

from distkl.quadrature import kl_composite
from tests.example_scripts import Z_GAIN, load_example, step_noise

STEPS = 120
FIRST, WINDOW = 15, 30  # steps averaged at the start and at the end
SMALL = {"steps": STEPS, "hidden": 8, "num_train": 64, "num_test": 64, "lr": 3e-2}
Z = Z_GAIN


bbb = load_example("bayes_by_backprop")


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize("kl", ["distkl", "sample"])
def test_both_kl_terms_learn(kl):
    h = bbb.train(kl, **SMALL)
    assert len(h.elbo) == STEPS and all(math.isfinite(v) for v in h.elbo)
    assert math.isfinite(h.test_log_lik) and h.seconds > 0
    m0, m1 = sum(h.elbo[:FIRST]) / FIRST, sum(h.elbo[-WINDOW:]) / WINDOW
    stderr = step_noise(h.elbo) * math.sqrt(1 / FIRST + 1 / WINDOW)
    assert m1 - m0 > Z * stderr, (kl, m0, m1, stderr)


def test_distkl_kl_term_is_the_quadrature_rule():
    """The deterministic run's KL is distkl's registered 1-D rule, not a sample: two calls agree
    and match the composite reference on the example's own posterior."""
    g = torch.Generator().manual_seed(0)
    net = bbb.BayesMLP([1, 4, 4, 1], g)
    post, prior = net.posterior(), bbb.scale_mixture_prior()
    a = torch.distributions.kl_divergence(post, prior)
    assert torch.equal(a, torch.distributions.kl_divergence(post, prior))
    ref = kl_composite(post, prior, nodes=512)
    assert ((a.double() - ref.double()).abs() / ref.double()).max().item() <= 1e-5  # float32


def test_cli_prints_both_runs(capsys):
    assert bbb.main(["--steps", "3", "--hidden", "4"]) == 0
    out = capsys.readouterr().out
    assert "distkl" in out and "sample" in out and "test log-lik" in out
