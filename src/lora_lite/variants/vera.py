"""VeRA: one pair of frozen random projections for the whole model, per-layer trainable scaling
vectors (arXiv 2310.11454).

    Δy = Λ_b B Λ_d A x = b ⊙ ((d ⊙ (x Aᵀ)) Bᵀ),  y' = y + Δy
    A (r, d_in_max), B (d_out_max, r)   frozen, random, shared by every target: a target reads
                                        the leading block A[:, :d_in], B[:d_out, :]
    d (r)      trainable, d_initial (0.1) at init       Λ_d = diag(d)
    b (d_out)  trainable, 0 at init  ->  identity at init, bit for bit; at step 0 grad d = 0
    W_eff = W + diag(b) B diag(d) A,  b_eff = b_base    (rank r: exported as LoRA elsewhere)

A and B are drawn once, as HF PEFT draws them: a CPU generator seeded with
`projection_prng_key`, A then B, each uniform in ±√(6 / fan_in) (kaiming-uniform with gain √2;
fan_in = A's d_in_max, B's r). They are stored once, in memory and in a checkpoint
(ParamSpec shared=True), so the adapter's size is 2·r·d + Σ (r + d_out).

Matches HF PEFT `VeraConfig(r, projection_prng_key, d_initial, save_projection=True)`:
vera_lambda_d = d, vera_lambda_b = b at every target, and the model-level vera_A = A,
vera_B = B (saved as `base_model.vera_A` / `base_model.vera_B`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import RankConfig, knob
from ..kinds import dims
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, like, register


@dataclass(frozen=True, kw_only=True)
class VeRAConfig(RankConfig):
    variant: str = field(default="vera", init=False)
    d_initial: float = knob(0.1, "the initial value of every entry of the scaling vector d (PEFT's d_initial)")
    projection_prng_key: int = knob(0, (
        "seed of the CPU generator that draws the shared projections A and B (PEFT's projection_prng_key)"))


def projections(shared, cfg):
    """A then B from one generator seeded with the key, each U(±√(6 / fan_in)), fan_in = shape[1]."""
    g = torch.Generator().manual_seed(cfg.projection_prng_key)
    for t in (shared["lora_A"], shared["lora_B"]):
        bound = math.sqrt(6.0 / t.shape[1])
        t.copy_(torch.empty(t.shape).uniform_(-bound, bound, generator=g))


def blocks(layer, d_in):
    """This target's leading blocks of the shared projections: A (r, d_in), B (d_out, r)."""
    return layer.lora_A[:, :d_in], layer.lora_B[: layer.lora_lambda_b.shape[0], :]


@register
class VeRA(Variant):
    name = "vera"
    config = VeRAConfig
    uses_rank = False  # r is the projections' width, not bounded by a layer's sides
    zero_grad_at_init = ("lora_lambda_d",)  # reaches y only through b = 0

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        r = cfg.r
        return {
            "lora_A": ParamSpec((r, d_in), trainable=False, shared=True),
            "lora_B": ParamSpec((d_out, r), trainable=False, shared=True),
            "lora_lambda_d": ParamSpec((r,), lambda t: t.fill_(cfg.d_initial)),
            "lora_lambda_b": ParamSpec((d_out,), "zeros"),
        }

    init_shared = staticmethod(projections)

    @staticmethod
    def delta(layer, cfg, x, y):
        A, B, d, b = like(x, *blocks(layer, x.shape[-1]), layer.lora_lambda_d, layer.lora_lambda_b)
        return b * F.linear(d * F.linear(x, A), B)

    @staticmethod
    def low_rank_delta(layer, cfg):
        A, B = blocks(layer, dims(layer)[0])
        return layer.lora_lambda_b.float()[:, None] * B.float() * layer.lora_lambda_d.float(), A.float()

    params_per_layer = staticmethod(lambda d_in, d_out, cfg: cfg.r + d_out)
    examples = {"vera": Example({"r": 16})}
    # the paper trains its scaling vectors at lrs ~10x LoRA's (arXiv 2310.11454, Table 8)
    bench = BenchSetting((1e-3, 3e-3, 1e-2, 3e-2))
    peft = PeftMap(
        "VERA", (("lora_lambda_d", "vera_lambda_d.default", None), ("lora_lambda_b", "vera_lambda_b.default", None)),
        lambda cfg, t: dict(r=cfg.r, target_modules=t, projection_prng_key=cfg.projection_prng_key,
                            save_projection=True, d_initial=cfg.d_initial, vera_dropout=0.0, fan_in_fan_out=False,
                            bias="none", init_weights=True),
        imports=lambda conf, name, shapes: {"r": shapes["lora_lambda_d"][0],
                                            "projection_prng_key": conf.get("projection_prng_key", 0),
                                            "d_initial": conf.get("d_initial", 0.1)},
        reads=("r", "projection_prng_key", "d_initial", "save_projection", "vera_dropout"),
        shared=(("lora_A", "vera_A"), ("lora_B", "vera_B")),
        kinds=("linear", "conv1d"),
    )
