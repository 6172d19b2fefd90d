"""IA3: learned elementwise gates on layer outputs and, on feed-forward layers, inputs
(arXiv 2205.05638).

    output gate (default)     y' = y ⊙ g = y + y ⊙ (g − 1)    g (d_out,)   W_eff = diag(g) W, b_eff = g ⊙ b
    input gate (a target that x' = x ⊙ g = x + x ⊙ (g − 1)    g (d_in,)    W_eff = W diag(g), b_eff = b
      `feedforward_modules` matches; the math of `ia3_ff`)
    g trainable, 1 at init  ->  Δ = 0 exactly  (g − 1 is formed in fp32: a bf16 g·y would round y)

The paper's placement is one adapter: gate the k/v outputs and the input of the FFN
down-projection (its input is the FFN intermediate), e.g. on a Llama-style model
`IA3Config(target_names=(r"\\.(k|v|down)_proj$",), feedforward_modules=(r"down_proj$",))`,
PEFT's default there. `feedforward_modules` are regexes searched in each target's full name, like
`target_names`; each must match at least one target. No r or alpha. Keep g in fp32 (the
default dtype): bf16 spacing above 1.0 is 2⁻⁷ and swallows small updates.
On a convolution the output gate is one g per output channel (y ⊙ g over dimension 1); a
feed-forward (input) gate is per input channel there, which is not the dense view's d_in =
C_in/groups·kernel, so `feedforward_modules` may not name a conv.
Matches HF PEFT `IA3Config(target_modules, feedforward_modules)`: ia3_l = g as (d_out, 1) on
output-gated targets, (1, d_in) on feed-forward ones ((1, C_out, 1, …) on a conv).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import AdapterConfig, knob
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, like, register
from .ia3_ff import GAIN_LRS, IA3FF


@dataclass(frozen=True, kw_only=True)
class IA3Config(AdapterConfig):
    variant: str = field(default="ia3", init=False)
    feedforward_modules: tuple[str, ...] = knob((), (
        "regexes (re.search on each target's full name): targets whose input is gated instead of "
        "the output (the paper's FFN placement, PEFT's feedforward_modules); each must match a target"))

    def check(self) -> None:
        for pattern in self.feedforward_modules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"IA3Config.feedforward_modules: invalid regex {pattern!r}: {e}") from None


def _peft_feedforward(conf, name, shape):
    """Whether PEFT's saved gate of `shape` at `name` gates the input: (1, d_in) against (d_out, 1)
    on a linear; a conv's gate is (1, C, 1, …) either way, so there PEFT's feedforward_modules
    decides (a list: the name or a suffix after a dot; a string: a full regex match)."""
    if len(shape) == 2:
        return shape[0] == 1
    ff = conf.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, name) is not None
    return any(name == k or name.endswith("." + k) for k in ff)


@register
class IA3(Variant):
    name = "ia3"
    config = IA3Config
    uses_rank = False
    kinds = ("linear", "conv1d", "conv")

    @classmethod
    def at_target(cls, name, cfg):
        return IA3FF if any(re.search(p, name) for p in cfg.feedforward_modules) else cls

    @staticmethod
    def validate_targets(names, cfg):
        for pattern in cfg.feedforward_modules:
            if not any(re.search(pattern, n) for n in names):
                raise ValueError(
                    f"feedforward_modules pattern {pattern!r} matches none of the {len(names)} targets "
                    f"(e.g. {names[:3]}); it must name targets whose input IA3 gates"
                )

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_g": ParamSpec((d_out,), "ones")}

    @staticmethod
    def delta(layer, cfg, x, y):
        return y * like(y, layer.lora_g.float() - 1.0)

    @staticmethod
    def gate(layer, cfg):  # the hook applies y ⊙ g as one product (runtime.gated)
        return layer.lora_g.float()

    @staticmethod
    def effective_weight(layer, cfg):
        g = layer.lora_g.float()
        b = layer.bias
        return g[:, None] * dense_weight(layer), None if b is None else g * b.float()

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: d_out)  # feed-forward targets: ia3_ff's
    # ia3_mixed: the paper's placement on the generic suites' models: input gates on the tiny
    # Qwen3's down_proj, MiniLM's FFN output.dense, GPT-2's mlp.c_proj and a one-layer model's "0"
    examples = {"ia3": Example({}),
                "ia3_mixed": Example({"feedforward_modules": [r"(down_proj|\d\.output\.dense|mlp\.c_proj|^\d+)$"]})}
    # PEFT's IA3: ia3_l (d_out, 1) scales the output of a module outside feedforward_modules
    # (feed-forward targets are ia3_ff's (1, d_in), through at_target). On import every target is
    # IA3: a (1, d_in) gate makes it a feed-forward one, and the targets' fields are combined.
    peft = PeftMap(
        "IA3", (("lora_g", "ia3_l.default", "col"),),
        lambda cfg, t: dict(target_modules=t, fan_in_fan_out=False, init_ia3_weights=True,
                            feedforward_modules=[n for n in t if IA3.at_target(n, cfg) is IA3FF]),
        imports=lambda conf, name, shapes: {
            "feedforward_modules": (f"^{re.escape(name)}$",) if _peft_feedforward(conf, name, shapes["lora_g"]) else ()},
        combine=lambda per_target: {
            "feedforward_modules": tuple(p for f in per_target.values() for p in f["feedforward_modules"])},
    )
    bench = BenchSetting(GAIN_LRS, lambda r, g: {}, lambda i, o, c: (o, 0), peft="ia3", family="gain")
