"""The assumptions distkl makes about torch's private names, each asserted.

If one of these fails after a torch upgrade, ``distkl/_torch_compat.py`` is the one file to mend.
"""

from __future__ import annotations

import torch
from torch.distributions import (
    Categorical,
    Distribution,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from distkl import _torch_compat as compat


def test_kl_table_is_torchs_live_registry() -> None:
    table = compat.kl_table()
    assert table[Normal, Normal] is torch.distributions.kl._kl_normal_normal
    compat.clear_kl_cache()
    kl_divergence(Normal(0.0, 1.0), Normal(1.0, 1.0))
    assert (Normal, Normal) in torch.distributions.kl._KL_MEMOIZE
    compat.clear_kl_cache()
    assert not torch.distributions.kl._KL_MEMOIZE


def test_scale_tril_is_unbroadcast_cholesky() -> None:
    cov = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    d = MultivariateNormal(torch.zeros(3, 2, dtype=torch.float64), covariance_matrix=cov)
    L = compat.scale_tril(d)
    assert L.shape == (2, 2)
    torch.testing.assert_close(L @ L.T, cov)


def test_batch_mahalanobis() -> None:
    L = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    want = (x @ torch.linalg.inv(L @ L.T) * x).sum(-1)
    torch.testing.assert_close(compat.batch_mahalanobis(L, x), want)


def test_lowrank_factors_and_capacitance() -> None:
    W = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    D = torch.tensor([0.5, 2.0], dtype=torch.float64)
    d = LowRankMultivariateNormal(torch.zeros(4, 2, dtype=torch.float64), W, D)
    w, diag = compat.lowrank_factors(d)
    assert w.shape == (2, 1) and diag.shape == (2,)
    C = compat.capacitance_tril(d)
    want = torch.eye(1, dtype=torch.float64) + W.T @ (W / D.unsqueeze(-1))
    torch.testing.assert_close(C @ C.T, want)


def test_built_from_probs_tracks_the_constructor_argument() -> None:
    from_probs = Categorical(probs=torch.tensor([0.5, 0.5, 0.0]))
    from_logits = Categorical(logits=torch.tensor([0.0, 0.0, -1.0]))
    _ = from_logits.probs  # torch caches the lazy probs in the instance dict
    assert compat.built_from_probs(from_probs)
    assert not compat.built_from_probs(from_logits)


def test_exact_log_probs_keeps_zero_tiny_and_nan() -> None:
    probs = torch.tensor([0.5, 0.5 - 1e-30, 1e-30, 0.0], dtype=torch.float64)
    got = compat.exact_log_probs(Categorical(probs=probs))
    assert got[-1] == -torch.inf
    torch.testing.assert_close(got[2], torch.tensor(1e-30, dtype=torch.float64).log())
    nan = compat.exact_log_probs(Categorical(probs=torch.tensor([0.5, 0.5]), validate_args=False))
    assert not nan.isnan().any()
    bad = Categorical(probs=torch.tensor([float("nan"), 1.0]), validate_args=False)
    assert compat.exact_log_probs(bad).isnan().any()


def test_default_validate_args_follows_set_default_validate_args() -> None:
    before = compat.default_validate_args()
    try:
        Distribution.set_default_validate_args(False)
        assert compat.default_validate_args() is False
        Distribution.set_default_validate_args(True)
        assert compat.default_validate_args() is True
    finally:
        Distribution.set_default_validate_args(before)


def test_kl_memo_is_torchs_live_memo() -> None:
    compat.clear_kl_cache()
    kl_divergence(Normal(0.0, 1.0), Normal(1.0, 1.0))
    memo = compat.kl_memo()
    assert memo is torch.distributions.kl._KL_MEMOIZE
    assert memo[Normal, Normal] is torch.distributions.kl._kl_normal_normal


def test_batch_mahalanobis_of_an_empty_batch_is_empty() -> None:
    L = torch.eye(2, dtype=torch.float64)
    got = compat.batch_mahalanobis(L, torch.zeros(0, 2, dtype=torch.float64))
    assert got.shape == (0,)
