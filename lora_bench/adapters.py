"""Which adapters the benchmarks run, how each is configured, and its HF PEFT counterpart.

Each variant declares its benchmark setting in its own file (`Variant.bench`, a
`lora_lite.variant.BenchSetting`): its learning-rate family (C2 sweeps a grid per family), its
config knobs as a function of the requested rank and the model's target geometry, its analytic
added MACs (SPEC B2: the adapter's own multiply-accumulates per token, plus work done once per
forward call regardless of the token count), and the PEFT row of the same method (or, for
`antipasto_corda`, the nearest PEFT analogue: CorDA-initialised LoRA at the same r).
`settings()` reads the registry, so a variant that registers runs here with no code change.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

import lora_lite as ll
from lora_lite.interop.peft import peft_config
from lora_lite.targets import find_targets
from lora_lite.variant import REGISTRY, BenchSetting

from .models import Geometry


def settings() -> dict[str, BenchSetting]:
    """{variant: its declared BenchSetting}, in registry order (read anew: a variant registered
    later, e.g. by a test, is included)."""
    return {name: v.bench for name, v in REGISTRY.items()}



def available(names: list[str] | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Variant names to benchmark, in registry order: the requested ones (default all)."""
    wanted = list(settings()) if names is None else names
    unknown = [n for n in wanted if n not in settings()]
    if unknown:
        raise KeyError(f"unknown variants {unknown}; registered: {list(settings())}")
    return wanted


def target_names(model: nn.Module, cfg: ll.AdapterConfig) -> list[str]:
    """Full module names the config selects (PEFT gets exactly these)."""
    return [n for n, _ in find_targets(model, cfg)]


def geometry(model: nn.Module, targets: tuple[str, ...]) -> Geometry:
    """Target geometry, read by attaching nothing: the same regex filter the configs use."""
    layers = [m for _, m in find_targets(model, ll.LoRAConfig(r=1, target_names=targets))]
    return Geometry(
        min_dim=min(min(m.in_features, m.out_features) for m in layers),
        out_gcd=math.gcd(*(m.out_features for m in layers)),
    )


def make_config(name: str, rank: int, target_names: tuple[str, ...], geom: Geometry,
                knobs: dict | None = None) -> ll.AdapterConfig:
    """Our config for `name`, built through the registry so unmerged variants need no import;
    `knobs` (config fields) override the setting's."""
    fields = {"variant": name, "target_names": list(target_names), **settings()[name].knobs(rank, geom),
              **(knobs or {})}
    return ll.AdapterConfig.from_dict(fields)


def attach_ours(model: nn.Module, cfg: ll.AdapterConfig, calibration: list | None) -> None:
    data = calibration if REGISTRY[cfg.variant].calibration_needs(cfg)[0] is not None else None
    ll.attach(model, cfg, calibration_data=data, progress=False)


def added_macs(name: str, cfg: ll.AdapterConfig, layers) -> tuple[int, int]:
    """(per token, per forward call) analytic added MACs of `name` summed over target layers."""
    per_token = per_call = 0
    for layer in layers:
        t, c = settings()[name].macs(layer.in_features, layer.out_features, cfg)
        per_token, per_call = per_token + t, per_call + c
    return per_token, per_call


# ---- HF PEFT ----------------------------------------------------------------------------------

def _peft_config(method: str, cfg, names: list[str]):
    """PEFT's config for `method`; the data-driven inits (EVA, CorDA) run PEFT's own init,
    everything else is the shared map in lora_lite.interop.peft."""
    import peft

    if method in ("eva", "corda"):
        from peft.tuners.lora.config import CordaConfig

        init = {  # EVA with rho = 1: no rank redistribution, so every layer keeps rank r
            "eva": {"init_lora_weights": "eva",
                    "eva_config": peft.EvaConfig(rho=1.0, whiten=False, use_label_mask=False)},
            "corda": {"init_lora_weights": "corda", "corda_config": CordaConfig(corda_method="ipm")},
        }[method]
        # antipasto_corda (gains, no alpha) is timed against CorDA-initialised LoRA: alpha = r
        # (scale 1) there, which changes no cost
        return peft.LoraConfig(r=cfg.r, lora_alpha=getattr(cfg, "alpha", cfg.r), lora_dropout=0.0,
                               target_modules=names, bias="none", use_rslora=False, **init)
    return peft_config(cfg, names)


def attach_peft(model: nn.Module, method: str, cfg, names: list[str], calibration: list | None):
    """PEFT's model for `method` on the same target modules; data-driven inits (EVA, CorDA)
    read the calibration batches. Returns the PeftModel (it adapts `model` in place)."""
    import peft

    pcfg = _peft_config(method, cfg, names)
    if method == "corda":
        from peft.tuners.lora.corda import preprocess_corda

        def run_model():  # PEFT's covariance hook assumes batch size 1 and no padding
            for b in calibration:
                for row, mask in zip(b["input_ids"], b["attention_mask"]):
                    model(input_ids=row[mask.bool()][None])

        preprocess_corda(model, pcfg, run_model=run_model)
    pm = peft.get_peft_model(model, pcfg)
    if method == "eva":
        peft.initialize_lora_eva_weights(pm, dataloader=calibration, show_progress_bar=False)
    return pm


def peft_method(name: str) -> str | None:
    return settings()[name].peft
