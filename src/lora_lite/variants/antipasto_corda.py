"""AntiPaSTO-CorDA: orient the frozen SVD part by the input covariance, then learn the gain.
CorDA arXiv 2406.05223 (IPM mode: keep the top-r); gain as in antipasto (arXiv 2601.07473).

    C = E[x xᵀ] over unmasked calibration tokens,  C_ε: eigenvalues λ ← max(λ, 0) + cov_eps
    W C_ε^{1/2} = U_t diag(S_t) Vh_t (fp32)
    U = U_t[:, :r],  S = S_t[:r],  P = Vh_t[:r] C_ε^{-1/2}      frozen buffers (P rows oblique)
    Δy = ((x Pᵀ) ⊙ S ⊙ ELU(coeff·g)) Uᵀ,   g (r,) trainable, 0  ->  Δy = 0 exactly at init
    W_eff = W + U diag(S ⊙ ELU(coeff·g)) P = (W − U diag(S) P) + U diag(S_eff) P

W is never written: the residual W − U diag(S) P exists only implicitly. U diag(S) P is the rank-r Ŵ minimising E‖(W − Ŵ)x‖² = ‖(W − Ŵ)C^{1/2}‖²_F (Eckart–Young in
the C-weighted norm): the top-r directions carry the most output energy on real activations.
Calibration data is required (attach refuses without it, before touching the model); load
needs none, since U, S, P are saved. cov_eps is absolute (in units of x²). coeff, suppress_only
as in antipasto; coeff changes at run time via `lora_lite.reconfigure(model, coeff=c)`.

This is a C^{1/2} whitening, not HF PEFT 0.21's CorDA, which takes svd(W C_d) with a damped
C_d = C + δ·mean(diag C)·I and V = (Vh C_d^{-1})ᵀ from per-call max-normalised inputs without
a padding mask (a λ instead of √λ weighting of the same idea).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import knob
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, Variant, register
from ._antipasto import (
    SVD_LRS, TWO_BLOCKS, big_rank, closed_forms, frozen_part_macs, gain_core, gain_delta, store_svd, svd_specs,
)
from ._svd import oriented_top_r, second_moment
from .antipasto import AntiPaSTOConfig


@dataclass(frozen=True, kw_only=True)
class AntiPaSTOCorDAConfig(AntiPaSTOConfig):
    variant: str = field(default="antipasto_corda", init=False)
    cov_eps: float = knob(1e-3, "ε added to the eigenvalues of C = E[x xᵀ] before C^(±1/2); absolute "
                                "(units of x²), > 0")

    def check(self):
        super().check()
        if not self.cov_eps > 0:
            raise ValueError(f"{type(self).__name__}.cov_eps: must be > 0 (C^(-1/2) needs it), got {self.cov_eps}")


@register
class AntiPaSTOCorDA(Variant):
    name = "antipasto_corda"
    config = AntiPaSTOCorDAConfig
    needs_dense_weight = True
    calibration = "gram"
    requires_calibration = True
    runtime_fields = ("coeff",)

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**svd_specs(d_in, d_out, cfg.r, "lora_P"), "lora_g": ParamSpec((cfg.r,), "zeros")}

    @staticmethod
    def init(layer, cfg, stats):
        U, S, P = oriented_top_r(dense_weight(layer), cfg.r, second_moment(stats), cfg.cov_eps)
        store_svd(layer, U, S, P, "lora_P")

    delta = staticmethod(gain_delta)

    effective_weight, low_rank_delta = closed_forms(gain_core)

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: cfg.r)
    examples = {"antipasto_corda": Example({"r": 4, **TWO_BLOCKS})}
    # the benchmark's PEFT row is the nearest analogue, a CorDA-initialised LoRA at the same r
    bench = BenchSetting(SVD_LRS, big_rank, lambda i, o, c: (frozen_part_macs(i, o, c), 0), peft="corda",
                         family="svd")
