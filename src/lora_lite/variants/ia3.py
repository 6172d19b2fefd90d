"""IA3: a learned elementwise gate on the layer output (arXiv 2205.05638).

    y' = y ⊙ g = y + y ⊙ (g − 1)     g (d_out,) trainable, 1 at init  ->  Δy = 0 exactly
                        (g − 1 is formed in fp32: a bf16 g·y would round y itself)
    W_eff = diag(g) W,  b_eff = g ⊙ b                    (the bias is gated too)

The paper gates the k/v outputs (this variant) and the FFN intermediate (`ia3_ff`, the input of
down_proj): attach twice for the paper's placement. r and alpha are unused. Keep g in fp32
(the default dtype): bf16 spacing above 1.0 is 2⁻⁷ and swallows small updates.
Matches HF PEFT `IA3Config(feedforward_modules=[])`, ia3_l (d_out, 1) = g.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import AdapterConfig
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, like, register


@dataclass(frozen=True, kw_only=True)
class IA3Config(AdapterConfig):
    variant: str = field(default="ia3", init=False)


@register
class IA3(Variant):
    name = "ia3"
    config = IA3Config
    uses_rank = False

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ParamSpec((d_out,), "ones")}

    @staticmethod
    def delta(layer, cfg, x, y):
        return y * like(y, layer.lora_g.float() - 1.0)

    @staticmethod
    def effective_weight(layer, cfg):
        g = layer.lora_g.float()
        b = layer.bias
        return g[:, None] * dense_weight(layer), None if b is None else g * b.float()

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: d_out)
    examples = {"ia3": Example({})}
    # PEFT's IA3 on a module outside feedforward_modules: ia3_l (d_out, 1) scales the output
    peft = PeftMap(
        "IA3", (("lora_g", "ia3_l.default", "col"),),
        lambda cfg, t: dict(target_modules=t, fan_in_fan_out=False, feedforward_modules=[], init_ia3_weights=True),
        imports=lambda conf, name, shapes: {} if shapes["lora_g"][1] == 1 else None,
    )
    bench = BenchSetting("gain", lambda r, g: {}, lambda i, o, c: (o, 0), peft="ia3")
