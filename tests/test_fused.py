"""The training-loop estimators' fused autograd nodes against their plain operations.

`distkl._few` (KL of one diagonal Normal against a diagonal mixture at few samples) and
`distkl._reverse` (a diagonal mixture against one diagonal Normal) each compute their estimate
as one `torch.autograd.Function` with a hand-written backward, and keep the same estimate in
ordinary differentiable operations (`_plain`) for `torch.compile` and for backward passes that
build a graph. The value and every gradient of the node must equal autograd's through the
plain operations, for broadcast batch shapes, antithetic pairs, shared samples and 1-D events;
`gradcheck` and `gradgradcheck` check the derivatives themselves (with the fitted
coefficient off, because it is deliberately held constant: see `distkl._few`).
"""

from __future__ import annotations

import math

import pytest
import torch

from distkl._few import FewSpec, _plain, few_diagonal
from distkl._gaussian import GaussianMixture
from distkl._reverse import _MixtureToDiagonal
from distkl._reverse import _plain as reverse_plain
from distkl._stats import MIN_FIT_UNITS

F64 = torch.float64

# (n, paired, batch of p, pad, batch of q, D, K, shared samples)
FEW_CASES = [
    (1, False, (128,), (), (), 16, 8, False),
    (4, True, (7, 3), (), (3,), 2, 5, False),
    (2, False, (5,), (1,), (2, 1), 1, 3, True),
    (3, False, (6,), (), (1,), 4, 2, True),
    (8, True, (5,), (), (), 3, 4, False),
    (12, False, (3,), (1,), (2, 1), 2, 3, True),
]


def _few_inputs(n, bp, pad, bq, d, k, shared, g):
    # with shared samples the gradient reaches p's mean only through them
    mu = torch.randn(*bp, d, generator=g, dtype=F64, requires_grad=not shared)
    sigma = (0.4 * torch.randn(*bp, d, generator=g, dtype=F64)).exp().requires_grad_()
    eps = torch.randn(n, *bp, d, generator=g, dtype=F64)
    z = None
    if shared:
        z = (mu.detach() + sigma.detach() * eps).reshape(n, *pad, *bp, d).requires_grad_()
    lw = torch.randn(*bq, k, generator=g, dtype=F64).log_softmax(-1).requires_grad_()
    loc = torch.randn(*bq, k, d, generator=g, dtype=F64, requires_grad=True)
    scale = (0.3 * torch.randn(*bq, k, d, generator=g, dtype=F64)).exp().requires_grad_()
    return eps, [mu, sigma, z, lw, loc, scale]


# matrix products score one q shared by the batch (q's batch of one element)
SCORINGS = [
    pytest.param(case, gemm, id=f"n{case[0]}-bp{case[2]}-bq{case[4]}-D{case[5]}-{name}")
    for case in FEW_CASES
    for gemm, name in ((False, "elementwise"), (True, "gemm"))
    if not gemm or math.prod(case[4]) == 1
]


