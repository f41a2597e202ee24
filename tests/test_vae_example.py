"""examples/vae.py: a shortened training per prior improves the ELBO; the CLI writes its PNGs."""

from __future__ import annotations

import math

import pytest
import torch

from tests.example_scripts import Z_GAIN, load_example, step_noise

STEPS = 200
FIRST, WINDOW = 20, 40  # steps averaged at the start and at the end
FAST = {"eval_every": STEPS, "eval_samples": 64, "num_train": 2048, "num_test": 256}
Z = Z_GAIN


vae = load_example("vae")


pytestmark = pytest.mark.usefixtures("one_thread")



def assert_elbo_improves(h) -> None:
    """Mean ELBO of the last WINDOW steps exceeds that of the first FIRST steps by Z stderrs."""
    assert all(math.isfinite(v) for v in h.elbo + h.recon + h.kl + h.eval_elbo), h.prior
    m0 = sum(h.elbo[:FIRST]) / FIRST
    m1 = sum(h.elbo[-WINDOW:]) / WINDOW
    sigma = step_noise(h.elbo)
    stderr = sigma * math.sqrt(1 / FIRST + 1 / WINDOW)
    assert m1 - m0 > Z * stderr, (
        f"prior={h.prior} steps={len(h.elbo)}: mean ELBO first {FIRST} steps {m0:.3f}, "
        f"last {WINDOW} {m1:.3f}, step noise {sigma:.3f}, stderr of difference {stderr:.3f}, "
        f"z={Z}"
    )
    # The test-set ELBO (same KL method for every prior) improves as well.
    assert h.eval_elbo[-1] > h.eval_elbo[0], (h.prior, h.eval_elbo)


@pytest.mark.parametrize("prior", vae.PRIORS)
def test_training_improves_elbo(prior, device):
    h = vae.train(prior, STEPS, seed=0, device=device, **FAST)
    assert len(h.elbo) == STEPS and h.eval_steps[0] == 0 and h.eval_steps[-1] == STEPS
    assert_elbo_improves(h)
    assert h.latent is not None and h.latent.shape == (256, 2)
    assert torch.isfinite(h.latent).all()
    assert h.prior_dist is not None and h.prior_dist.event_shape == (2,)


def test_free_bits_and_annealing_run(device):
    h = vae.train("normal", STEPS, seed=1, warmup=50, free_bits=0.25, device=device, **FAST)
    assert_elbo_improves(h)
    h = vae.train("mvn", 100, seed=1, beta=0.5, free_bits=0.5, device=device, **FAST)
    assert all(math.isfinite(v) for v in h.elbo)


def test_same_seed_same_history():
    a = vae.train("normal", 20, seed=3, **FAST)
    b = vae.train("normal", 20, seed=3, **FAST)
    assert a.elbo == b.elbo and a.eval_elbo == b.eval_elbo


def test_glyphs():
    x, y = vae.make_glyphs(700, seed=0)
    assert x.shape == (700, 64) and y.shape == (700,)
    assert set(x.unique().tolist()) == {0.0, 1.0}
    assert set(y.tolist()) == set(range(len(vae.CLASSES)))
    x2, _ = vae.make_glyphs(700, seed=0)
    assert torch.equal(x, x2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="prior must be one of"):
        vae.train("laplace", 1, seed=0)
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        vae.train("normal", 0, seed=0)


def test_cli_prints_table_and_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the plot extra (matplotlib) is not installed")
    assert vae.main(["--prior", "normal", "--steps", "30", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test ELBO" in out and "normal" in out and "exact (torch)" in out
    for name in ("elbo.png", "latent.png"):
        assert (tmp_path / name).stat().st_size > 1000, name


def test_improvement_check_can_fail():
    # lr = 0: the parameters never move, the ELBO series is noise around its start.
    h = vae.train("normal", 60, seed=0, lr=0.0, **FAST)
    with pytest.raises(AssertionError, match="prior=normal"):
        assert_elbo_improves(h)
