"""AntiPaSTO-DPLR: the antipasto gain plus a rank-k core that mixes directions inside the frozen
top-r subspace (diagonal-plus-low-rank). Base method: antipasto (arXiv 2601.07473).

    U (d_out, r), S (r,), Vh (r, d_in) frozen buffers (W's top-r SVD part), as antipasto
    p = x Vhᵀ (…, r)
    frozen part p ⊙ S  ->  p ⊙ S ⊙ (1 + ELU(coeff·g)) + coeff·(p Aᵀ) Bᵀ
                            g (r,) 0;  A (k, r) kaiming;  B (r, k) 0
    Δy = (p ⊙ S ⊙ ELU(coeff·g) + coeff·(p Aᵀ) Bᵀ) Uᵀ,    W_eff = W + U (diag(S ⊙ ELU(coeff·g)) + coeff·B A) Vh

The core acts on the unscaled coordinates p = x Vhᵀ, so its effect does not grow with S. There
is no α/r scale on it (no alpha field). g = 0 and B = 0 make Δy = 0 exactly; at step 0 grad A = 0 by design, as for LoRA's A. `suppress_only` holds only the
gain's g ≤ 0; the core can still amplify. `coeff` scales both and changes at run time via
`lora_lite.reconfigure(model, coeff=c)`; coeff = 0 is the base model.

core_rank k must be in [1, r]: k = 0 would be exactly `antipasto`, so it is refused with a
pointer there rather than kept as a second spelling. Trainable: r + 2rk per layer. Calibration is
optional and does what it does for antipasto: Wanda re-selection of the r directions by
S_i·sqrt(v_iᵀ C v_i), C = E[x xᵀ] over unmasked tokens. No PEFT equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from ..config import knob
from ..variant import BenchSetting, Example, ParamSpec, Variant, like, per_row, register
from ._antipasto import (
    TWO_BLOCKS, big_rank, closed_forms, coordinates, frozen_part_macs, gain_core, gain_minus_one, init_top_r,
    svd_specs,
)
from .antipasto import AntiPaSTOConfig


@dataclass(frozen=True, kw_only=True)
class AntiPaSTODPLRConfig(AntiPaSTOConfig):
    variant: str = field(default="antipasto_dplr", init=False)
    core_rank: int = knob(8, "rank k of the core B A that mixes the r frozen directions; 1 <= k <= r "
                             "(no core is antipasto)")
    renamed_fields = {"lora_rank": "core_rank"}  # its name in configs of lora-lite <= 0.1

    def check(self):
        super().check()
        if self.core_rank < 1:
            raise ValueError(
                f"AntiPaSTODPLRConfig.core_rank: must be >= 1, got {self.core_rank}; "
                f"with no core use AntiPaSTOConfig (variant 'antipasto')"
            )
        if self.core_rank > self.r:
            raise ValueError(f"AntiPaSTODPLRConfig.core_rank: must be <= r={self.r}, got {self.core_rank}")


def _core(layer, cfg):
    """M = diag(S ⊙ (gain − 1)) + coeff·B A (r, r), fp32."""
    return gain_core(layer, cfg) + per_row(cfg.coeff, None) * (layer.lora_B.float() @ layer.lora_A.float())


@register
class AntiPaSTODPLR(Variant):
    name = "antipasto_dplr"
    config = AntiPaSTODPLRConfig
    needs_dense_weight = True
    calibration = "gram"
    runtime_fields = ("coeff",)
    zero_grad_at_init = ("lora_A",)  # grad A ∝ B = 0

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        r, k = cfg.r, cfg.core_rank
        return {
            **svd_specs(d_in, d_out, r),
            "lora_g": ParamSpec((r,), "zeros"),
            "lora_A": ParamSpec((k, r), "kaiming"),
            "lora_B": ParamSpec((r, k), "zeros"),
        }

    init = staticmethod(init_top_r)

    @staticmethod
    def delta(layer, cfg, x, y):
        p, U = coordinates(layer, x)
        A, B, S_change = like(x, layer.lora_A, layer.lora_B, layer.lora_S.float() * gain_minus_one(layer, cfg, x))
        return F.linear(p * S_change + per_row(cfg.coeff, p) * F.linear(F.linear(p, A), B), U)

    effective_weight, low_rank_delta = closed_forms(_core)

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: cfg.r + 2 * cfg.r * cfg.core_rank)
    examples = {"antipasto_dplr": Example({"r": 8, "core_rank": 2, **TWO_BLOCKS})}
    # the rank-k core trains like a LoRA: its own lr family (the gain-only members want 10-50x
    # larger steps, at which the core diverges)
    bench = BenchSetting("dplr", big_rank,
                         lambda i, o, c: (frozen_part_macs(i, o, c) + 2 * c.r * c.core_rank, 0))
