"""Pieces shared by the AntiPaSTO family: a frozen rank-r SVD part of W carried by the adapter.

    W = W_res + U diag(S) P         U (d_out, r), S (r,), P (r, d_in): frozen buffers
    y' = x W_resᵀ + b + f(x Pᵀ) Uᵀ  each member chooses f (gain, rotation, ablation, core)

P is `lora_Vh` (orthonormal rows: W's own singular directions) or `lora_P` (CorDA/ASVD's
oblique rows). The buffers are written in cfg.dtype and Δ0 = U diag(S) P is formed from those
stored values, so W_res = W − Δ0 is exact but for one rounding, load rebuilds it from the file
and detach restores W. init reads the pristine W (calibration and init run before the runtime
subtracts Δ0), so data-driven choices never see a damaged model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..variant import ParamSpec
from ._svd import second_moment, top_r_svd, wanda_top_r


def svd_specs(d_in: int, d_out: int, r: int, basis: str = "lora_Vh") -> dict[str, ParamSpec]:
    return {
        "lora_U": ParamSpec((d_out, r), trainable=False),
        "lora_S": ParamSpec((r,), trainable=False),
        basis: ParamSpec((r, d_in), trainable=False),
    }


def store_svd(layer, U, S, P, basis: str = "lora_Vh") -> None:
    """Write the factors into the buffers (this rounds them to cfg.dtype once)."""
    layer.lora_U.copy_(U)
    layer.lora_S.copy_(S)
    getattr(layer, basis).copy_(P)


def init_top_r(layer, cfg, stats: dict | None) -> None:
    """Members on W's own singular directions: its top-r triplets, or with calibration data the
    Wanda-ranked r (score S_i·sqrt(v_iᵀ C v_i)), into lora_U, lora_S, lora_Vh."""
    if stats is None:
        store_svd(layer, *top_r_svd(layer.weight, cfg.r))
    else:
        store_svd(layer, *wanda_top_r(layer.weight, cfg.r, second_moment(stats)))


def frozen_delta(layer, cfg) -> torch.Tensor:
    """base_delta: Δ0 = U diag(S) P from the stored buffers in fp32 (P = lora_P or lora_Vh)."""
    P = layer.lora_P if hasattr(layer, "lora_P") else layer.lora_Vh
    return (layer.lora_U.float() * layer.lora_S.float()) @ P.float()


def gain(layer, cfg) -> torch.Tensor:
    """1 + ELU(coeff·g): e^z for z ≤ 0, 1 + z above; C¹, positive, exactly 1 at g = 0.
    suppress_only clamps g ≤ 0 so the factor stays in (0, 1] (config requires coeff ≥ 0)."""
    g = layer.lora_g.clamp(max=0.0) if cfg.suppress_only else layer.lora_g
    return 1.0 + F.elu(cfg.coeff * g)


def gain_forward(layer, cfg, x, y, basis):
    """y + ((x Pᵀ) ⊙ S ⊙ gain) Uᵀ."""
    h = F.linear(x, basis) * (layer.lora_S * gain(layer, cfg))
    return y + F.linear(h, layer.lora_U).to(y.dtype)


def gain_effective_weight(layer, cfg, basis):
    """W_res + U diag(S ⊙ gain) P."""
    S_eff = layer.lora_S.float() * gain(layer, cfg).float()
    return layer.weight.float() + (layer.lora_U.float() * S_eff) @ basis.float(), layer.bias
