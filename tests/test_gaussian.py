"""distkl._gaussian: the one home of Gaussian algebra, checked against torch's closed forms."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import (
    Independent,
    MultivariateNormal,
    Normal,
    kl_divergence,
)

from distkl._gaussian import (
    as_gaussian_mixture,
    entropies,
    expected_log_density,
    half_log_det,
    loc_scale_1d,
    mixture_log_density,
    pairwise_kl,
    same_parameters,
    to_float64,
)
from distkl.examples import random_spd
from tests.conftest import F64


def _families(g: torch.Generator):
    """Three components of each layout (diagonal, dense), float64, batch (2, 3)."""
    loc = torch.randn(2, 3, 4, generator=g, dtype=F64)
    scale = torch.rand(2, 3, 4, generator=g, dtype=F64) + 0.5
    cov = random_spd(2, 3, d=4, generator=g)
    return Independent(Normal(loc, scale), 1), MultivariateNormal(loc.flip(-1), cov)


@pytest.mark.parametrize("dense_p", [False, True], ids=["diag-p", "dense-p"])
@pytest.mark.parametrize("dense_q", [False, True], ids=["diag-q", "dense-q"])
def test_pairwise_quantities_match_torch(dense_p, dense_q):
    g = torch.Generator().manual_seed(1)
    p = _families(g)[int(dense_p)]
    q = _families(g)[int(dense_q)]
    # Components along the batch's last dim: view (2, 3) batches as (2,) mixtures of K = 3.
    mp, mq = as_gaussian_mixture(p), as_gaussian_mixture(q)
    kp = _components(mp)
    kq = _components(mq)
    kl = pairwise_kl(kp, kq)  # (2, 3, 3)
    cross = expected_log_density(kp, kq)
    for a in range(3):
        for b in range(3):
            pa, qb = _pick(p, a), _pick(q, b)
            ref = kl_divergence(pa, qb)
            torch.testing.assert_close(kl[:, a, b], ref, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(cross[:, a, b], -pa.entropy() - ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(entropies(kp), _entropy_grid(p), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(2.0 * half_log_det(kp), kp.log_det_cov())


def _components(m):
    """Reinterpret the last batch dim of a one-component canonical form as the components."""
    return type(m)(
        torch.full(m.batch_shape, -torch.log(torch.tensor(3.0, dtype=F64))),
        m.loc.squeeze(-2),
        None if m.scale_diag is None else m.scale_diag.squeeze(-2),
        None if m.scale_tril is None else m.scale_tril.squeeze(-3),
        m.event_shape,
    )


def _pick(d, k):
    if isinstance(d, Independent):
        return Independent(Normal(d.base_dist.loc[:, k], d.base_dist.scale[:, k]), 1)
    return MultivariateNormal(d.loc[:, k], scale_tril=d.scale_tril[:, k])


def _entropy_grid(d):
    return d.entropy()


def test_mixture_log_density_matches_torch():
    g = torch.Generator().manual_seed(2)
    p = _families(g)[1]
    m = _components(as_gaussian_mixture(p))
    x = torch.randn(2, 5, 4, generator=g, dtype=F64)
    per_comp = p.log_prob(x.transpose(0, 1).unsqueeze(-2))  # (5, 2, 3)
    ref = (per_comp + m.log_weights).logsumexp(-1).transpose(0, 1)
    torch.testing.assert_close(mixture_log_density(x, m), ref)


def test_same_parameters_compares_values_not_objects():
    loc = torch.tensor([0.0, 1.0])
    p = as_gaussian_mixture(Normal(loc, torch.ones(2)))
    q = as_gaussian_mixture(Normal(loc.clone(), torch.tensor([1.0, 2.0])))
    assert same_parameters(p, q).tolist() == [True, False]
    dense = as_gaussian_mixture(MultivariateNormal(torch.zeros(1), torch.eye(1)))
    diag = as_gaussian_mixture(Independent(Normal(torch.zeros(1), torch.ones(1)), 1))
    assert same_parameters(dense, diag).item()


def test_to_float64_and_loc_scale_1d():
    m = as_gaussian_mixture(Normal(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])))
    m64 = to_float64(m)
    assert m64.loc.dtype == m64.log_weights.dtype == m64.scale_diag.dtype == F64
    loc, scale = loc_scale_1d(m64)
    assert loc.tolist() == [[1.0], [2.0]] and scale.tolist() == [[3.0], [4.0]]
