"""DeLoRA: normalised rank-1 terms with a learnable bound λ, scaled by W's column norms (arXiv 2503.18225).

    w = ‖W_:,j‖₂ over outputs (d_in,), frozen buffer read once from W
    c_i = (λ / r) / (max(‖A_i,:‖, 1e-4) · max(‖B_:,i‖, 1e-4))
    Δy = ((x (A diag(w))ᵀ) ⊙ c) Bᵀ,  y' = y + Δy   (c from fp32 norms, cast to x's dtype; w scales
                                                  A's columns, not the larger activation x)
    A (r, d_in) kaiming, B (d_out, r) 0, λ () = lambda0  ->  identity at init for any λ
    W_eff = W + B diag(c) A diag(w)

λ0 = 0 would give identity *and* zero gradients everywhere, so lambda0 must be > 0. With B = 0
the clamp makes c large at step 0 (as in PEFT); use Adam-style optimisers. No alpha: λ is the scale.
Matches HF PEFT `DeloraConfig(r, delora_lambda=lambda0)` (delora_lambda is shape (1,) there).

Choosing λ0: one Adam step lifts every ‖B_:,i‖ above the clamp, so from then on each rank-1 term
has norm ≈ (λ/r)·rms(w) and ‖ΔW‖_F/‖W‖_F ≈ λ0/√(r·d_in), whatever the lr (tests/test_defaults.py).
The default 15 (PEFT's) gives 0.04 at r = 32 on 4096-wide layers but 0.19 at r = 16 on MiniLM's
384, where every lr from 1e-4 to 1e-2 collapsed to chance in 600 steps; λ0 = 1 (0.012) learned.
For short budgets aim for λ0/√(r·d_in) ≈ 0.01–0.05 (docs/benchmarks.md, C2 at 600 steps).
attach warns (once, over all targets) when a layer's ratio reaches COLLAPSE_RATIO, naming the λ0
that gives SAFE_RATIO.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import RankConfig, knob
from ..kinds import dims
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, like, register
from .lora import lora_params, lora_specs


# ‖ΔW‖/‖W‖ ≈ λ0/√(r·d_in) on MiniLM (r = 16, d_in = 384), C2 task, 600 steps, 3 seeds
# (results/quality_rerun.json): 0.19 (λ0 = 15) collapsed to chance at lr 1e-4, 1e-3 and 1e-2;
# 0.051 (λ0 = 4) collapsed on 1 seed of 3; 0.0128 (λ0 = 1) learned on all 3 (0.967 ± 0.003).
COLLAPSE_RATIO = 0.05
SAFE_RATIO = 0.0128


@dataclass(frozen=True, kw_only=True)
class DeLoRAConfig(RankConfig):
    variant: str = field(default="delora", init=False)
    lambda0: float = knob(15.0, "initial bound λ of each rank-1 term (PEFT's delora_lambda); > 0. After "
                                "one step ‖ΔW‖/‖W‖ ≈ λ0/√(r·d_in): aim for 0.01-0.05 (attach warns from "
                                "0.05); the default is PEFT's")

    def check(self):
        if not self.lambda0 > 0:
            raise ValueError(f"DeLoRAConfig.lambda0 must be > 0 (0 freezes training), got {self.lambda0}")


def _coefficients(layer, cfg):
    """c (r,) in fp32."""
    A_norm = torch.linalg.vector_norm(layer.lora_A.float(), dim=1).clamp_min(1e-4)
    B_norm = torch.linalg.vector_norm(layer.lora_B.float(), dim=0).clamp_min(1e-4)
    return (layer.lora_lambda.float() / cfg.r) / (A_norm * B_norm)


@register
class DeLoRA(Variant):
    name = "delora"
    config = DeLoRAConfig
    zero_grad_at_init = ("lora_A", "lora_lambda")  # both reach y only through B = 0
    needs_dense_weight = True
    wide_ranks = True  # each rank-1 term is normalised on its own: any r

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {
            **lora_specs(d_in, d_out, cfg.r),
            "lora_lambda": ParamSpec((), lambda t: t.fill_(cfg.lambda0)),
            "lora_wnorm": ParamSpec((d_in,), "zeros", trainable=False),
        }

    @staticmethod
    def advise(layers, cfg):
        d_in = {name: dims(layer)[0] for name, layer in layers.items()}
        risky = {n: d for n, d in d_in.items() if cfg.lambda0 / math.sqrt(cfg.r * d) >= COLLAPSE_RATIO}
        if not risky:
            return
        worst = min(risky, key=risky.get)  # the smallest d_in has the largest ratio
        safe = SAFE_RATIO * math.sqrt(cfg.r * min(d_in.values()))
        warnings.warn(
            f"DeLoRA lambda0={cfg.lambda0:g}, r={cfg.r}: {len(risky)} of {len(d_in)} target layers have "
            f"λ0/√(r·d_in) >= {COLLAPSE_RATIO} (up to {cfg.lambda0 / math.sqrt(cfg.r * risky[worst]):.3f} "
            f"at {worst}, d_in={risky[worst]}). After the first optimiser step ‖ΔW‖/‖W‖ ≈ λ0/√(r·d_in) "
            f"whatever the lr; on MiniLM (C2, 600 steps) a ratio of 0.19 collapsed to chance at every lr "
            f"tried and 0.051 on 1 seed of 3, while {SAFE_RATIO} learned. lambda0={safe:.2g} puts every "
            f"target at <= {SAFE_RATIO} (the authors' long GLUE runs used 0.05-0.15 over thousands of steps).",
            UserWarning,
            stacklevel=3,  # the user's attach() call
        )

    @staticmethod
    def init(layer, cfg, stats):
        layer.lora_wnorm.copy_(dense_weight(layer).norm(dim=0))

    @staticmethod
    def delta(layer, cfg, x, y):
        w, A, B, c = like(x, layer.lora_wnorm, layer.lora_A, layer.lora_B, _coefficients(layer, cfg))
        return F.linear(F.linear(x, A * w) * c, B)

    @staticmethod
    def low_rank_delta(layer, cfg):
        """W_eff − W = (B diag(c)) (A diag(w))."""
        return layer.lora_B.float() * _coefficients(layer, cfg), layer.lora_A.float() * layer.lora_wnorm.float()

    @staticmethod
    def params_per_layer(d_in, d_out, cfg):
        return lora_params(d_in, d_out, cfg) + 1

    examples = {"delora": Example({"r": 4, "lambda0": 2.0})}
    peft = PeftMap(
        "DELORA",
        (("lora_A", "delora_A.default", None), ("lora_B", "delora_B.default", None),
         ("lora_lambda", "delora_lambda.default", "1"), ("lora_wnorm", "delora_w_norm.default", None)),
        lambda cfg, t: dict(r=cfg.r, delora_lambda=cfg.lambda0, module_dropout=0.0, target_modules=t,
                            bias="none", init_weights=True),
        imports=lambda conf, name, shapes: {"r": shapes["lora_A"][0],
                                            "lambda0": float(conf.get("delora_lambda", 15.0))},
        reads=("r", "delora_lambda"),
    )
    # λ0 = 1 in the benchmark: ‖ΔW‖/‖W‖ ≈ λ0/√(r·d_in) from the first step (docstring), which is
    # 0.013 on MiniLM at r = 16 where the default 15 (0.19) collapsed to chance at every lr
    bench = BenchSetting((1e-4, 3e-4, 1e-3, 3e-3, 1e-2), lambda r, g: {"r": r, "lambda0": 1.0},
                         lambda i, o, c: (c.r * (i + o) + i + c.r, 0), peft="delora")
