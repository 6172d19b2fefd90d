"""LoRA: a trainable low-rank product beside the frozen weight (arXiv 2106.09685).

    Δy = s · (x Aᵀ) Bᵀ,  y' = y + Δy       s = alpha / r
    A (r, d_in)   trainable, kaiming-uniform (±1/√d_in)
    B (d_out, r)  trainable, 0  ->  identity at init, bit for bit; at step 0 grad A = 0
    W_eff = W + s·B A,  b_eff = b           (the bias stays inside y, untouched)

On an nn.Embedding (d_in = vocabulary size V, d_out = embedding dim, W = weightᵀ) x is a
one-hot token, so x Aᵀ is the row lookup embed(ids, Aᵀ):  Δy = s · embed(ids, Aᵀ) Bᵀ.
On a convolution (W (C_out, C_in/groups·kernel), kinds.py) x Aᵀ is a convolution with A as its
kernel (the layer's stride, padding, dilation) and B a 1×1 convolution:  Δy = s · B ⋆ (A ⋆ x);
with groups g each group's input gets A and its outputs read their own r channels through B.

Matches HF PEFT `LoraConfig(r, lora_alpha=alpha, lora_dropout=0, use_rslora=False)` with
lora_A.weight = A, lora_B.weight = B (on an embedding lora_embedding_A = A (r, V),
lora_embedding_B = B (dim, r); on a conv with groups = 1 and dilation = 1 A and B reshaped to
PEFT's conv kernels (r, C_in, *kernel) and (C_out, r, 1, …)).

On a fused parameter of E experts (MoE, kinds.py) each expert e has its own pair:
W_e' = W_e + s·B_e A_e with A (E, r, d_in), B (E, d_out, r) — PEFT's `target_parameters` LoRA
(its lora_A.weight (E·r, d_in) = A reshaped, lora_B.weight (d_out, r·E) with column j·E + e =
B_e[:, j]). No rsLoRA here: rsLoRA's α/√r is alpha = α_peft·√r.

Dropout (PEFT's lora_dropout): in training mode the low-rank branch reads dropout(x), zeroing
each input element with probability p and scaling the rest by 1/(1 − p) —
Δy = s·(dropout(x) Aᵀ) Bᵀ — while the base y = x Wᵀ + b keeps x; in eval mode Δy reads x. It
draws the same mask as PEFT's nn.Dropout from the same random state (one draw per target,
after the base forward). An embedding's input is token ids, which are not dropped (as in
PEFT); a fused parameter's change is added to its weight, which has no input to drop.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch.nn.functional as F

from ..config import ScaledConfig, knob
from ..variant import BenchSetting, Example, ParamSpec, PeftMap, Variant, like, register


@dataclass(frozen=True, kw_only=True)
class DropoutConfig(ScaledConfig):
    """r, alpha and the dropout of the low-rank branch's input (LoRA, DoRA, EVA)."""

    dropout: float = knob(0.0, "probability of zeroing an element of the input the low-rank branch "
                               "reads, in training mode only (PEFT's lora_dropout); 0 <= dropout < 1; "
                               "eval is unaffected")

    def check(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{type(self).__name__}.dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True, kw_only=True)
class LoRAConfig(DropoutConfig):
    variant: str = field(default="lora", init=False)


LORA_LRS = (3e-4, 5e-4, 1e-3, 3e-3)  # the benchmark's lr grid of the LoRA family


def lora_specs(d_in, d_out, r):
    """A kaiming (r, d_in), B zeros (d_out, r): the LoRA pair, zero delta at init."""
    return {
        "lora_A": ParamSpec((r, d_in), "kaiming"),
        "lora_B": ParamSpec((d_out, r), "zeros"),
    }


def low_rank(x, A, B, scale=1.0):
    """scale·(x Aᵀ) Bᵀ in x's dtype; scaling the (…, r) intermediate is cheaper than (…, d_out),
    and scale 1 (the scale_outside variants) skips the multiply."""
    A, B = like(x, A, B)
    h = F.linear(x, A)
    return F.linear(h if scale == 1.0 else h * scale, B)


def embedding_low_rank(layer, ids, A, B, scale, y):
    """scale·embed(ids, Aᵀ) Bᵀ in y's dtype: (onehot(ids) Aᵀ) Bᵀ without the one-hot. The
    embedding's padding_idx and gradient options apply to the lookup in Aᵀ as to the base."""
    A, B = like(y, A, B)
    after_A = F.embedding(ids, A.T, padding_idx=layer.padding_idx,
                          scale_grad_by_freq=layer.scale_grad_by_freq, sparse=layer.sparse)
    return F.linear(after_A * scale, B)


def conv_low_rank(layer, x, A, B, scale=1.0):
    """scale·B ⋆ (A ⋆ x) on a conv target, in x's dtype. A (r, C_in/g·kernel) runs as the
    layer's own convolution (stride, padding, padding mode, dilation) with its kernel repeated
    for each of the g groups: h (N, g·r, *spatial); B (C_out, r) is a 1×1 convolution with g
    groups, so output channel o reads the r channels of its own group. Then
    Δy[o] = Σ_j B[o, j] (A[j] ⋆ x_group(o)), i.e. conv(x, (B A) in the layer's shape)."""
    A, B = like(x, A, B)
    g, spatial = layer.groups, layer.weight.dim() - 2
    kernel = A.reshape(A.shape[0], -1, *layer.kernel_size)
    h = layer._conv_forward(x, kernel.repeat(g, *(1,) * (spatial + 1)) if g > 1 else kernel, None)
    return _CONV[spatial](h if scale == 1.0 else h * scale, B.reshape(*B.shape, *(1,) * spatial), groups=g)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def dropped(layer, cfg, x):
    """The input the low-rank branch reads: dropout(x) while `layer` trains and cfg.dropout > 0."""
    return F.dropout(x, cfg.dropout) if cfg.dropout and layer.training else x


