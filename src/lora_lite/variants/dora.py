"""DoRA: a trainable per-row magnitude times the row-normalised direction W + sBA (arXiv 2402.09353).

    V = W + s·sg(B A)                   (d_out, d_in), recomputed every call
    n = sg(max(‖V_o,:‖₂, 1e-12))        row norms, detached (paper §4.3)
    y' = b + (m / n) ⊙ ((y − b) + s·(x Aᵀ) Bᵀ)
    A (r, d_in) kaiming, B (d_out, r) 0, m (d_out,) = ‖W_o,:‖₂  ->  at init n = m: identity
    W_eff = diag(m / ‖W + sBA‖_row) (W + sBA),  b_eff = b   (the bias is not rescaled)

Reads the dense W on every call, so torch.nn.Linear only. Matches HF PEFT
`LoraConfig(use_dora=True, lora_dropout=0)` with lora_magnitude_vector = m.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import AdapterConfig
from ..variant import ParamSpec, Variant, register
from .lora import lora_specs


@dataclass(frozen=True, kw_only=True)
class DoRAConfig(AdapterConfig):
    variant: str = field(default="dora", init=False)


def _direction(layer, cfg):
    """V = W + s·sg(BA) in the adapter dtype; n = sg(row norms of V)."""
    BA = (layer.lora_B @ layer.lora_A).detach()
    V = layer.weight.to(BA.dtype) + cfg.scale * BA
    return V, V.norm(dim=1).clamp_min(1e-12).detach()


@register
class DoRA(Variant):
    name = "dora"
    config = DoRAConfig
    zero_grad_at_init = ("lora_A",)  # B = 0
    needs_dense_weight = True

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**lora_specs(d_in, d_out, cfg.r), "lora_m": ParamSpec((d_out,), "zeros")}

    @staticmethod
    def init(layer, cfg, stats):
        layer.lora_m.copy_(layer.weight.float().norm(dim=1))

    @staticmethod
    def forward(layer, cfg, x, y):
        _, n = _direction(layer, cfg)
        g = layer.lora_m / n                                     # (d_out,)
        lora = F.linear(F.linear(x, layer.lora_A) * cfg.scale, layer.lora_B)
        b = layer.bias
        y_lin = y if b is None else y - b                        # x Wᵀ
        out = g * (y_lin + lora)
        return (out if b is None else out + b).to(y.dtype)

    @staticmethod
    def effective_weight(layer, cfg):
        V, n = _direction(layer, cfg)
        return (layer.lora_m / n)[:, None].float() * V.float(), layer.bias
