"""AntiPaSTO-ASVD: antipasto_corda with the diagonal of the input second moment only.
ASVD arXiv 2312.05821 (activation-aware SVD: scale W's input channels by their activation size).

    c = diag(E[x xᵀ]) = E[x ⊙ x] over unmasked calibration tokens (d_in,),  c_ε = max(c, 0) + cov_eps
    W diag(√c_ε) = U_t diag(S_t) Vh_t (fp32)
    U = U_t[:, :r],  S = S_t[:r],  P = Vh_t[:r] diag(c_ε^{-1/2})     frozen buffers
    forward (Δy = ((x Pᵀ) ⊙ S ⊙ ELU(coeff·g)) Uᵀ) and W_eff as antipasto_corda

The optimum of E‖(W − Ŵ)x‖² when the input channels are treated as uncorrelated; it needs a
(d_in,) statistic instead of (d_in, d_in), so calibration memory and the init are cheaper. The
ASVD paper scales by mean|x|^α; E[x²]^{1/2} is the α = 1 analogue that second moments give.
Same knobs, tensors (lora_U, lora_S, lora_P, lora_g), identity and reload guarantees as
antipasto_corda; calibration data is required.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import knob
from ..variant import BenchSetting, Example, register
from ._antipasto import SVD_LRS, TWO_BLOCKS, big_rank, frozen_part_macs
from .antipasto_corda import AntiPaSTOCorDA, AntiPaSTOCorDAConfig


@dataclass(frozen=True, kw_only=True)
class AntiPaSTOASVDConfig(AntiPaSTOCorDAConfig):
    variant: str = field(default="antipasto_asvd", init=False)
    cov_eps: float = knob(1e-3, "ε added to c = diag(E[x xᵀ]) before c^(±1/2); absolute (units of x²), > 0")


@register
class AntiPaSTOASVD(AntiPaSTOCorDA):
    """CorDA's math with C replaced by diag(C): `oriented_top_r` takes the (d_in,) vector."""

    name = "antipasto_asvd"
    config = AntiPaSTOASVDConfig
    calibration = "diag"
    examples = {"antipasto_asvd": Example({"r": 4, **TWO_BLOCKS})}
    bench = BenchSetting(SVD_LRS, big_rank, lambda i, o, c: (frozen_part_macs(i, o, c), 0), family="svd")
