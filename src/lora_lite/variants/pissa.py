"""PiSSA: train the principal rank-r SVD part of W, freeze the residual (arXiv 2404.02948).

    W = U diag(S) Vh (fp32),  Se = S_r / s,  s = alpha / r
    A = diag(√Se) Vh_r  (r, d_in)   trainable
    B = U_r diag(√Se)   (d_out, r)  trainable
    W_res = W − s·B0 A0,  y' = x W_resᵀ + b + s·(x Aᵀ) Bᵀ

Δ0 = s·B0 A0 is built from the *initial* factors, kept as frozen buffers lora_A0 / lora_B0
(A and B move during training), so load() rebuilds W_res on a pristine base without an SVD
and detach() restores W = W_res + Δ0. Δ0 uses the stored (dtype-rounded) factors, so the only
identity error is one rounding of W_res. Any alpha works: the scale is folded into the init.
Matches HF PEFT `LoraConfig(init_lora_weights="pissa")` (same factors, same W_res).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import AdapterConfig
from ..variant import ParamSpec, Variant, register
from ._svd import top_r_svd
from .lora import lora_effective_weight, lora_forward


@dataclass(frozen=True, kw_only=True)
class PiSSAConfig(AdapterConfig):
    variant: str = field(default="pissa", init=False)


@register
class PiSSA(Variant):
    name = "pissa"
    config = PiSSAConfig
    needs_dense_weight = True

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        r = cfg.r
        return {
            "lora_A": ParamSpec((r, d_in), "zeros"),
            "lora_B": ParamSpec((d_out, r), "zeros"),
            "lora_A0": ParamSpec((r, d_in), "zeros", trainable=False),
            "lora_B0": ParamSpec((d_out, r), "zeros", trainable=False),
        }

    @staticmethod
    def init(layer, cfg, stats):
        U, S, Vh = top_r_svd(layer.weight, cfg.r)
        root = (S / cfg.scale).sqrt()
        layer.lora_A0.copy_(root[:, None] * Vh)
        layer.lora_B0.copy_(U * root)
        layer.lora_A.copy_(layer.lora_A0)
        layer.lora_B.copy_(layer.lora_B0)

    @staticmethod
    def base_delta(layer, cfg):
        return (cfg.scale * layer.lora_B0.float()) @ layer.lora_A0.float()

    forward = staticmethod(lora_forward)
    effective_weight = staticmethod(lora_effective_weight)
