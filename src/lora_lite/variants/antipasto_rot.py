"""AntiPaSTO-rot: an additive singular-value delta plus block-diagonal Cayley rotations of the
frozen top-r singular basis. The rotation form of AntiPaSTO (arXiv 2601.07473), for A/B runs against the gain.

    U (d_out, r), S (r,), Vh (r, d_in) frozen buffers (W's top-r SVD part)
    per block n of size bs (r/bs blocks), t = rot_T[n] (bs(bs−1)/2,):
        T = strict upper triangle filled with t,  Ã = ½(T − Tᵀ)        (skew-symmetric)
        A = Ã · a·tanh(ρ/a)/ρ,  ρ = ‖Ã‖_F/√2,  a = 2·tan(max_rotation_angle / 2)
        R_n = (I − A/2)⁻¹ (I + A/2)                                 (Cayley: orthogonal, fp32)
    R_V = blockdiag(R_n) from rot_T   when rotate_basis ∈ {V, both}, else I
    R_U = blockdiag(R_n) from rot_T (U) or rot_T_u (both),          else I
    frozen part ((x Vhᵀ) ⊙ S) Uᵀ  ->  ((x (R_V Vh)ᵀ) ⊙ (S + δ_s)) (U R_Uᵀ)ᵀ
    W_eff = W + U (R_Uᵀ diag(S + δ_s) R_V − diag(S)) Vh

The rotation angles of R_n are 2·atan(σ_k/2) for the singular values σ_k of A, and
σ_max(A) ≤ ρ (a skew matrix's σ come in pairs, so ‖A‖_F² = 2Σσ_k² ≥ 2σ_max²) and
ρ(A) = a·tanh(ρ/a) < a: every angle of every block size stays below max_rotation_angle. For
bs = 2 (one angle) the bound is attained as ρ → ∞ and A = a·tanh(Ã_01/a) entrywise; for
larger blocks the cap is reached only when a block rotates in a single plane.

The hook adds only the change, written without cancellation: with p = x Vhᵀ,
q = p R_Vᵀ = p + p (R_V − I)ᵀ and a = q ⊙ (S + δ_s),
    Δy = ((q − p) ⊙ S + q ⊙ δ_s + a (R_U − I)) Uᵀ,   R − I = (I − A/2)⁻¹ A   (fp32 solve)
so R = I and δ_s = 0 give Δy = 0 exactly, and a small δ_s is not lost to the rounding of
S + δ_s in a bf16 forward. The rotations act on the (…, r) coordinates: Vh and U are never
rebuilt. Init: rot_T = 0 and δ_s ~ 4e-4 + N(0, 4e-4²), a deliberate small positive offset
that breaks the sign symmetry of δ_s; so the model is *not* the identity at init (zero δ_s for
an exact one). Trainable: r + r(bs−1)/2 per layer (+ r(bs−1)/2 more for `both`; r only for
`none`). No alpha.

Calibration is optional: with data the r directions are Wanda re-selected as in antipasto
(score S_i·sqrt(v_iᵀ C v_i), C = E[x xᵀ] over unmasked tokens; a `mean_abs` pooling would need
raw activations rather than second moments, so it is not offered). δ_s is drawn i.i.d. per direction, so the selection
needs no re-indexing of trainables. The change is rank r (exported as a plain LoRA). No PEFT equivalent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import RankConfig, knob
from ..variant import BenchSetting, Example, ParamSpec, Variant, like, register
from ._antipasto import (
    SVD_LRS, TWO_BLOCKS, big_rank, closed_forms, coordinates, frozen_part_macs, frozen_rank, init_top_r, svd_specs,
)


@dataclass(frozen=True, kw_only=True)
class AntiPaSTORotConfig(RankConfig):
    variant: str = field(default="antipasto_rot", init=False)
    r: int = frozen_rank(extra=", a multiple of block_size")
    block_size: int = knob(4, "size bs of each Cayley rotation block; >= 2 and divides r")
    max_rotation_angle: float = knob(0.5, "cap on every rotation angle, in radians; in (0, π)")
    rotate_basis: Literal["V", "U", "both", "none"] = knob("V", (
        "which singular basis rotates: 'V' (input side), 'U' (output side), 'both' (each its own "
        "rotations), 'none' (only the additive δ_s)"))

    def check(self):
        name = type(self).__name__
        if self.block_size < 2 or self.r % self.block_size:
            raise ValueError(f"{name}.block_size: must be >= 2 and divide r={self.r}, got {self.block_size}")
        if not 0.0 < self.max_rotation_angle < math.pi:
            raise ValueError(f"{name}.max_rotation_angle: must be in (0, pi), got {self.max_rotation_angle}")


def _rotations_minus_identity(t: torch.Tensor, bs: int, max_angle: float) -> torch.Tensor:
    """(r/bs, bs(bs−1)/2) parameters -> (r/bs, bs, bs) blocks R_n − I of bounded Cayley
    rotations, fp32, as (I − A/2)⁻¹ A (no I to cancel)."""
    i, j = torch.triu_indices(bs, bs, 1, device=t.device)
    T = t.new_zeros(t.shape[0], bs, bs, dtype=torch.float32)
    T[:, i, j] = t.float()
    A = 0.5 * (T - T.transpose(1, 2))
    lim = 2.0 * math.tan(max_angle / 2.0)
    # ρ = ‖Ã‖_F/√2 (+ a tiny floor: finite gradient at Ã = 0); A·lim·tanh(ρ/lim)/ρ -> A as ρ -> 0
    rho = (A.square().sum((1, 2), keepdim=True) / 2.0 + 1e-30).sqrt()
    A = A * (lim * torch.tanh(rho / lim) / rho)
    eye = torch.eye(bs, device=t.device)
    return torch.linalg.solve(eye - A / 2.0, A)


def _blocks(layer, cfg):
    """(R_V − I, R_U − I), each (r/bs, bs, bs) fp32, or None for the identity."""
    basis = cfg.rotate_basis

    def rot(t):
        return _rotations_minus_identity(t, cfg.block_size, cfg.max_rotation_angle)

    R_V = rot(layer.lora_rot_T) if basis in ("V", "both") else None
    R_U = rot(layer.lora_rot_T if basis == "U" else layer.lora_rot_T_u) if basis in ("U", "both") else None
    return R_V, R_U


def _rotate(h: torch.Tensor, R: torch.Tensor | None, transpose: bool) -> torch.Tensor:
    """h (…, r) -> h blockdiag(R)ᵀ (transpose) or h blockdiag(R), blockwise; 0 for R = None."""
    if R is None:
        return torch.zeros_like(h)
    hb = h.unflatten(-1, (R.shape[0], R.shape[1]))
    eq = "...nk,njk->...nj" if transpose else "...nj,njk->...nk"
    return torch.einsum(eq, hb, R.to(h.dtype)).flatten(-2)


def _full(blocks: torch.Tensor | None, r: int, device) -> torch.Tensor:
    """blockdiag(I + blocks) (r, r), fp32."""
    eye = torch.eye(r, device=device)
    return eye if blocks is None else eye + torch.block_diag(*blocks)


def _core(layer, cfg):
    """M = R_Uᵀ diag(S + δ_s) R_V − diag(S) (r, r), fp32."""
    R_V, R_U = (_full(B, cfg.r, layer.lora_S.device) for B in _blocks(layer, cfg))
    S = layer.lora_S.float()
    return R_U.T @ torch.diag(S + layer.lora_delta_s.float()) @ R_V - torch.diag(S)


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

    @staticmethod
    def delta(layer, cfg, x, y):
        R_V, R_U = _blocks(layer, cfg)
        p, U = coordinates(layer, x)
        S, d_s = like(x, layer.lora_S, layer.lora_delta_s)
        dq = _rotate(p, R_V, transpose=True)         # q − p
        q = p + dq
        a = q * (S + d_s)
        return F.linear(dq * S + q * d_s + _rotate(a, R_U, transpose=False), U)

    effective_weight, low_rank_delta = closed_forms(_core)

    @staticmethod
    def params_per_layer(d_in, d_out, cfg):
        sides = {"none": 0, "V": 1, "U": 1, "both": 2}[cfg.rotate_basis]
        return cfg.r + sides * cfg.r * (cfg.block_size - 1) // 2

    neutral = ("lora_delta_s",)  # δ_s = 0 and rot_T = 0 (R = I) is the exact identity
    # U/both/none change only the hook math that the V case runs on both test models
    examples = {
        "antipasto_rot": Example({"r": 8, "block_size": 4, **TWO_BLOCKS}),
        "antipasto_rot_U": Example({"r": 4, "block_size": 2, "rotate_basis": "U", **TWO_BLOCKS},
                                   calibrate=False, minilm=False),
        "antipasto_rot_both": Example({"r": 8, "block_size": 4, "rotate_basis": "both", **TWO_BLOCKS}, minilm=False),
        "antipasto_rot_none": Example({"r": 4, "rotate_basis": "none", **TWO_BLOCKS}, calibrate=False, minilm=False),
    }
    # the Cayley solves of the block rotations run once per call: r·bs per rotated side
    bench = BenchSetting(SVD_LRS, big_rank, lambda i, o, c: (
        frozen_part_macs(i, o, c), c.r * c.block_size * {"V": i, "U": o, "both": i + o, "none": 0}[c.rotate_basis]),
        family="svd")
