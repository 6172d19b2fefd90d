"""AntiPaSTO: freeze W's top-r SVD part and learn a bounded gain per singular value (arXiv 2601.07473).

    W = U diag(S) Vh (fp32, read once)                         U_r, S_r, Vh_r frozen buffers
    S_eff = S_r ⊙ (1 + ELU(coeff·g))      g (r,) trainable, 0  ->  S_eff = S_r at init
    W_eff = W − U_r diag(S_r) Vh_r + U_r diag(S_eff) Vh_r = W + U_r diag(S_r ⊙ ELU(coeff·g)) Vh_r
    Δy = ((x Vh_rᵀ) ⊙ S_r ⊙ ELU(coeff·g)) U_rᵀ        exactly 0 at g = 0; W is never written

1 + ELU(z) is e^z below 0 and 1 + z above: positive, C¹, 1 at z = 0, so a direction can be
suppressed towards 0 or amplified, never flipped. `coeff` steers at run time (0 = base model,
< 0 swaps suppress and amplify): `lora_lite.reconfigure(model, coeff=c)`, with c a float or a
(batch,) / (batch, seq) tensor (z then has a row per example / token). `suppress_only`
holds g ≤ 0 (a straight-through clamp: the forward is clamped, the gradient passes, so a g
that crossed 0 can come back), keeping every factor in (0, 1]; that needs coeff ≥ 0, which
the config enforces. No alpha. Trainable: r per layer.

Calibration is optional. Without data the r directions are W's top-r singular triplets. With
data they are the r triplets of W with the largest Wanda-style score S_i·sqrt(v_iᵀ C v_i),
C = E[x xᵀ] over unmasked tokens (Wanda arXiv 2306.11695, ASVD 2312.05821): the directions that
carry the most output energy on real inputs, kept in descending-S order. This is the `rms`
activation pooling; a `mean_abs` pooling would need raw activations, not second moments, and
is not offered. Selection re-ranks W's own directions; it does not re-orient them (see
antipasto_corda / antipasto_asvd). No PEFT equivalent; without data, W − U_r diag(S_r) Vh_r
equals PEFT PiSSA's residual base weight. The change is rank r: exported as a plain LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import RankConfig, knob, least
from ..variant import BenchSetting, Example, ParamSpec, Variant, register
from ._antipasto import (
    TWO_BLOCKS, big_rank, closed_forms, frozen_part_macs, frozen_rank, gain_core, gain_delta, init_top_r,
    steering_coeff, svd_specs,
)


@dataclass(frozen=True, kw_only=True)
class AntiPaSTOConfig(RankConfig):
    variant: str = field(default="antipasto", init=False)
    r: int = frozen_rank()
    coeff: float = steering_coeff("the gain exponent, z = coeff·g (< 0 swaps suppress and amplify)")
    suppress_only: bool = knob(False, "hold g <= 0 (a straight-through clamp), so every gain stays in "
                                      "(0, 1]: directions are only suppressed; needs coeff >= 0")
    retired_fields = ("alpha",)

    def check(self):
        if self.suppress_only and least(self.coeff) < 0:
            raise ValueError(
                f"{type(self).__name__}.coeff: suppress_only keeps every gain in (0, 1] only for "
                f"coeff >= 0, got {self.coeff}; set suppress_only=False to amplify"
            )


@register
class AntiPaSTO(Variant):
    name = "antipasto"
    config = AntiPaSTOConfig
    needs_dense_weight = True
    calibration = "gram"
    runtime_fields = ("coeff",)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**svd_specs(d_in, d_out, cfg.r), "lora_g": ParamSpec((cfg.r,), "zeros")}

    init = staticmethod(init_top_r)
    delta = staticmethod(gain_delta)

    effective_weight, low_rank_delta = closed_forms(gain_core)

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: cfg.r)
    examples = {
        "antipasto": Example({"r": 4, **TWO_BLOCKS}),
        "antipasto_suppress": Example({"r": 4, "suppress_only": True, "coeff": 0.5, **TWO_BLOCKS}, calibrate=False),
    }
    bench = BenchSetting("svd", big_rank, lambda i, o, c: (frozen_part_macs(i, o, c), 0))
