"""Pieces shared by the AntiPaSTO family: a frozen rank-r SVD part of W carried by the adapter.

    W ⊇ U diag(S) P                 U (d_out, r), S (r,), P (r, d_in): frozen buffers
    y' = x Wᵀ + b + (x Pᵀ) M Uᵀ     each member chooses the r x r change M of its frozen part
                                     (a gain, rotations, an ablation, a core); M = 0 at init

P is `lora_Vh` (orthonormal rows: W's own singular directions) or `lora_P` (CorDA/ASVD's
oblique rows). W itself is never written: the hook adds only the change of the frozen part,
which is exactly 0 at init, so identity is bit for bit and detach is trivially exact. The
change is the rank-r matrix U M P (exported as a plain LoRA with B = U M, A = P).
init reads the pristine W (and calibration statistics collected on the untouched model).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import knob
from ..quant import dense_weight
from ..variant import ParamSpec, like, per_row, straight_through_clamp
from ._svd import second_moment, top_r_svd, wanda_top_r


def svd_specs(d_in: int, d_out: int, r: int, basis: str = "lora_Vh") -> dict[str, ParamSpec]:
    return {
        "lora_U": ParamSpec((d_out, r), trainable=False),
        "lora_S": ParamSpec((r,), trainable=False),
        basis: ParamSpec((r, d_in), trainable=False),
    }


def basis_of(layer) -> torch.Tensor:
    """P: lora_P (CorDA/ASVD orientation) or lora_Vh."""
    return layer.lora_P if hasattr(layer, "lora_P") else layer.lora_Vh


def store_svd(layer, U, S, P, basis: str = "lora_Vh") -> None:
    """Write the factors into the buffers (this rounds them to cfg.dtype once)."""
    layer.lora_U.copy_(U)
    layer.lora_S.copy_(S)
    getattr(layer, basis).copy_(P)


def init_top_r(layer, cfg, stats: dict | None) -> None:
    """Members on W's own singular directions: its top-r triplets, or with calibration data the
    Wanda-ranked r (score S_i·sqrt(v_iᵀ C v_i)), into lora_U, lora_S, lora_Vh."""
    if stats is None:
        store_svd(layer, *top_r_svd(dense_weight(layer), cfg.r))
    else:
        store_svd(layer, *wanda_top_r(dense_weight(layer), cfg.r, second_moment(stats)))


def _gain_exponent(layer, cfg, x=None) -> torch.Tensor:
    """z = coeff·g, fp32: (r,) for a float coeff, (batch, 1, …, r) or (batch, seq, …, r) for a
    coefficient tensor (x: the layer input the gains act on; None in the closed forms).
    suppress_only holds g ≤ 0 with a straight-through clamp, so a g pushed above 0 keeps its
    gradient and can return (a plain clamp would freeze it)."""
    g = layer.lora_g.float()
    return per_row(cfg.coeff, x, torch.float32) * (straight_through_clamp(g, hi=0.0) if cfg.suppress_only else g)


def gain_minus_one(layer, cfg, x=None) -> torch.Tensor:
    """gain − 1 = ELU(z), fp32: the change of each singular value's factor, 0 at init. The gain
    1 + ELU(z) is e^z below 0 and 1 + z above: C¹, 1 at z = 0 and > 0, so a direction is
    suppressed towards 0 or amplified, never flipped. The hook adds S ⊙ ELU(z) ≥ −S to the
    frozen part that W already holds, so a fully suppressed direction cancels to rounding."""
    return F.elu(_gain_exponent(layer, cfg, x))


def coordinates(layer, x) -> tuple[torch.Tensor, torch.Tensor]:
    """p = x Pᵀ (…, r) and U, both in x's dtype."""
    P, U = like(x, basis_of(layer), layer.lora_U)
    return F.linear(x, P), U


def gain_delta(layer, cfg, x, y):
    """Δy = ((x Pᵀ) ⊙ S ⊙ (gain − 1)) Uᵀ."""
    p, U = coordinates(layer, x)
    return F.linear(p * like(x, layer.lora_S.float() * gain_minus_one(layer, cfg, x)), U)


def closed_forms(core):
    """(effective_weight, low_rank_delta) of a member whose change is U M P, M = core(layer, cfg)
    an fp32 (r, r) matrix: W_eff = W + U M P, and the rank-r factors (U M, P)."""

    def effective_weight(layer, cfg):
        return dense_weight(layer) + layer.lora_U.float() @ core(layer, cfg) @ basis_of(layer).float(), layer.bias

    def low_rank_delta(layer, cfg):
        return layer.lora_U.float() @ core(layer, cfg), basis_of(layer).float()

    return staticmethod(effective_weight), staticmethod(low_rank_delta)


def frozen_rank(default: int = 256, extra: str = ""):
    """The family's r: how many of W's singular directions the adapter carries."""
    return knob(default, "number of W's frozen singular directions the adapter carries (its top r, or "
                         "the Wanda-ranked r with calibration data); 1 <= r <= min(d_in, d_out)" + extra)


def steering_coeff(what: str = "the learned change"):
    """The family's coeff: a run-time steering knob."""
    return knob(1.0, f"steering coefficient on {what}: 1 = as trained, 0 = the base model, any float; "
                     f"changeable while attached with lora_lite.reconfigure(model, coeff=c), where c may "
                     f"also be a (batch,) or (batch, seq) tensor: one coefficient per example or per "
                     f"token (not saved: set a float before save)", per_row=True)


def big_rank(r: int, geometry) -> dict:
    """The benchmark's rank for the family: it trains O(r) scalars per layer, so a large basis
    (the seed benchmark's r = 256), capped at the smallest target side and kept a multiple of
    8 (rot's blocks)."""
    return {"r": min(256, geometry.min_dim - geometry.min_dim % 8)}


def frozen_part_macs(d_in: int, d_out: int, cfg) -> int:
    """Per token: x Pᵀ (r·d_in), the r-vector update (r), the product with Uᵀ (r·d_out)."""
    return cfg.r * (d_in + d_out) + cfg.r


# The tests run the family on blocks 0 and 1 only (an SVD or eigh per target); block 1's
# targets sit downstream of block 0's.
TWO_BLOCKS = {"layers": (0, 1)}


def gain_core(layer, cfg) -> torch.Tensor:
    """M = diag(S ⊙ (gain − 1))."""
    return torch.diag(layer.lora_S.float() * gain_minus_one(layer, cfg))
