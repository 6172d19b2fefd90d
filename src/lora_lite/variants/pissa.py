"""PiSSA: train the principal rank-r SVD part of W, freeze the residual (arXiv 2404.02948).

    W = U diag(S) Vh (fp32),  Se = S_r / s,  s = alpha / r
    A = diag(√Se) Vh_r  (r, d_in)   trainable;  A0 = A at init, frozen buffer
    B = U_r diag(√Se)   (d_out, r)  trainable;  B0 = B at init, frozen buffer
    W_res = W − s·B0 A0,  y' = x W_resᵀ + b + s·(x Aᵀ) Bᵀ

computed additively, without ever writing W, as one rank-2r product:

    Δy = s·(x Aᵀ) Bᵀ − s·(x A0ᵀ) B0ᵀ                       (the same function and gradients as W_res)
       = s·(x [A − A0; A0]ᵀ) [B, B − B0]ᵀ                    (expand: xAᵀBᵀ − xA0ᵀBᵀ + xA0ᵀBᵀ − xA0ᵀB0ᵀ)

One product reads x once and writes the (…, d_out) change once, where two products and their
difference made three passes over it. The differences A − A0 and B − B0 are formed in the
adapter dtype (fp32 by default) before any cast, so at init both are 0 exactly and Δy = 0 bit for
bit in any dtype and on any kernel (every term of both sums is a product with an exact 0;
concatenating [A; A0] and [B, −B0] instead would cancel only up to the kernel's summation
order). It also keeps a trained update's small A − A0 from cancelling in a bf16 activation, as
the difference of two bf16 products did. W_eff − W = s·(B A − B0 A0) = [sB, −sB0] [A; A0]: a
rank-2r LoRA. Any alpha works: the scale is folded into the init.

With `svd="full"` it matches HF PEFT `LoraConfig(init_lora_weights="pissa")`: the same factors,
and PEFT's residual base weight is W − s·B0 A0. The default `svd="auto"` takes the top-r
triplets from a randomized sketch when r is small against the layer (`_svd.top_r_svd`: σ within
3e-4 and a residual within 6e-6 of the optimal one, 2.6 s against 17.5 s per Qwen3-0.6B block).
Where the spectrum is flat around σ_r its U_r, Vh_r span a slightly different subspace than the
full SVD's, so the trainable directions (not the function at init) differ from PEFT's: up to
1.5 % of ‖B0 A0‖ on MiniLM-L6 at r = 16. The checkpoint holds A0, B0 too, so load rebuilds the
adapted model on a pristine base without an SVD.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import ScaledConfig, knob
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, register
from ._svd import top_r_svd
from .lora import PEFT_LORA_TENSORS, lora_params, low_rank, peft_lora_fields


@dataclass(frozen=True, kw_only=True)
class PiSSAConfig(ScaledConfig):
    variant: str = field(default="pissa", init=False)
    svd: Literal["auto", "full"] = knob("auto", (
        "how the top-r SVD is found: 'auto' = a randomized sketch when 2r + 16 <= min(d_in, d_out) / 4, "
        "else the full SVD (fast); 'full' = always the full fp32 SVD, the factors of PEFT's "
        "init_lora_weights='pissa'"))


@register
class PiSSA(Variant):
    name = "pissa"
    config = PiSSAConfig
    needs_dense_weight = True
    scale_outside = True

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        r = cfg.r
        return {
            "lora_A": ParamSpec((r, d_in), "zeros"),
            "lora_B": ParamSpec((d_out, r), "zeros"),
            "lora_A0": ParamSpec((r, d_in), "zeros", trainable=False),
            "lora_B0": ParamSpec((d_out, r), "zeros", trainable=False),
        }

    @staticmethod
    def init(layer, cfg, stats):
        U, S, Vh = top_r_svd(dense_weight(layer), cfg.r, full=cfg.svd == "full")
        root = (S / cfg.scale).sqrt()
        layer.lora_A0.copy_(root[:, None] * Vh)
        layer.lora_B0.copy_(U * root)
        layer.lora_A.copy_(layer.lora_A0)
        layer.lora_B.copy_(layer.lora_B0)

    @staticmethod
    def delta(layer, cfg, x, y):
        A, A0, B, B0 = layer.lora_A, layer.lora_A0, layer.lora_B, layer.lora_B0
        return low_rank(x, torch.cat([A - A0, A0]), torch.cat([B, B - B0], dim=1))  # / s: scale_outside

    @staticmethod
    def low_rank_delta(layer, cfg):
        B = cfg.scale * torch.cat([layer.lora_B.float(), -layer.lora_B0.float()], dim=1)
        return B, torch.cat([layer.lora_A.float(), layer.lora_A0.float()], dim=0)

    params_per_layer = staticmethod(lora_params)
    examples = {"pissa": Example({"r": 4, "alpha": 8.0})}
    # PEFT's PiSSA keeps A, B in its LoRA slots and writes W − s·B0 A0 into the base layer: the
    # same function (parity tests), but its adapter only fits that residual base, so we export
    # the rank-2r change [sB, −sB0][A; A0] as a plain LoRA instead.
    peft = PeftMap("LORA", PEFT_LORA_TENSORS, lambda cfg, t: peft_lora_fields(cfg, t, init_lora_weights="pissa"),
                   export=False,
                   base=lambda layer, cfg: dense_weight(layer) - cfg.scale * layer.lora_B0.float() @ layer.lora_A0.float())
    # the scale is folded into the init, so alpha = r (s = 1) as in the seed benchmark; the
    # additive form runs one rank-2r product
    # principal-subspace init: updates are large from step 0, so the grid reaches lower
    bench = BenchSetting((3e-5, 1e-4, 3e-4, 1e-3, 3e-3), lambda r, g: {"r": r, "alpha": float(r)},
                         lambda i, o, c: (2 * c.r * (i + o), 0), peft="pissa")
