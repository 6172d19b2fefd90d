"""Frozen-SVD helpers shared by the SVD-initialised variants (PiSSA, LoRA-XS, EVA, AntiPaSTO family).

Everything here is fp32 math on a pristine weight W (d_out, d_in) and, for the data-driven
choices, the input second moment the runtime collected (calibration.py):
C = gram / count = E[x xᵀ] (d_in, d_in), or its diagonal c = diag / count (d_in,).
"""

from __future__ import annotations

import torch


def top_r_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 SVD W = U diag(S) Vh, top-r slices: U_r (d_out, r), S_r (r,), Vh_r (r, d_in)."""
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


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
