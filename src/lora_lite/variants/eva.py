"""EVA: LoRA whose A starts as the top-r right singular vectors of the layer's inputs (arXiv 2410.07170).

    X (N, d_in) = the layer's inputs on calibration data (unmasked tokens only)
    A (r, d_in) trainable = top-r right singular vectors of X = top-r eigenvectors of XᵀX,
                largest first (orthonormal rows, unscaled)
    B (d_out, r) trainable, 0  ->  identity at init, bit for bit; at step 0 grad A = 0
    Δy = s·(x Aᵀ) Bᵀ,   W_eff = W + s·B A,   s = alpha / r

The runtime collects only XᵀX (d_in x d_in) in one pass on the untouched model, so no
activations are stored; padding (attention_mask == 0) is excluded. Calibration data is required
(attach refuses without it, before touching the model); load needs none, since A is saved.
Uniform r per layer, no centering, no whitening, no rank redistribution.

HF PEFT `LoraConfig(init_lora_weights="eva")` differs: its incremental PCA centers the inputs,
uses randomized SVDs batch by batch until the components stop moving, by default also drops
labels == -100 and redistributes ranks (rho = 2). With rho = 1, whiten = False and the same
unmasked tokens, its A spans the top-r subspace of the *centered* second moment, so the two agree
where the input mean is small against the spread. Same forward as PEFT's LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..variant import BenchSetting, Example, PeftMap, Variant, register
from ._svd import top_r_eigvecs
from .lora import (
    LORA_LRS, PEFT_LORA_TENSORS, DropoutConfig, lora_delta, lora_low_rank_delta, lora_macs, lora_params, lora_specs,
    peft_lora_fields,
)


@dataclass(frozen=True, kw_only=True)
class EVAConfig(DropoutConfig):
    variant: str = field(default="eva", init=False)


@register
class EVA(Variant):
    name = "eva"
    config = EVAConfig
    calibration = "gram"
    requires_calibration = True
    zero_grad_at_init = ("lora_A",)  # grad A = s·Bᵀ(...) = 0 while B = 0
    scale_outside = True

    @staticmethod
    def param_specs(d_in, d_out, cfg):
        return lora_specs(d_in, d_out, cfg.r)  # init overwrites A with the eigenvectors

    @staticmethod
    def init(layer, cfg, stats):
        layer.lora_A.copy_(top_r_eigvecs(stats["gram"], cfg.r))

    delta = staticmethod(lora_delta)
    low_rank_delta = staticmethod(lora_low_rank_delta)

    params_per_layer = staticmethod(lora_params)
    # blocks 0 and 1 only: each target costs an eigh (block 1's targets sit downstream of block 0's)
    examples = {"eva": Example({"r": 4, "alpha": 8.0, "layers": (0, 1)})}
    # the forward is PEFT's LoRA; its data-driven init is not replayed (A is in the tensors), so
    # the export is a plain PEFT LoRA and a PEFT EVA adapter imports as `lora`
    peft = PeftMap("LORA", PEFT_LORA_TENSORS, peft_lora_fields)
    bench = BenchSetting(LORA_LRS, lambda r, g: {"r": r, "alpha": 2.0 * r}, lora_macs, peft="eva", family="lora")
