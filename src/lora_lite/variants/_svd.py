"""Frozen-SVD helpers shared by the SVD-initialised variants (PiSSA, LoRA-XS, AntiPaSTO family)."""

from __future__ import annotations

import torch


def top_r_svd(W: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 SVD W = U diag(S) Vh, top-r slices: U_r (d_out, r), S_r (r,), Vh_r (r, d_in)."""
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]
