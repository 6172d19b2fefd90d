"""DoRA: a trainable per-row magnitude times the row-normalised direction W + sBA (arXiv 2402.09353).

    V = W + s·sg(B A)                   (d_out, d_in), recomputed every call
    n = sg(max(‖V_o,:‖₂, 1e-12))        row norms, detached (paper §4.3)
    y' = b + (m / n) ⊙ ((y − b) + s·(x Aᵀ) Bᵀ)
    A (r, d_in) kaiming, B (d_out, r) 0, m (d_out,) = ‖W_o,:‖₂  ->  at init n = m: identity
    W_eff = diag(m / ‖W + sBA‖_row) (W + sBA),  b_eff = b   (the bias is not rescaled)

As a change with g = m / n:  Δy = (g − 1) ⊙ (y − b) + g ⊙ s·(x Aᵀ) Bᵀ. The norms and g − 1
are computed in fp32 (W read in fp32) and only then cast to the activation dtype, so at init
g − 1 = 0 and B = 0 give Δy = 0 exactly even on a bf16 base with a bias (forming y' from
g ⊙ (y − b) would round y − b and g in bf16).

On an nn.Embedding (W = weightᵀ, (dim, V)) the norms are over the vocabulary for each embedding
dimension, the base has no bias, and s·(x Aᵀ) Bᵀ is the lookup s·embed(ids, Aᵀ) Bᵀ (lora.py).
On a convolution W is the dense view (C_out, C_in/groups·kernel): one norm and one magnitude
per output channel, s·(x Aᵀ) Bᵀ is LoRA's s·B ⋆ (A ⋆ x), and g broadcasts over the channels.

With dropout in training mode both terms read x̃ = dropout(x), as PEFT's DoRA does:
Δy = (g − 1) ⊙ x̃ Wᵀ + g ⊙ s·(x̃ Aᵀ) Bᵀ (one more product with W per call); eval reads x.

Reads W on every call: a quantized base (bitsandbytes, torchao) is dequantized per call, never
written. Matches HF PEFT `LoraConfig(use_dora=True, lora_dropout=0)` with
lora_magnitude_vector = m (PEFT's DoRA on embeddings: the same tensors and formula).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..kinds import bias, per_channel
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, like, register
from .lora import (
    LORA_LRS, PEFT_LORA_READS, PEFT_LORA_TENSORS, DropoutConfig, conv_low_rank, dropped, embedding_low_rank, lora_params,
    lora_specs, low_rank, peft_lora_fields,
    peft_lora_import,
)


@dataclass(frozen=True, kw_only=True)
class DoRAConfig(DropoutConfig):
    variant: str = field(default="dora", init=False)


@torch.no_grad()
def _direction(layer, cfg):
    """V = W + s·sg(BA) and n = sg(row norms of V), fp32; outside autograd (nothing here takes a
    gradient), so no graph is recorded only to be detached."""
    V = dense_weight(layer) + cfg.scale * (layer.lora_B.float() @ layer.lora_A.float())
    return V, torch.linalg.vector_norm(V, dim=1).clamp_min(1e-12)


@register
class DoRA(Variant):
    name = "dora"
    config = DoRAConfig
    zero_grad_at_init = ("lora_A",)  # B = 0
    needs_dense_weight = True
    wide_ranks = True  # V = W + sBA and its norms hold for any r

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**lora_specs(d_in, d_out, cfg.r), "lora_m": ParamSpec((d_out,), "zeros")}

    @staticmethod
    def init(layer, cfg, stats):
        layer.lora_m.copy_(torch.linalg.vector_norm(dense_weight(layer), dim=1))

    kinds = ("linear", "conv1d", "embedding", "conv")

    @staticmethod
    def delta(layer, cfg, x, y):
        x_d = dropped(layer, cfg, x)
        return _rescaled(layer, cfg, _base(layer, x, x_d, y), low_rank(x_d, layer.lora_A, layer.lora_B, cfg.scale))

    @staticmethod
    def delta_embedding(layer, cfg, ids, y):
        return _rescaled(layer, cfg, y, embedding_low_rank(layer, ids, layer.lora_A, layer.lora_B, cfg.scale, y))

    @staticmethod
    def delta_conv(layer, cfg, x, y):
        x_d = dropped(layer, cfg, x)
        return _rescaled(layer, cfg, _base(layer, x, x_d, y), conv_low_rank(layer, x_d, layer.lora_A, layer.lora_B, cfg.scale))

    @staticmethod
    def effective_weight(layer, cfg):
        V, n = _direction(layer, cfg)
        return (layer.lora_m.float() / n)[:, None] * V, bias(layer)

    @staticmethod
    def params_per_layer(d_in, d_out, cfg):
        return lora_params(d_in, d_out, cfg) + d_out

    examples = {"dora": Example({"r": 4, "alpha": 8.0})}
    peft = PeftMap("LORA", PEFT_LORA_TENSORS + (("lora_m", "lora_magnitude_vector.default.weight", None),),
                   lambda cfg, t: peft_lora_fields(cfg, t, use_dora=True),
                   imports=peft_lora_import(use_dora=True), reads=PEFT_LORA_READS)
    # the row norms of W + sBA every call: r·d_in·d_out + d_in·d_out MACs per call
    bench = BenchSetting(LORA_LRS, lambda r, g: {"r": r, "alpha": 2.0 * r},
                         lambda i, o, c: (c.r * (i + o) + 2 * o, c.r * i * o + i * o), peft="dora",
                         family="lora")


def _base(layer, x, x_d, y):
    """The base output for the input the branch read: y itself, or (dropout in training) the
    layer's own forward on x̃, called past its hooks."""
    return y if x_d is x else type(layer).forward(layer, x_d)


def _rescaled(layer, cfg, y, lora_out):
    """Δy = (g − 1) ⊙ (y − b) + g ⊙ lora_out with g = m / n, lora_out = s·(x Aᵀ) Bᵀ."""
    _, n = _direction(layer, cfg)
    g = per_channel(layer, layer.lora_m.float() / n)              # (d_out,), fp32
    b = bias(layer)
    y_lin = y if b is None else y - like(y, per_channel(layer, b))  # x Wᵀ
    g_minus_1, g = like(y, g - 1.0, g)
    return g_minus_1 * y_lin + g * lora_out
