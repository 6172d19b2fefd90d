"""LoRA-XS: freeze W's top-r SVD factors, train only an r x r core between them (arXiv 2405.17604).

    W = U diag(S) Vh (fp32, read once; W itself is not changed)
    A = diag(S_r) Vh_r (r, d_in) frozen buffer   (all of S folded into A: rows not orthonormal)
    B = U_r            (d_out, r) frozen buffer
    R (r, r) trainable, N(0, 1e-5²) elementwise  ->  deliberately *not* exact identity
    Δy = s·((x Aᵀ) Rᵀ) Bᵀ,   W_eff = W + s·B R A

R = 0 would be an exact identity that still trains (grad R ≠ 0 there); the small random init
follows the paper. The deviation from the base is exactly s·B R A, which vanishes with R = 0.
alpha defaults to r (s = 1), the paper's reference setting (with lr ≈ 4e-3); the shared LoRA
default alpha = 16 would silently double the scale at r = 8. Our R is the transpose of the
paper's row-vector R. No PEFT equivalent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from ..config import ScaledConfig, knob
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, Variant, like, register
from ._svd import top_r_svd


@dataclass(frozen=True, kw_only=True)
class LoRAXSConfig(ScaledConfig):
    variant: str = field(default="lora_xs", init=False)
    alpha: float | None = knob(None, "scale numerator, s = alpha / r; None (default): alpha = r, so "
                                     "s = 1, the paper's reference setting")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


@register
class LoRAXS(Variant):
    name = "lora_xs"
    config = LoRAXSConfig
    needs_dense_weight = True
    identity_at_init = False
    scale_outside = True

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        r = cfg.r
        return {
            "lora_A": ParamSpec((r, d_in), "zeros", trainable=False),
            "lora_B": ParamSpec((d_out, r), "zeros", trainable=False),
            "lora_R": ParamSpec((r, r), lambda t: t.normal_(0.0, 1e-5)),
        }

    @staticmethod
    def init(layer, cfg, stats):
        U, S, Vh = top_r_svd(dense_weight(layer), cfg.r)
        layer.lora_A.copy_(S[:, None] * Vh)
        layer.lora_B.copy_(U)

    @staticmethod
    def delta(layer, cfg, x, y):
        A, R, B = like(x, layer.lora_A, layer.lora_R, layer.lora_B)
        return F.linear(F.linear(F.linear(x, A), R), B)  # / s: scale_outside

    @staticmethod
    def low_rank_delta(layer, cfg):
        return cfg.scale * layer.lora_B.float() @ layer.lora_R.float(), layer.lora_A.float()

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: cfg.r * cfg.r)
    neutral = ("lora_R",)  # R = 0 is the exact identity (the small random R is deliberate)
    examples = {"lora_xs": Example({"r": 4, "alpha": 4.0})}
    bench = BenchSetting((1e-4, 3e-4, 1e-3, 4e-3, 1e-2), lambda r, g: {"r": r, "alpha": float(r)},
                         lambda i, o, c: (c.r * (i + o) + c.r * c.r, 0))
