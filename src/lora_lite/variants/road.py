"""RoAd: learned 2-D rotation + scaling of pairs of output coordinates (arXiv 2409.00119).

Outputs are split into groups of G; inside a group, coordinate k pairs with k + G/2
(rotate-half layout). With per-output vectors f, s (d_out,):

    y'_k       = f_k·y_k − s_k·y_{k+G/2}                (first half of a group)
    y'_{k+G/2} = f_{k+G/2}·y_{k+G/2} + s_{k+G/2}·y_k    (second half)
    i.e. y' = f ⊙ y + s ⊙ rotate_half(y),  rotate_half = (−y₂, y₁) per group,
    as a change  Δy = (f − 1) ⊙ y + s̃ ⊙ (y₂, y₁)  with the sign folded into s̃;
    f − 1 and s̃ are formed in fp32, then cast to y's dtype

    road_1  P = d_out/2: f = α cos θ, s = α sin θ, one (θ, α) per pair, shared by both halves
    road_2  P = d_out:   f_j = α_j cos θ_j, s_j = α_j sin θ_j
    road_4  P = 2·d_out: per group [θ, α] blocks of 2G: f = α[:, 0] cos θ[:, 0],
                         s = α[:, 1] sin θ[:, 1]
    θ (P,) = 0, α (P,) = 1 trainable  ->  f = 1, s = 0: exact identity
    W_eff = R W, b_eff = R b  (R holds the 2x2 blocks; the bias is rotated with y)

No r or alpha. Matches HF PEFT `RoadConfig(variant, group_size)` (road_theta,
road_alpha copy 1:1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import math

import torch

from ..config import AdapterConfig, knob
from ..kinds import dims
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, like, register

_PARAMS_PER_OUTPUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


@dataclass(frozen=True, kw_only=True)
class RoadConfig(AdapterConfig):
    variant: str = field(default="road", init=False)
    road_variant: Literal["road_1", "road_2", "road_4"] = knob("road_1", (
        "'road_1': one (θ, α) per output pair; 'road_2': one per output; 'road_4': separate ones "
        "for the cos and sin terms (2 per output)"))
    group_size: int = knob(64, "G: inside each group of G outputs, k pairs with k + G/2; even, >= 2, "
                               "and must divide every target's d_out")

    def check(self):
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"RoadConfig.group_size must be even and >= 2, got {self.group_size}")


def _coefficients(layer, cfg):
    """f − 1 and s̃ (d_out,) in fp32 with y' = f ⊙ y + s̃ ⊙ swap(y), where swap exchanges the two
    halves of each group and s̃ = s with the first half negated (so s̃ ⊙ swap(y) = s ⊙
    rotate_half(y)). Formed on the parameters seen as (groups, 1 or 2, G/2) and flattened once:
    the per-token products stay flat, which is what the elementwise kernels and their backward
    reductions are fast on (a broadcast (groups, 2, G/2) view of y took 1.5x as long on MiniLM)."""
    theta, alpha, h = layer.lora_road_theta.float(), layer.lora_road_alpha.float(), cfg.group_size // 2
    if cfg.road_variant == "road_4":   # per group [cos params | sin params], 2G each
        theta, alpha = theta.view(-1, 2, 2 * h), alpha.view(-1, 2, 2 * h)
        f, s = alpha[:, 0] * theta[:, 0].cos(), alpha[:, 1] * theta[:, 1].sin()
    else:                              # road_1: (groups, 1, G/2), both halves share; road_2: (groups, 2, G/2)
        theta = theta.view(-1, 1 if cfg.road_variant == "road_1" else 2, h)
        alpha = alpha.view_as(theta)
        f, s = alpha * theta.cos(), alpha * theta.sin()
    f, s = f.view(f.shape[0], -1, h), s.view(s.shape[0], -1, h)
    s_first, s_second = (s, s) if s.shape[1] == 1 else (s[:, :1], s[:, 1:])
    return (f - 1.0).expand(-1, 2, -1).reshape(-1), torch.cat((-s_first, s_second), dim=1).reshape(-1)


def _swap_halves(y: torch.Tensor, G: int) -> torch.Tensor:
    """(y₂, y₁) in every group of G coordinates: coordinate k <-> k + G/2."""
    return y.unflatten(-1, (-1, 2, G // 2)).flip(-2).flatten(-3)


@register
class Road(Variant):
    name = "road"
    config = RoadConfig
    uses_rank = False

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        P = int(d_out * _PARAMS_PER_OUTPUT[cfg.road_variant])
        return {
            "lora_road_theta": ParamSpec((P,), "zeros"),
            "lora_road_alpha": ParamSpec((P,), "ones"),
        }

    @staticmethod
    def validate(layer, cfg):
        d_out = dims(layer)[1]
        if d_out % cfg.group_size:
            raise ValueError(
                f"group_size={cfg.group_size} does not divide d_out={d_out}; "
                f"choose an even group_size that divides every target's d_out"
            )

    @staticmethod
    def delta(layer, cfg, x, y):
        f_minus_1, s = like(y, *_coefficients(layer, cfg))
        return torch.addcmul(y * f_minus_1, _swap_halves(y, cfg.group_size), s)

    @staticmethod
    def effective_weight(layer, cfg):
        f_minus_1, s = _coefficients(layer, cfg)
        eye = torch.eye(dims(layer)[1], dtype=s.dtype, device=s.device)
        R = (f_minus_1 + 1.0)[:, None] * eye + s[:, None] * _swap_halves(eye, cfg.group_size)  # swap is symmetric
        b = layer.bias
        return R @ dense_weight(layer), None if b is None else R @ b.float()

    @staticmethod
    def params_per_layer(d_in, d_out, cfg):
        return {"road_1": 1, "road_2": 2, "road_4": 4}[cfg.road_variant] * d_out

    # group size 16 divides every d_out of the test models (32/64/128 on the tiny Qwen3, 384/1536 on MiniLM)
    examples = {v: Example({"road_variant": v, "group_size": 16}) for v in ("road_1", "road_2", "road_4")}
    peft = PeftMap(
        "ROAD", (("lora_road_theta", "road_theta.default", None), ("lora_road_alpha", "road_alpha.default", None)),
        lambda cfg, t: dict(variant=cfg.road_variant, group_size=cfg.group_size, target_modules=t, init_weights=True),
        imports=lambda conf, name, shapes: {"road_variant": conf.get("variant", "road_1"),
                                            "group_size": int(conf.get("group_size", 64))},
        reads=("variant", "group_size"),
    )
    # rotation angles: unstable at the lrs where IA3 gates train best
    bench = BenchSetting((1e-3, 3e-3, 5e-3, 1e-2, 2e-2),
                         lambda r, g: {"road_variant": "road_1", "group_size": math.gcd(64, g.out_gcd)},
                         lambda i, o, c: (2 * o, 0), peft="road")