@pytest.mark.parametrize("case, gemm", SCORINGS)
@pytest.mark.parametrize("fit", ["matched", "fit", "naive"])
def test_few_node_equals_its_plain_operations(case, gemm, fit):
    """Values, standard errors and every gradient; with the matched control c_2 its pathwise
    gradient (zero-mean, in p's parameters and the samples) is part of both. Scored
    elementwise and (one q for the batch) by matrix products."""
    n, paired, bp, pad, bq, d, k, shared = case
    matched = fit == "matched"
    eps, args = _few_inputs(n, bp, pad, bq, d, k, shared, torch.Generator().manual_seed(n))
    if gemm:  # q's parameters as the caller passes them: (K,), (K, D)
        args[3:] = [args[3].detach().reshape(k).requires_grad_()] + [
            x.detach().reshape(k, d).requires_grad_() for x in args[4:]
        ]
    units = (n // 2 if paired else n) * math.prod(bp)
    fitted = fit != "naive" and units - 1 >= MIN_FIT_UNITS  # as distkl._pathwise decides
    if matched and fitted and shared:  # c_2's gradient reaches p's mean directly too
        args[0].requires_grad_()
    leaves = [a for a in args if a is not None and a.requires_grad]

    def spec() -> FewSpec:
        return FewSpec(eps, pad, torch.Size(bp), paired, fitted, n > 1, matched, gemm)

    s_node, s_plain = spec(), spec()
    node, plain = few_diagonal(*args, s_node), _plain(*args, s_plain)
    torch.testing.assert_close(node, plain, rtol=1e-10, atol=1e-10)
    if n > 1:
        torch.testing.assert_close(s_node.se, s_plain.se, rtol=1e-10, atol=1e-10)
    weights = torch.randn(node.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    g_node = torch.autograd.grad(node, leaves, weights)
    g_plain = torch.autograd.grad(plain, leaves, weights)
    for a, b in zip(g_node, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", FEW_CASES[1:], ids=lambda c: f"n{c[0]}-bp{c[2]}-D{c[5]}")
def test_few_node_gradcheck_and_gradgradcheck(case):
    n, paired, bp, pad, bq, d, k, shared = case
    eps, args = _few_inputs(n, bp, pad, bq, d, k, shared, torch.Generator().manual_seed(7))
    spots = [i for i, a in enumerate(args) if a is not None and a.requires_grad]

    def f(*leaves):
        full = list(args)
        for i, leaf in zip(spots, leaves):
            full[i] = leaf
        return few_diagonal(*full, FewSpec(eps, pad, torch.Size(bp), paired, False, False))

    leaves = tuple(args[i] for i in spots)
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


# (batch of p, batch of q, K, D, draws per component)
REVERSE_CASES = [((), (7,), 3, 2, 2), ((4,), (4,), 2, 3, 3), ((2, 1), (1, 3), 4, 1, 2)]


def _reverse_inputs(bp, bq, k, d, r, g):
    lw = torch.randn(*bp, k, generator=g, dtype=F64).log_softmax(-1).requires_grad_()
    loc = torch.randn(*bp, k, d, generator=g, dtype=F64, requires_grad=True)
    sd = (0.3 * torch.randn(*bp, k, d, generator=g, dtype=F64)).exp().requires_grad_()
    m = torch.randn(*bq, d, generator=g, dtype=F64, requires_grad=True)
    s = (0.3 * torch.randn(*bq, d, generator=g, dtype=F64)).exp().requires_grad_()
    return (lw, loc, sd, m, s), torch.randn(r, *bp, k, d, generator=g, dtype=F64)


@pytest.mark.parametrize("case", REVERSE_CASES, ids=lambda c: f"bp{c[0]}-bq{c[1]}-D{c[3]}")
def test_reverse_node_equals_its_plain_operations(case):
    bp, bq, k, d, r = case
    args, eps = _reverse_inputs(bp, bq, k, d, r, torch.Generator().manual_seed(3))
    lw, loc, sd, m, s = args
    gp = GaussianMixture(lw, loc, sd, None, torch.Size([d]))
    gq = GaussianMixture(
        torch.zeros(*bq, 1, dtype=F64), m.unsqueeze(-2), s.unsqueeze(-2), None, torch.Size([d])
    )
    node, plain = _MixtureToDiagonal.apply(*args, eps), reverse_plain(gp, gq, eps)
    torch.testing.assert_close(node, plain, rtol=1e-12, atol=1e-12)
    weights = torch.randn(node.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    for a, b in zip(
        torch.autograd.grad(node, args, weights), torch.autograd.grad(plain, args, weights)
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    f = lambda *leaves: _MixtureToDiagonal.apply(*leaves, eps)  # noqa: E731
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


def test_few_node_by_matrix_products_is_accurate_in_float32():
    """The expanded square of the matrix-product scoring runs in float64 around the mean of q's
    means: with components 2000 scales apart and samples beside them, in float32, its value
    and gradients are as close to the float64 answer as the elementwise scoring's (whose
    error is float32's own rounding of samples near 1000)."""
    g = torch.Generator().manual_seed(0)
    b, d, k, n = 64, 4, 3, 2
    loc = torch.tensor([[-1000.0] * d, [0.0] * d, [1000.0] * d], dtype=F64)
    scale = torch.full((k, d), 0.5, dtype=F64)
    mu = loc[torch.arange(b) % k] + torch.randn(b, d, generator=g, dtype=F64)
    sigma = torch.full((b, d), 0.7, dtype=F64)
    eps = torch.randn(n, b, d, generator=g, dtype=F64)
    lw = torch.full((k,), -math.log(k), dtype=F64)

    def run(dtype, gemm):
        leaves = [x.to(dtype).requires_grad_() for x in (mu, sigma, lw, loc, scale)]
        spec = FewSpec(eps.to(dtype), (), torch.Size([b]), False, True, False, False, gemm)
        value = few_diagonal(leaves[0], leaves[1], None, *leaves[2:], spec)
        return [x.double() for x in (value, *torch.autograd.grad(value.sum(), leaves))]

    exact = run(F64, False)
    for fast, elementwise, ref in zip(run(torch.float32, True), run(torch.float32, False), exact):
        scale_ref = ref.abs().max().item() + 1.0
        err_fast = (fast - ref).abs().max().item() / scale_ref
        err_elementwise = (elementwise - ref).abs().max().item() / scale_ref
        assert err_fast <= 2.0 * err_elementwise + 1e-6, (err_fast, err_elementwise)


@pytest.mark.parametrize("n", [4, 256], ids=["elementwise", "gemm"])
def test_an_expanded_prior_is_one_q(n):
    """A prior expanded to the batch (`Distribution.expand`, Pyro's plates) is scored as the one
    q it is: the same value and the same gradients as the unexpanded prior."""
    from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

    from distkl import kl_mc

    g = torch.Generator().manual_seed(2)
    b, k, d = 64, 4, 8
    leaves = [
        torch.randn(b, d, generator=g, dtype=F64, requires_grad=True),
        torch.randn(k, generator=g, dtype=F64, requires_grad=True),
        torch.randn(k, d, generator=g, dtype=F64, requires_grad=True),
    ]
    out = []
    for expand in (False, True):
        post = Independent(Normal(leaves[0], torch.ones(b, d, dtype=F64)), 1)
        prior = MixtureSameFamily(
            Categorical(logits=leaves[1]),
            Independent(Normal(leaves[2], torch.ones(k, d)), 1),  # float32 scales: mixed dtypes
        )
        prior = prior.expand(torch.Size([b])) if expand else prior
        gen = torch.Generator().manual_seed(5)
        value = kl_mc(post, prior, num_samples=n, generator=gen).value
        out.append([value, *torch.autograd.grad(value.sum(), leaves)])
    for a, b_ in zip(*out):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gemm", [False, True], ids=["elementwise", "gemm"])
def test_few_node_second_derivatives_with_the_matched_control(gemm):
    """A backward pass that builds a graph differentiates the plain operations: with both
    controls fitted, the gradient it returns is the node's, and its derivative (a
    gradient-penalty term) is the plain operations' second derivative."""
    n, b, d, k = 8, 5, 4, 3
    eps, args = _few_inputs(n, (b,), (), (), d, k, False, torch.Generator().manual_seed(9))
    leaves = [a for a in args if a is not None]

    def run(fn):
        spec = FewSpec(eps, (), torch.Size([b]), False, True, False, True, gemm)
        value = fn(*args, spec).sum()
        grads = torch.autograd.grad(value, leaves, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        return [*grads, *torch.autograd.grad(penalty, leaves)]

    for a, b_ in zip(run(few_diagonal), run(_plain)):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)
