"""Closed-form bounds from pairwise Gaussian quantities: the mixing information and the
coupling (variational) bounds."""

from __future__ import annotations

import torch
from torch import Tensor

from distkl._gaussian import (
    GaussianMixture,
    entropies,
    pairwise_kl,
    pairwise_log_overlap,
    pairwise_log_product,
)

_CHERNOFF_ALPHAS = (0.5, 0.25, 0.75)


# ---- helpers -------------------------------------------------------------------------------------


def mixture_weights(m: GaussianMixture) -> Tensor:
    return m.log_weights.exp()


# ---- mixing information I = H(p) - sum_a w_a H(p_a) ----------------------------------------------


def mixing_information_bounds(mp: GaussianMixture) -> tuple[Tensor, Tensor]:
    r"""Bounds on the mixing information $I = H(p) - \sum_a w_a H(p_a) \in [0, H(w)]$.

    $$
    -\sum_a w_a \log \sum_{a'} w_{a'} e^{-C_\alpha(p_a\|p_{a'})} \;\le\; I \;\le\;
    -\sum_a w_a \log \sum_{a'} w_{a'} e^{-\mathrm{KL}(p_a\|p_{a'})}
    $$

    for every $\alpha \in [0, 1]$ (Chernoff $\alpha$-divergence $C_\alpha$;
    $\alpha \in \{1/4, 1/2, 3/4\}$ are tried), and also
    $I \ge -\sum_a w_a \log \sum_{a'} w_{a'} \int p_a p_{a'} - \sum_a w_a H(p_a)$
    (Jensen on $\mathbb{E}_{p_a}\log p \le \log \mathbb{E}_{p_a} p$).

    Returns `(lower, upper)` of shape `(*batch,)`.

    Source: Kolchinsky & Tracey (2017), Entropy 19(7):361, Theorems 2 and 3 (I is the mutual
    information between the component label and X; Haussler & Opper (1997), Ann. Statist.
    25(6), Lemma 3 and Theorem 2); Huber et al. (2008), IEEE MFI, eq. (8) for the Jensen bound.
    """
    w = mixture_weights(mp)
    lw = mp.log_weights.unsqueeze(-2)
    upper = -(w * (lw - pairwise_kl(mp, mp)).logsumexp(-1)).sum(-1)
    lowers = [
        -(w * (lw + pairwise_log_overlap(mp, mp, a)).logsumexp(-1)).sum(-1)
        for a in _CHERNOFF_ALPHAS
    ]
    jensen = -(w * (lw + pairwise_log_product(mp, mp)).logsumexp(-1)).sum(-1) - (
        w * entropies(mp)
    ).sum(-1)
    lower = torch.stack([*lowers, jensen]).amax(0).clamp(min=0.0)
    return lower, upper


# ---- coupling (variational) upper bound ----------------------------------------------------------


def coupling_upper_bound(
    log_w: Tensor, log_v: Tensor, kl_ab: Tensor, *, iterations: int = 100
) -> Tensor:
    r"""`KL(p || q)` upper bound over couplings of the components (Hershey-Olsen `D_varupper`).

    For every $\phi_{ab} \ge 0$ with $\sum_b \phi_{ab} = w_a$,

    $$
    \mathrm{KL}(p \| q) \le \sum_b \phi_{\cdot b} \log\frac{\phi_{\cdot b}}{v_b}
    + \sum_{ab} \phi_{ab}\, \mathrm{KL}(p_a \| q_b),
    \qquad \phi_{\cdot b} = \sum_a \phi_{ab},
    $$

    the KL divergence between the joint densities $\phi_{ab}\, p_a(x)$ and
    $\psi_{ab}\, q_b(x)$ with $\psi_{ab} = v_b \phi_{ab}/\phi_{\cdot b}$, which
    majorises the KL of the marginals (chain rule / log-sum inequality). The right side is convex
    in $\phi$; `iterations` alternating updates approach its minimum, and every iterate is
    a valid bound. With one-to-one couplings it contains the matched bound
    $\mathrm{KL}(w\|v_\pi) + \sum_a w_a \mathrm{KL}(p_a\|q_{\pi(a)})$.

    Args:
        log_w: `(*batch, Ka)` normalised log-weights of p; log_v: `(*batch, Kb)` of q.
        kl_ab: `(*batch, Ka, Kb)` pairwise `KL(p_a || q_b)`.

    Returns:
        `(*batch,)` upper bound.

    Source: Hershey & Olsen (2007), ICASSP, sec. 6 ("variational upper bound"), update equations
    (26)-(27); Do (2003), IEEE Signal Process. Lett. 10(4) for the matched bound.
    """
    lw = log_w.unsqueeze(-1)
    lv = log_v.unsqueeze(-2)
    with torch.no_grad():
        # Choose the coupling (weights absent from a slab are -inf: keep the iteration finite).
        kl_d = torch.where(torch.isfinite(kl_ab), kl_ab, torch.full_like(kl_ab, 1e4)).detach()
        lw_d, lv_d = lw.detach().clamp(min=-1e4), lv.detach().clamp(min=-1e4)
        log_psi = lw_d + lv_d
        log_phi = log_psi
        for _ in range(iterations):
            t = log_psi - kl_d
            log_phi = lw_d + t - t.logsumexp(-1, keepdim=True)
            log_psi = lv_d + log_phi - log_phi.logsumexp(-2, keepdim=True)
        log_cond = log_phi - log_phi.logsumexp(-1, keepdim=True)  # phi_{b|a}
    # Evaluate the bound (with gradients) at phi_ab = w_a phi_{b|a}.
    phi = (lw + log_cond).exp()
    col = phi.sum(-2)  # (*, Kb)
    used = col > 0
    col_s = torch.where(used, col, torch.ones_like(col))
    lv_s = torch.where(used, log_v, torch.zeros_like(log_v))
    col_term = torch.where(used, col_s * (col_s.log() - lv_s), torch.zeros_like(col)).sum(-1)
    kl_s = torch.where(phi > 0, kl_ab, torch.zeros_like(kl_ab))
    return col_term + (phi * kl_s).sum((-2, -1))


def component_upper_bound(log_v: Tensor, kl_ab: Tensor) -> Tensor:
    r"""`KL(p_a || q) <= -log sum_b v_b exp(-KL(p_a || q_b))` for a single Gaussian $p_a$.

    The coupling bound with one component on the left; equivalently Jensen's inequality
    $\mathbb{E}_{p_a}\log q \ge \log\sum_b v_b e^{\mathbb{E}_{p_a}\log q_b}$ for the
    variational posterior over `b`. Shape `(*batch, Ka)`.

    Source: Hershey & Olsen (2007), ICASSP, eq. (17) (variational lower bound on
    $\mathbb{E}_{p_a}\log q$).
    """
    return -(log_v.unsqueeze(-2) - kl_ab).logsumexp(-1)
