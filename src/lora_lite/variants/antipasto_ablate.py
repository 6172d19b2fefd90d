"""AntiPaSTO-ablate: learn k directions to project out of the S-scaled coordinates of W's frozen
top-r part, a trainable directional ablation (Arditi et al. arXiv 2406.11717). Meant for
residual writers (down_proj, o_proj). Base method: antipasto (arXiv 2601.07473).

    U (d_out, r), S (r,), Vh (r, d_in) frozen buffers (W's top-r SVD part)
    Ĉ = QR(c).Q (r, k) orthonormal,  α̂ = clamp(α, 0, 1)      c (r, k) ~ N(0, 1/r); α (k,) = init_alpha
    h = (x Vhᵀ) ⊙ S,   frozen part h Uᵀ  ->  (h − coeff·((h Ĉ) ⊙ α̂) Ĉᵀ) Uᵀ
    Δy = −coeff·((h Ĉ) ⊙ α̂) Ĉᵀ Uᵀ,   W_eff = W − coeff·U Ĉ diag(α̂) Ĉᵀ diag(S) Vh

Not identity at init: it starts as a contraction by init_alpha (default 5%) along a random
unit direction ĉ, ΔW0 = −coeff·init_alpha·U ĉĉᵀ diag(S) Vh. It is the identity only with
init_alpha = 0 (then c gets no gradient until α moves) or coeff = 0. The map is a contraction
(eigenvalues 1 − coeff·α̂ in [0, 1]) for coeff in [0, 1]; coeff is not clamped, so coeff > 1
over-ablates and coeff < 0 amplifies the directions: a steering knob, changed at run time with
`lora_lite.reconfigure(model, coeff=c)`. The clamp of α is straight-through (the
forward is clamped to [0, 1], the gradient passes), so an α pushed below 0 keeps learning and
can return, where a plain clamp would freeze α and c for good. `lora_strength` is the ablation
strength, not a LoRA scale; there is no `alpha` field. Trainable: r·k + k per layer.

cov_orient=True orients the frozen part by the input covariance exactly as antipasto_corda
(P = Vh_t[:r] C_ε^{-1/2}, C over unmasked tokens) and stores P in the `lora_Vh` slot, whose rows
are then oblique rather than orthonormal. It needs calibration data; data without cov_orient is
refused before anything runs (it would change nothing). load needs no data either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import RankConfig, knob
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, Variant, like, per_row, register, straight_through_clamp
from ._antipasto import (
    TWO_BLOCKS, big_rank, closed_forms, coordinates, frozen_part_macs, frozen_rank, steering_coeff, store_svd,
    svd_specs,
)
from ._svd import oriented_top_r, second_moment, top_r_svd


@dataclass(frozen=True, kw_only=True)
class AntiPaSTOAblateConfig(RankConfig):
    variant: str = field(default="antipasto_ablate", init=False)
    r: int = frozen_rank()
    k: int = knob(1, "number of directions to ablate; 1 <= k <= r")
    init_alpha: float = knob(0.05, "initial ablation strength α of each direction, in [0, 1]; 0 starts as "
                                   "the identity (then c has no gradient until α moves)")
    coeff: float = steering_coeff("the ablation (> 1 over-ablates, < 0 amplifies)")
    cov_orient: bool = knob(False, "orient the frozen part by the input covariance as antipasto_corda; "
                                   "needs calibration data (data without it is refused)")
    cov_eps: float = knob(1e-3, "with cov_orient: ε added to the eigenvalues of C = E[x xᵀ]; absolute, > 0")
    retired_fields = ("alpha",)

    def check(self):
        name = type(self).__name__
        if not 1 <= self.k <= self.r:
            raise ValueError(f"{name}.k: must be in [1, r={self.r}], got {self.k}")
        if not 0.0 <= self.init_alpha <= 1.0:
            raise ValueError(f"{name}.init_alpha: must be in [0, 1] (α is clamped there), got {self.init_alpha}")
        if not self.cov_eps > 0:
            raise ValueError(f"{name}.cov_eps: must be > 0, got {self.cov_eps}")


def _ablation(layer):
    """Ĉ (r, k) with orthonormal columns spanning c, and α̂ = clamp(α, 0, 1), fp32."""
    C_hat = torch.linalg.qr(layer.lora_c.float()).Q
    return C_hat, straight_through_clamp(layer.lora_strength.float(), 0.0, 1.0)


def _core(layer, cfg):
    """M = −coeff·Ĉ diag(α̂) Ĉᵀ diag(S) (r, r), fp32."""
    C_hat, a = _ablation(layer)
    return -per_row(cfg.coeff, None) * (C_hat * a) @ C_hat.T * layer.lora_S.float()


@register
class AntiPaSTOAblate(Variant):
    name = "antipasto_ablate"
    config = AntiPaSTOAblateConfig
    needs_dense_weight = True
    calibration = "gram"
    identity_at_init = False
    runtime_fields = ("coeff",)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        r, k = cfg.r, cfg.k
        return {
            **svd_specs(d_in, d_out, r),
            "lora_c": ParamSpec((r, k), lambda t: t.normal_(0.0, 1.0 / math.sqrt(r))),
            "lora_strength": ParamSpec((k,), lambda t: t.fill_(cfg.init_alpha)),
        }

    @classmethod
    def calibration_needs(cls, cfg):
        return ("gram", True) if cfg.cov_orient else (None, False)

    @staticmethod
    def init(layer, cfg, stats):
        if stats is None:
            store_svd(layer, *top_r_svd(dense_weight(layer), cfg.r))
        else:
            store_svd(layer, *oriented_top_r(dense_weight(layer), cfg.r, second_moment(stats), cfg.cov_eps))

    @staticmethod
    def delta(layer, cfg, x, y):
        p, U = coordinates(layer, x)
        C_hat, a, S = like(x, *_ablation(layer), layer.lora_S)
        h = p * S
        return -per_row(cfg.coeff, x) * F.linear(F.linear((h @ C_hat) * a, C_hat), U)

    effective_weight, low_rank_delta = closed_forms(_core)

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: cfg.r * cfg.k + cfg.k)
    renamed_tensors = {"lora_alpha": "lora_strength"}  # its name in checkpoints of lora-lite <= 0.1
    neutral = ("lora_strength",)  # α = 0 is the exact identity (the init_alpha contraction is deliberate)
    examples = {
        "antipasto_ablate": Example({"r": 4, "k": 2, **TWO_BLOCKS}, calibrate=False),
        "antipasto_ablate_orient": Example({"r": 4, "cov_orient": True, **TWO_BLOCKS}),
    }
    # its own, smaller lr family: the strength α is clamped to [0, 1], and the family's large
    # gain steps push it past the bounds (straight-through, but it lingers there)
    bench = BenchSetting("ablate", big_rank, lambda i, o, c: (frozen_part_macs(i, o, c) + 2 * c.r * c.k, 0))
