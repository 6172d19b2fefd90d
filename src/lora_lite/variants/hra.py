"""HRA: multiply W on the input side by a product of r Householder reflections (arXiv 2405.17484).

    û_i = u_i / ‖u_i‖,  H_i = I − 2 û_i û_iᵀ,  R = H_0 H_1 ⋯ H_{r−1}
    W_eff = W R,  b_eff = b      so the pre-hook maps  x ← x Rᵀ = x H_{r−1} ⋯ H_0
    U (r, d_in) trainable; init pairs rows U_2j = U_2j+1 (kaiming on (r/2, d_in)), so
    H_2j H_2j+1 = I and R = I at init: r must be even.

R is never built: in compact-WY form (Joffrain et al. 2006, "Accumulating Householder
transformations, revisited") R = I − Ûᵀ T⁻¹ Û with T = striu(Û Ûᵀ) + ½ I (r x r), so
Δx = x Rᵀ − x = −((x Ûᵀ) T⁻ᵀ) Û: two thin matmuls, 2·r·d_in MACs per token, and only (…, r)
activations saved for backward instead of r copies of x. Û and T⁻ᵀ are formed in fp32 (the
inverse has no bf16 kernel), and the thin (…, r) product with T⁻ᵀ runs in fp32, so at init the
contributions of each reflection pair cancel to rounding even in a bf16 forward. Same reflections and order as HF PEFT
`HRAConfig(r, apply_GS=False)` with hra_u = Uᵀ (PEFT builds the d_in x d_in matrix every call).
PEFT's init uses fan_in r/2 where ours uses d_in; copy U for identical training.

On a convolution (W the dense view (C_out, C_in/groups·kernel), kinds.py) R acts on the
flattened patch, so the change is the convolution with W (R − I) = −(W Ûᵀ) T⁻¹ Û in the layer's
shape, as PEFT's HRA Conv2d computes it (it builds W R; square kernels, groups = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RankConfig, knob
from ..kinds import dims
from ..quant import dense_weight
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, like, register


@dataclass(frozen=True, kw_only=True)
class HRAConfig(RankConfig):
    variant: str = field(default="hra", init=False)
    r: int = knob(8, "number of Householder reflections: even (paired at init), at most d_in of "
                     "every target")

    def check(self):
        if self.r % 2:
            raise ValueError(f"HRAConfig.r must be even (reflections are paired at init), got {self.r}")


def _paired_kaiming(t: torch.Tensor) -> None:
    half = torch.empty(t.shape[0] // 2, t.shape[1], dtype=t.dtype, device=t.device)
    nn.init.kaiming_uniform_(half, a=math.sqrt(5))
    t.copy_(half.repeat_interleave(2, dim=0))


def _wy(layer):
    """Normalised reflectors Û (r, d_in) and T⁻ᵀ (r, r) of the compact-WY form, fp32."""
    U = layer.lora_reflectors.float()
    U_hat = U / torch.linalg.vector_norm(U, dim=1, keepdim=True).clamp_min(1e-12)
    T = torch.triu(U_hat @ U_hat.T, diagonal=1)
    T = T + 0.5 * torch.eye(T.shape[0], dtype=T.dtype, device=T.device)
    return U_hat, torch.linalg.inv(T).T


@register
class HRA(Variant):
    name = "hra"
    config = HRAConfig
    uses_rank = False  # r counts reflections in R^{d_in}: only r <= d_in matters
    kinds = ("linear", "conv1d", "conv")

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return {"lora_reflectors": ParamSpec((cfg.r, d_in), _paired_kaiming)}

    @staticmethod
    def validate(layer, cfg):
        d_in = dims(layer)[0]
        if cfg.r > d_in:
            raise ValueError(f"r={cfg.r} reflections exceed d_in={d_in}; use r <= d_in")

    @staticmethod
    def delta_input(layer, cfg, x):
        U_hat, T_inv_t = _wy(layer)
        U_hat = like(x, U_hat)
        # the (…, r) middle product in fp32: its paired entries must cancel in the last product
        w = (F.linear(x, U_hat).float() @ T_inv_t).to(x.dtype)
        return -F.linear(w, U_hat.T)

    @staticmethod
    def delta_conv(layer, cfg, x, y):
        U_hat, T_inv_t = _wy(layer)
        dW = -((dense_weight(layer) @ U_hat.T) @ T_inv_t.T) @ U_hat       # W (R − I), (C_out, d_in)
        return layer._conv_forward(x, like(x, dW).reshape(layer.weight.shape), None)

    @staticmethod
    def effective_weight(layer, cfg):
        U_hat, T_inv_t = _wy(layer)
        R = torch.eye(U_hat.shape[1], dtype=U_hat.dtype, device=U_hat.device) - U_hat.T @ T_inv_t.T @ U_hat
        return dense_weight(layer) @ R, layer.bias

    @staticmethod
    def params_per_layer(d_in, d_out, cfg):
        return cfg.r * d_in

    # paired reflections cancel in exact arithmetic only: Δx is the rounding of the (…, r) product
    identity_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
    examples = {"hra": Example({"r": 4})}
    peft = PeftMap(
        "HRA", (("lora_reflectors", "hra_u.default", "T"),),
        lambda cfg, t: dict(r=cfg.r, apply_GS=False, target_modules=t, bias="none", init_weights=True),
        imports=lambda conf, name, shapes: {"r": shapes["lora_reflectors"][1]},
        reads=("r",),
    )
    # compact WY: per token x Ûᵀ, · T⁻ᵀ, · Û (2r·d_in + r²); per call Û Ûᵀ and an r x r inverse
    bench = BenchSetting((3e-5, 1e-4, 3e-4, 1e-3, 3e-3), lambda r, g: {"r": r - r % 2},
                         lambda i, o, c: (2 * c.r * i + c.r * c.r, c.r * c.r * i + c.r ** 3), peft="hra")
