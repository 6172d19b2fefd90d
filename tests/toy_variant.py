"""A variant that exists only in the tests: LoRA with one learned scalar gate.

    Δy = γ · s · (x Aᵀ) Bᵀ       γ () trainable, 1 at init; A kaiming, B 0  ->  Δy = 0 exactly
    W_eff = W + γ·s·B A            (exported to PEFT as a plain LoRA through low_rank_delta)

It is the proof that a variant is one file: conftest imports it (the registry line), and every
generic suite — identity on fp32 and bf16 bases, properties, checkpoint round trip, merge,
PEFT export, disabled/scaled, copies, compile — runs it from its declarations alone
(tests/test_toy_variant.py checks that each suite collected it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import lora_lite as ll
from lora_lite.variant import BenchSetting, Example, ParamSpec, Variant, like, register
from lora_lite.variants.lora import lora_macs, lora_params, lora_specs, low_rank


@dataclass(frozen=True, kw_only=True)
class GatedLoRAConfig(ll.ScaledConfig):
    variant: str = field(default="gated_lora", init=False)


@register
class GatedLoRA(Variant):
    name = "gated_lora"
    config = GatedLoRAConfig
    zero_grad_at_init = ("lora_A", "lora_gate")  # both reach y only through B = 0

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {**lora_specs(d_in, d_out, cfg.r), "lora_gate": ParamSpec((), "ones")}

    @staticmethod
    def delta(layer, cfg, x, y):
        return like(x, layer.lora_gate) * low_rank(x, layer.lora_A, layer.lora_B, cfg.scale)

    @staticmethod
    def low_rank_delta(layer, cfg):
        return layer.lora_gate.float() * cfg.scale * layer.lora_B.float(), layer.lora_A.float()

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: lora_params(d_in, d_out, cfg) + 1)
    examples = {"gated_lora": Example({"r": 4, "alpha": 8.0})}
    bench = BenchSetting(knobs=lambda r, g: {"r": r, "alpha": 2.0 * r}, macs=lora_macs)