def refuse_dropout_on_fused(layer, cfg):
    """`validate` of a DropoutConfig variant: a fused parameter's change has no input to drop."""
    if cfg.dropout and getattr(layer, "num_experts", None) is not None:
        raise ValueError(f"dropout={cfg.dropout} has no input to act on at a fused parameter "
                         f"(its change is added to the weight); use dropout=0 there")


def lora_delta(layer, cfg, x, y):
    """Δy / s = (x Aᵀ) Bᵀ (scale_outside: the hook applies s in its add)."""
    return low_rank(dropped(layer, cfg, x), layer.lora_A, layer.lora_B)


def lora_delta_embedding(layer, cfg, ids, y):
    """Δy = s·embed(ids, Aᵀ) Bᵀ."""
    return embedding_low_rank(layer, ids, layer.lora_A, layer.lora_B, cfg.scale, y)


def lora_delta_conv(layer, cfg, x, y):
    """Δy = s·B ⋆ (A ⋆ x)."""
    return conv_low_rank(layer, dropped(layer, cfg, x), layer.lora_A, layer.lora_B, cfg.scale)


def lora_low_rank_delta(layer, cfg):
    return cfg.scale * layer.lora_B.float(), layer.lora_A.float()


def lora_params(d_in, d_out, cfg):
    return cfg.r * (d_in + d_out)


def lora_macs(d_in, d_out, cfg):
    return cfg.r * (d_in + d_out), 0


# PEFT's LoRA layer holds A and B as lora_A/lora_B Linear weights, same layout as ours.
PEFT_LORA_TENSORS = (("lora_A", "lora_A.default.weight", None), ("lora_B", "lora_B.default.weight", None))
# PEFT LoRA config fields the import reads (r and the scale, DoRA, the init that must not rewrite W).
PEFT_LORA_READS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "use_dora", "rank_pattern",
                   "alpha_pattern", "init_lora_weights")


def peft_lora_fields(cfg, targets, **extra):
    """PEFT LoraConfig fields with our rank, scale and dropout on `targets` (no rsLoRA)."""
    dropout = cfg.dropout if isinstance(cfg, DropoutConfig) else 0.0
    return {**dict(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=dropout, target_modules=targets, bias="none",
                   fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True), **extra}


def peft_lora_import(use_dora: bool):
    """The `imports` of a PEFT LoRA adapter (use_dora selects LoRA or DoRA): r from the saved
    lora_A, alpha from lora_alpha with PEFT's rank/alpha patterns and rsLoRA (scale
    lora_alpha/√r, so alpha = lora_alpha·√r)."""

    def imports(conf, name, shapes):
        if bool(conf.get("use_dora")) != use_dora:
            return None
        r = shapes["lora_A"][0]
        r_conf = _pattern_value(conf.get("rank_pattern") or {}, name, conf.get("r", 8))
        if r_conf != r:
            raise ValueError(f"adapter_config.json (r, rank_pattern) says r={r_conf} at {name} but the saved lora_A has rank {r}")
        alpha = float(_pattern_value(conf.get("alpha_pattern") or {}, name, conf.get("lora_alpha", 8)))
        return {"r": r, "alpha": alpha * math.sqrt(r) if conf.get("use_rslora") else alpha,
                "dropout": float(conf.get("lora_dropout") or 0.0)}

    return imports


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@register
class LoRA(Variant):
    name = "lora"
    config = LoRAConfig
    zero_grad_at_init = ("lora_A",)  # grad A = s·Bᵀ(...) = 0 while B = 0
    kinds = ("linear", "conv1d", "embedding", "fused", "conv")
    scale_outside = True
    wide_ranks = True  # B A needs no r <= min(d_in, d_out); PEFT allows any r

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return lora_specs(d_in, d_out, cfg.r)

    validate = staticmethod(refuse_dropout_on_fused)
    delta = staticmethod(lora_delta)
    delta_embedding = staticmethod(lora_delta_embedding)
    delta_conv = staticmethod(lora_delta_conv)
    low_rank_delta = staticmethod(lora_low_rank_delta)

    @staticmethod
    def hold(factors):
        """Any change W + B A ({target: (B (…, d_out, k), A (…, k, d_in))}) as a LoRA at scale 1:
        r = the largest k, the smaller pairs padded with zero columns of B and rows of A, and
        alpha = r, so s·B A = B A exactly."""
        r = max(B.shape[-1] for B, _ in factors.values())
        tensors = {name: {"lora_A": F.pad(A, (0, 0, 0, r - A.shape[-2])), "lora_B": F.pad(B, (0, r - B.shape[-1]))}
                   for name, (B, A) in factors.items()}
        return {"r": r, "alpha": float(r)}, tensors

    params_per_layer = staticmethod(lora_params)
    examples = {"lora": Example({"r": 4, "alpha": 8.0})}
    peft = PeftMap("LORA", PEFT_LORA_TENSORS, peft_lora_fields, imports=peft_lora_import(use_dora=False),
                   reads=PEFT_LORA_READS)
    bench = BenchSetting(LORA_LRS, lambda r, g: {"r": r, "alpha": 2.0 * r}, lora_macs, peft="lora")
