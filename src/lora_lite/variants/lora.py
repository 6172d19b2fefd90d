"""LoRA: a trainable low-rank product beside the frozen weight (arXiv 2106.09685).

    Δy = s · (x Aᵀ) Bᵀ,  y' = y + Δy       s = alpha / r
    A (r, d_in)   trainable, kaiming-uniform (±1/√d_in)
    B (d_out, r)  trainable, 0  ->  identity at init, bit for bit; at step 0 grad A = 0
    W_eff = W + s·B A,  b_eff = b           (the bias stays inside y, untouched)

Matches HF PEFT `LoraConfig(r, lora_alpha=alpha, lora_dropout=0, use_rslora=False)` with
lora_A.weight = A, lora_B.weight = B. No dropout and no rsLoRA here: rsLoRA's α/√r is
alpha = α_peft·√r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from ..config import AdapterConfig
from ..quant import dense_weight
from ..variant import ParamSpec, Variant, like, register


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(AdapterConfig):
    variant: str = field(default="lora", init=False)


def lora_specs(d_in, d_out, r):
    """A kaiming (r, d_in), B zeros (d_out, r): the LoRA pair, zero delta at init."""
    return {
        "lora_A": ParamSpec((r, d_in), "kaiming"),
        "lora_B": ParamSpec((d_out, r), "zeros"),
    }


def low_rank(x, A, B, scale):
    """scale·(x Aᵀ) Bᵀ in x's dtype; scaling the (…, r) intermediate is cheaper than (…, d_out)."""
    A, B = like(x, A, B)
    return F.linear(F.linear(x, A) * scale, B)


def lora_delta(layer, cfg, x, y):
    """Δy = s·(x Aᵀ) Bᵀ."""
    return low_rank(x, layer.lora_A, layer.lora_B, cfg.scale)


def lora_effective_weight(layer, cfg):
    W = dense_weight(layer) + cfg.scale * (layer.lora_B.float() @ layer.lora_A.float())
    return W, layer.bias


def lora_low_rank_delta(layer, cfg):
    return cfg.scale * layer.lora_B.float(), layer.lora_A.float()


@register
class LoRA(Variant):
    name = "lora"
    config = LoRAConfig
    zero_grad_at_init = ("lora_A",)  # grad A = s·Bᵀ(...) = 0 while B = 0

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return lora_specs(d_in, d_out, cfg.r)

    delta = staticmethod(lora_delta)
    effective_weight = staticmethod(lora_effective_weight)
    low_rank_delta = staticmethod(lora_low_rank_delta)
