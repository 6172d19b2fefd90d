"""The map between lora-lite adapters and HF PEFT (0.21.x) for the methods both have.

`peft_config(cfg, targets)` builds the PEFT config of the same method on the same modules, and
`peft_tensors(layer, cfg)` gives, for one of our adapted layers, the tensors PEFT keeps for it,
keyed by their path inside PEFT's layer (adapter name "default"), in PEFT's layout:

    lora / pissa / eva  lora_A.default.weight = A, lora_B.default.weight = B
    dora                + lora_magnitude_vector.default.weight = m
    delora              delora_A/B.default = A/B, delora_lambda.default = λ (1,), delora_w_norm.default = w
    hra                 hra_u.default = Uᵀ (d_in, r)
    ia3 / ia3_ff        ia3_l.default = g as (d_out, 1) / (1, d_in)
    road                road_theta.default, road_alpha.default (same layout)

`copy_to_peft` writes them into a PEFT model, which then computes the same function (the
parity tests check ≤ 1e-5 relative in fp32). Importing this module does not import peft.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import AdapterConfig
from ..runtime import state_of

PEFT_METHODS = ("lora", "pissa", "dora", "delora", "hra", "ia3", "ia3_ff", "road", "eva")


def peft_config(cfg: AdapterConfig, targets: list[str]):
    """The PEFT config for the same method, rank and scale on the given module names."""
    import peft

    v = cfg.variant
    if v in ("lora", "pissa", "dora", "eva"):
        # EVA's data-driven init is not replayed here: copy_to_peft brings our A and B.
        init = "pissa" if v == "pissa" else True
        return peft.LoraConfig(
            r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets, bias="none",
            use_rslora=False, use_dora=v == "dora", init_lora_weights=init,
        )
    if v == "delora":
        return peft.DeloraConfig(r=cfg.r, delora_lambda=cfg.lambda0, module_dropout=0.0,
                                 target_modules=targets, init_weights=True)
    if v == "hra":
        return peft.HRAConfig(r=cfg.r, apply_GS=False, target_modules=targets, init_weights=True)
    if v in ("ia3", "ia3_ff"):
        return peft.IA3Config(target_modules=targets,
                              feedforward_modules=targets if v == "ia3_ff" else [])
    if v == "road":
        return peft.RoadConfig(variant=cfg.road_variant, group_size=cfg.group_size,
                               target_modules=targets, init_weights=True)
    raise KeyError(f"variant {v!r} has no HF PEFT counterpart; methods with one: {PEFT_METHODS}")


def peft_tensors(layer: nn.Module, cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    """Our adapter tensors of `layer` under PEFT's names and layout."""
    v = cfg.variant
    if v in ("lora", "pissa", "dora", "eva"):
        out = {"lora_A.default.weight": layer.lora_A, "lora_B.default.weight": layer.lora_B}
        if v == "dora":
            out["lora_magnitude_vector.default.weight"] = layer.lora_m
        return out
    if v == "delora":
        return {
            "delora_A.default": layer.lora_A,
            "delora_B.default": layer.lora_B,
            "delora_lambda.default": layer.lora_lambda.reshape(1),
            "delora_w_norm.default": layer.lora_wnorm,
        }
    if v == "hra":
        return {"hra_u.default": layer.lora_U.T}
    if v == "ia3":
        return {"ia3_l.default": layer.lora_g[:, None]}
    if v == "ia3_ff":
        return {"ia3_l.default": layer.lora_g[None, :]}
    if v == "road":
        return {"road_theta.default": layer.lora_road_theta, "road_alpha.default": layer.lora_road_alpha}
    raise KeyError(f"variant {v!r} has no HF PEFT counterpart; methods with one: {PEFT_METHODS}")


@torch.no_grad()
def copy_to_peft(model: nn.Module, peft_model: nn.Module) -> None:
    """Copy the adapter attached to `model` into the same-method PEFT model `peft_model`."""
    state = state_of(model)
    inner = peft_model.base_model.model
    for name, layer in state.targets.items():
        target = inner.get_submodule(name)
        for path, tensor in peft_tensors(layer, state.cfg).items():
            owner, _, leaf = path.rpartition(".")
            slot = getattr(target.get_submodule(owner), leaf)
            if slot.shape != tensor.shape:
                raise ValueError(f"{name}.{path}: PEFT holds {tuple(slot.shape)}, ours is {tuple(tensor.shape)}")
            slot.copy_(tensor)
