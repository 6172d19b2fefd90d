"""IA3-FF: a learned elementwise gate on the layer *input* (arXiv 2205.05638, FFN placement).

    x' = x ⊙ g = x + x ⊙ (g − 1)     g (d_in,) trainable, 1 at init  ->  Δx = 0 exactly
    W_eff = W diag(g),  b_eff = b                        (the bias is not gated)

Meant for the FFN down-projection (its input is the FFN intermediate). No r or alpha.
This is IA3's input placement: `ia3` uses it at the targets its `feedforward_modules` match
(the paper's mixed adapter); `ia3_ff` on its own is IA3 with every target feed-forward.
Matches HF PEFT IA3 with the module in both target_modules and feedforward_modules,
ia3_l (1, d_in) = g.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import AdapterConfig
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, like, register


GAIN_LRS = (1e-3, 5e-3, 2e-2, 5e-2)  # the benchmark's lr grid of elementwise gains


@dataclass(frozen=True, kw_only=True)
class IA3FFConfig(AdapterConfig):
    variant: str = field(default="ia3_ff", init=False)


@register
class IA3FF(Variant):
    name = "ia3_ff"
    config = IA3FFConfig
    uses_rank = False

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ParamSpec((d_in,), "ones")}

    @staticmethod
    def delta_input(layer, cfg, x):
        return x * like(x, layer.lora_g.float() - 1.0)

    @staticmethod
    def gate(layer, cfg):  # the pre-hook applies x ⊙ g as one product (runtime.gated)
        return layer.lora_g.float()

    @staticmethod
    def effective_weight(layer, cfg):
        return dense_weight(layer) * layer.lora_g.float(), layer.bias

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: d_in)
    examples = {"ia3_ff": Example({})}
    # PEFT's IA3 on a module listed in feedforward_modules: ia3_l (1, d_in) scales the input
    peft = PeftMap(
        "IA3", (("lora_g", "ia3_l.default", "row"),),
        lambda cfg, t: dict(target_modules=t, fan_in_fan_out=False, feedforward_modules=t, init_ia3_weights=True),
    )  # not imported as ia3_ff: a PEFT IA3 adapter imports as `ia3` with its feedforward_modules
    bench = BenchSetting(GAIN_LRS, lambda r, g: {}, lambda i, o, c: (i, 0), peft="ia3_ff", family="gain")
