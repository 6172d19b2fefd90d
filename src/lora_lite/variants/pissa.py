"""PiSSA: train the principal rank-r SVD part of W, freeze the residual (arXiv 2404.02948).

    W = U diag(S) Vh (fp32),  Se = S_r / s,  s = alpha / r
    A = diag(√Se) Vh_r  (r, d_in)   trainable;  A0 = A at init, frozen buffer
    B = U_r diag(√Se)   (d_out, r)  trainable;  B0 = B at init, frozen buffer
    W_res = W − s·B0 A0,  y' = x W_resᵀ + b + s·(x Aᵀ) Bᵀ

computed additively, without ever writing W:

    Δy = s·(x Aᵀ) Bᵀ − s·(x A0ᵀ) B0ᵀ          (the same function and gradients as W_res)

At init A = A0 and B = B0, and the two products are the same computation, so Δy = 0 bit for
bit in any dtype. W_eff − W = s·(B A − B0 A0) = [sB, −sB0] [A; A0]: a rank-2r LoRA. Any alpha
works: the scale is folded into the init. Matches HF PEFT `LoraConfig(init_lora_weights="pissa")`
(same factors; PEFT's residual base weight is W − s·B0 A0). The checkpoint holds A0, B0 too,
so load rebuilds the adapted model on a pristine base without an SVD.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import AdapterConfig
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, register
from ._svd import top_r_svd
from .lora import PEFT_LORA_TENSORS, lora_params, low_rank, peft_lora_fields


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
        U, S, Vh = top_r_svd(dense_weight(layer), cfg.r)
        root = (S / cfg.scale).sqrt()
        layer.lora_A0.copy_(root[:, None] * Vh)
        layer.lora_B0.copy_(U * root)
        layer.lora_A.copy_(layer.lora_A0)
        layer.lora_B.copy_(layer.lora_B0)

    @staticmethod
    def delta(layer, cfg, x, y):
        s = cfg.scale
        return low_rank(x, layer.lora_A, layer.lora_B, s) - low_rank(x, layer.lora_A0, layer.lora_B0, s)

    @staticmethod
    def low_rank_delta(layer, cfg):
        B = cfg.scale * torch.cat([layer.lora_B.float(), -layer.lora_B0.float()], dim=1)
        return B, torch.cat([layer.lora_A.float(), layer.lora_A0.float()], dim=0)

    params_per_layer = staticmethod(lora_params)
    examples = {"pissa": Example({"r": 4, "alpha": 8.0})}
    # PEFT's PiSSA keeps A, B in its LoRA slots and writes W − s·B0 A0 into the base layer: the
    # same function (parity tests), but its adapter only fits that residual base, so we export
    # the rank-2r change [sB, −sB0][A; A0] as a plain LoRA instead.
    peft = PeftMap("LORA", PEFT_LORA_TENSORS, lambda cfg, t: peft_lora_fields(cfg, t, init_lora_weights="pissa"),
                   export=False)
    # the scale is folded into the init, so alpha = r (s = 1) as in the seed benchmark; the
    # additive form runs two rank-r products
    bench = BenchSetting("pissa", lambda r, g: {"r": r, "alpha": float(r)},
                         lambda i, o, c: (2 * c.r * (i + o), 0), peft="pissa")
