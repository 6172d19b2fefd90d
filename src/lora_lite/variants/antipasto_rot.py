"""AntiPaSTO-rot: an additive singular-value delta plus block-diagonal Cayley rotations of the
frozen top-r singular basis. The earlier AntiPaSTO form (arXiv 2601.07473), kept for A/B runs.

    W_res = W − U diag(S) Vh        U (d_out, r), S (r,), Vh (r, d_in) frozen buffers
    per block n of size bs (r/bs blocks), t = rot_T[n] (bs(bs−1)/2,):
        T = strict upper triangle filled with t,  Ã = ½(T − Tᵀ)
        A = a·tanh(Ã / a),  a = 2·tan(max_rotation_angle / 2)      (skew-symmetric, bounded)
        R_n = (I − A/2)⁻¹ (I + A/2)                                 (Cayley: orthogonal, fp32)
    R_V = blockdiag(R_n) from rot_T   when rotate_basis ∈ {V, both}, else I
    R_U = blockdiag(R_n) from rot_T (U) or rot_T_u (both),          else I
    y' = x W_resᵀ + b + ((x (R_V Vh)ᵀ) ⊙ (S + δ_s)) (U R_Uᵀ)ᵀ
    W_eff = W_res + U R_Uᵀ diag(S + δ_s) R_V Vh

For a 2×2 block the rotation angle is capped at max_rotation_angle exactly; larger blocks are
capped per entry. The rotations act on the (…, r) coordinates, so Vh and U are never rebuilt.
Init: rot_T = 0 (R = I exactly) and δ_s ~ 4e-4 + N(0, 4e-4²), a deliberate small positive
offset that breaks the sign symmetry of δ_s; so the model is *not* the identity at init (zero
δ_s for an exact one). Trainable: r + r(bs−1)/2 per layer (+ r(bs−1)/2 more for `both`; r only
for `none`). alpha is unused.

Calibration is optional: with data the r directions are Wanda re-selected as in antipasto
(score S_i·sqrt(v_iᵀ C v_i), C = E[x xᵀ] over unmasked tokens; the earlier `mean_abs` pooling
needs raw activations and is not offered). δ_s is drawn i.i.d. per direction, so the selection
needs no re-indexing of trainables. No PEFT equivalent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import AdapterConfig
from ..variant import ParamSpec, Variant, register
from ._antipasto import frozen_delta, init_top_r, svd_specs


@dataclass(frozen=True, kw_only=True)
class AntiPaSTORotConfig(AdapterConfig):
    variant: str = field(default="antipasto_rot", init=False)
    r: int = 256
    block_size: int = 4
    max_rotation_angle: float = 0.5
    rotate_basis: Literal["V", "U", "both", "none"] = "V"

    def check(self):
        name = type(self).__name__
        if self.block_size < 2 or self.r % self.block_size:
            raise ValueError(f"{name}.block_size: must be >= 2 and divide r={self.r}, got {self.block_size}")
        if not 0.0 < self.max_rotation_angle < math.pi:
            raise ValueError(f"{name}.max_rotation_angle: must be in (0, pi), got {self.max_rotation_angle}")


def _rotations(t: torch.Tensor, bs: int, max_angle: float) -> torch.Tensor:
    """(r/bs, bs(bs−1)/2) parameters -> (r/bs, bs, bs) bounded Cayley rotations, fp32."""
    i, j = torch.triu_indices(bs, bs, 1, device=t.device)
    T = t.new_zeros(t.shape[0], bs, bs, dtype=torch.float32)
    T[:, i, j] = t.float()
    lim = 2.0 * math.tan(max_angle / 2.0)
    X = lim * torch.tanh(0.5 * (T - T.transpose(1, 2)) / lim) / 2.0
    eye = torch.eye(bs, device=t.device)
    return torch.linalg.solve(eye - X, eye + X)


def _blocks(layer, cfg):
    """(R_V, R_U), each (r/bs, bs, bs) or None for the identity."""
    basis = cfg.rotate_basis

    def rot(t):
        return _rotations(t, cfg.block_size, cfg.max_rotation_angle)

    R_V = rot(layer.lora_rot_T) if basis in ("V", "both") else None
    R_U = rot(layer.lora_rot_T if basis == "U" else layer.lora_rot_T_u) if basis in ("U", "both") else None
    return R_V, R_U


def _rotate(h: torch.Tensor, R: torch.Tensor | None, transpose: bool) -> torch.Tensor:
    """h (…, r) -> h blockdiag(R)ᵀ (transpose) or h blockdiag(R), blockwise."""
    if R is None:
        return h
    hb = h.unflatten(-1, (R.shape[0], R.shape[1]))
    eq = "...nk,njk->...nj" if transpose else "...nj,njk->...nk"
    return torch.einsum(eq, hb, R.to(h.dtype)).flatten(-2)


@register
class AntiPaSTORot(Variant):
    name = "antipasto_rot"
    config = AntiPaSTORotConfig
    needs_dense_weight = True
    calibration = "gram"
    identity_at_init = False

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        r, bs = cfg.r, cfg.block_size
        specs = {**svd_specs(d_in, d_out, r), "lora_delta_s": ParamSpec((r,), lambda t: t.normal_(4e-4, 4e-4))}
        rot = (r // bs, bs * (bs - 1) // 2)
        if cfg.rotate_basis != "none":
            specs["lora_rot_T"] = ParamSpec(rot, "zeros")
        if cfg.rotate_basis == "both":
            specs["lora_rot_T_u"] = ParamSpec(rot, "zeros")
        return specs

    init = staticmethod(init_top_r)
    base_delta = staticmethod(frozen_delta)

    @staticmethod
    def forward(layer, cfg, x, y):
        R_V, R_U = _blocks(layer, cfg)
        h = _rotate(F.linear(x, layer.lora_Vh), R_V, transpose=True) * (layer.lora_S + layer.lora_delta_s)
        return y + F.linear(_rotate(h, R_U, transpose=False), layer.lora_U).to(y.dtype)

    @staticmethod
    def effective_weight(layer, cfg):
        eye = torch.eye(cfg.r, device=layer.lora_U.device)
        R_V, R_U = (eye if R is None else torch.block_diag(*R) for R in _blocks(layer, cfg))
        S = layer.lora_S.float() + layer.lora_delta_s.float()
        delta = (layer.lora_U.float() @ R_U.T * S) @ (R_V @ layer.lora_Vh.float())
        return layer.weight.float() + delta, layer.bias
