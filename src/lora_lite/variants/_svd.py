"""Frozen-SVD helpers shared by the SVD-initialised variants (PiSSA, LoRA-XS, EVA, AntiPaSTO family).

Everything here is fp32 math on a pristine weight W (d_out, d_in) and, for the data-driven
choices, the input second moment the runtime collected (calibration.py):
C = gram / count = E[x xᵀ] (d_in, d_in), or its diagonal c = diag / count (d_in,).
"""

from __future__ import annotations

import torch


# Randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4 + Rayleigh–Ritz):
# a k-column sketch refined by POWER_ITERS products with W Wᵀ. Used when the sketch is at most a
# quarter of the smaller side of W; wider sketches cost about what the full SVD costs.
POWER_ITERS = 10


def sketch_width(r: int) -> int:
    """Columns of the sketch for a top-r factorisation: r directions plus r + 16 spares."""
    return 2 * r + 16


def top_r_svd(W: torch.Tensor, r: int, *, full: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 top-r SVD triplets of W: U_r (d_out, r), S_r (r,) descending, Vh_r (r, d_in).

    With `full`, always the full SVD, sliced (torch.linalg.svd: the factors PEFT's inits use).
    Otherwise, when k = sketch_width(r) <= min(d_out, d_in) / 4, randomized subspace iteration finds them
    (Q ← orth(W G), then POWER_ITERS × Q ← orth(W orth(Wᵀ Q)); W ≈ Q (Qᵀ W) and the small SVD
    of Qᵀ W gives the triplets); otherwise the full SVD, sliced. The sketch G is drawn from a
    generator seeded here, so attach is reproducible and leaves the global RNG untouched. U_r
    and Vh_r are orthonormal to rounding either way; the sketched triplets approximate the
    full SVD's (the error shrinks like (σ_{k+1}/σ_r)^(2·POWER_ITERS+1)). Measured on every
    MiniLM-L6 encoder weight (384 x 384, 1536 x 384, 384 x 1536) at r = 4, 8, 16 against the
    fp64 full SVD (tests/test_fast_forms.py): singular values within 3e-4 relative,
    ‖W − U_r S_r Vh_r‖_F within 6e-6 relative of the optimal rank-r residual, and the largest
    principal angle to the exact top-r left subspace sin θ ≤ 7e-4·σ_1/(σ_r − σ_{r+1}) (the
    subspace itself is ill-determined when σ_r ≈ σ_{r+1}; the captured energy is not).
    """
    W = W.detach().float()
    k = sketch_width(r)
    if full or 4 * k > min(W.shape):
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :r], S[:r], Vh[:r]
    g = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(W @ torch.randn(W.shape[1], k, generator=g).to(W.device)).Q
    for _ in range(POWER_ITERS):
        Q = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Q).Q).Q
    U, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)
    return Q @ U[:, :r], S[:r], Vh[:r]


def second_moment(stats: dict) -> torch.Tensor:
    """C = E[x xᵀ] (from "gram") or diag(C) (from "diag") over the unmasked calibration tokens."""
    total = stats["gram"] if "gram" in stats else stats["diag"]
    return total / stats["count"]


def top_r_eigvecs(gram: torch.Tensor, r: int) -> torch.Tensor:
    """Rows = the top-r eigenvectors of a symmetric PSD matrix, largest eigenvalue first (r, d).

    For gram = XᵀX these are X's top-r right singular vectors (EVA) without keeping X.
    """
    _, Q = torch.linalg.eigh(gram)  # ascending eigenvalues
    return Q[:, -r:].flip(1).T


def wanda_top_r(W: torch.Tensor, r: int, C: torch.Tensor):
    """Re-rank W's own singular directions by their output energy on the data (Wanda-style).

        W = U diag(S) Vh (full, fp32),  score_i = S_i · sqrt(v_iᵀ C v_i) = S_i · rms(x·v_i)
        idx = top-r(score), sorted ascending  ->  the kept directions stay in descending-S order

    The score is sign-invariant, so no sign convention is needed.
    """
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    rms = ((Vh @ C) * Vh).sum(1).clamp_min(0).sqrt()
    idx = torch.topk(S * rms, r).indices.sort().values
    return U[:, idx], S[idx], Vh[idx]


def oriented_top_r(W: torch.Tensor, r: int, C: torch.Tensor, eps: float):
    """CorDA/ASVD orientation: the rank-r part of W that carries the most output energy on x ~ C.

        C_ε = C with eigenvalues λ ← max(λ, 0) + ε    (C a vector: a diagonal C)
        W C_ε^{1/2} = U_t diag(S_t) Vh_t
        U_r = U_t[:, :r],  S_r = S_t[:r],  P_r = Vh_t[:r] C_ε^{-1/2}   (rows of P not orthonormal)

    U_r diag(S_r) P_r minimises E‖(W − Ŵ)x‖² = ‖(W − Ŵ) C^{1/2}‖²_F over rank-r Ŵ
    (Eckart–Young in the C-weighted norm); W = W_res + U_r diag(S_r) P_r holds through W_res.
    Computed without forming C_ε^{±1/2}: with C = Q diag(λ) Qᵀ, W C_ε^{1/2} = (W Q diag(√λ_ε)) Qᵀ
    has the U_t, S_t of W Q diag(√λ_ε) (Qᵀ is orthogonal), and P_r = diag(S_r)⁻¹ U_rᵀ W since
    U_rᵀ W C_ε^{1/2} = diag(S_r) Vh_r. C_ε^{-1/2} would amplify rounding by up to ε^{-1/2}.
    """
    W = W.detach().float()
    if C.dim() == 1:
        W_C = W * (C.clamp_min(0) + eps).sqrt()
    else:
        lam, Q = torch.linalg.eigh(C)
        W_C = (W @ Q) * (lam.clamp_min(0) + eps).sqrt()
    U, S, _ = torch.linalg.svd(W_C, full_matrices=False)
    U, S = U[:, :r], S[:r]
    return U, S, (U.T @ W) / S.clamp_min(torch.finfo(S.dtype).tiny)[:, None]
