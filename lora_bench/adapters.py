"""Which adapters the benchmarks run, how each is configured, and its HF PEFT counterpart.

SETTINGS has one entry per lora-lite variant the benchmarks know: its learning-rate family
(C2 sweeps a grid per family), its config knobs as a function of the requested rank and the
model's target geometry, and the PEFT method that implements the same math (or, for
`antipasto_corda`, the nearest PEFT analogue: CorDA-initialised LoRA at the same r). A
variant in `lora_lite.REGISTRY` without an entry is an error (tests check coverage); an
entry whose variant is not registered in this build is skipped with a note, so variants
that land later run with no code change here.

Analytic added MACs per token follow SPEC B2: the adapter's own multiply-accumulates per
token, plus (separately) work done once per forward call regardless of the token count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

import lora_lite as ll
from lora_lite.interop.peft import peft_config
from lora_lite.targets import find_targets
from lora_lite.variant import REGISTRY

from .models import Geometry


@dataclass(frozen=True)
class Setting:
    family: str                                   # learning-rate family (quality sweep)
    knobs: Callable[[int, Geometry], dict]        # (rank, geometry) -> config fields
    macs: Callable[[int, int, object], tuple[int, int]]  # (d_in, d_out, cfg) -> (per token, per call)
    peft: str | None = None                       # key of PEFT_METHODS, None = no PEFT method


def _low_rank(alpha_over_r: float):
    return lambda r, g: {"r": r, "alpha": alpha_over_r * r}


def _big_rank(r, g):
    """The SVD-steering family trains r scalars per layer, so it uses a large basis (SPEC B6.1:
    r = 256), capped at the model's smallest target and kept a multiple of 8 (rot blocks)."""
    return {"r": min(256, g.min_dim - g.min_dim % 8)}


def _ab(i, o, c):
    return c.r * (i + o)


SETTINGS: dict[str, Setting] = {
    "lora": Setting("lora", _low_rank(2.0), lambda i, o, c: (_ab(i, o, c), 0), "lora"),
    # PiSSA folds the scale into its init; the seed benchmark uses alpha = r.
    # PiSSA adds s·(x Aᵀ)Bᵀ − s·(x A0ᵀ)B0ᵀ: two rank-r products (W is never rewritten).
    "pissa": Setting("pissa", _low_rank(1.0), lambda i, o, c: (2 * _ab(i, o, c), 0), "pissa"),
    # DoRA recomputes the row norms of W + sBA every call: r·d_in·d_out + d_in·d_out.
    "dora": Setting("lora", _low_rank(2.0),
                    lambda i, o, c: (_ab(i, o, c) + 2 * o, c.r * i * o + i * o), "dora"),
    # λ0 bounds ‖ΔW‖: with B = 0 and the 1e-4 norm clamp the update reaches its bound at the
    # first step, ‖ΔW‖/‖W‖ ≈ λ/(√r·√d_in) (MiniLM, r = 16: 0.013 for λ0 = 1, 0.052 for 4, ~0.19
    # for the library's 15, which collapsed to chance at every lr), and λ hardly moves at the
    # adapter's lr (results/diagnosis.md §3). 1 keeps the jump within LoRA's range.
    "delora": Setting("delora", lambda r, g: {"r": r, "lambda0": 1.0},
                      lambda i, o, c: (_ab(i, o, c) + i + c.r, 0), "delora"),
    # compact-WY: per token x Ûᵀ, · T⁻ᵀ, · Û (2r·d_in + r²); per call Û Ûᵀ and an r x r inverse.
    "hra": Setting("hra", lambda r, g: {"r": r - r % 2},
                   lambda i, o, c: (2 * c.r * i + c.r * c.r, c.r * c.r * i + c.r ** 3), "hra"),
    "ia3": Setting("gain", lambda r, g: {}, lambda i, o, c: (o, 0), "ia3"),
    "ia3_ff": Setting("gain", lambda r, g: {}, lambda i, o, c: (i, 0), "ia3_ff"),
    "road": Setting("road", lambda r, g: {"road_variant": "road_1", "group_size": math.gcd(64, g.out_gcd)},
                    lambda i, o, c: (2 * o, 0), "road"),
    # The LoRA-XS reference uses alpha = r (s = 1).
    "lora_xs": Setting("lora_xs", _low_rank(1.0), lambda i, o, c: (_ab(i, o, c) + c.r * c.r, 0)),
    "eva": Setting("lora", _low_rank(2.0), lambda i, o, c: (_ab(i, o, c), 0), "eva"),
    "antipasto": Setting("svd", _big_rank, lambda i, o, c: (_ab(i, o, c) + c.r, 0)),
    # Cayley solves of the block rotations once per call: r·bs per rotated basis side.
    "antipasto_rot": Setting(
        "svd", _big_rank,
        lambda i, o, c: (_ab(i, o, c) + c.r, c.r * getattr(c, "block_size", 4) * (
            {"V": i, "U": o, "both": i + o}.get(getattr(c, "rotate_basis", "V"), 0))),
    ),
    "antipasto_corda": Setting("svd", _big_rank, lambda i, o, c: (_ab(i, o, c) + c.r, 0), "corda"),
    "antipasto_asvd": Setting("svd", _big_rank, lambda i, o, c: (_ab(i, o, c) + c.r, 0)),
    # The ablation strength α was clamped to [0, 1] with a zero gradient below 0, so the svd
    # family's large steps (2e-2) drove it under 0 in a few steps and the layer stopped learning
    # for good (78% of layers by step 150; 6% at 2e-3). The clamp is straight-through now; the
    # row keeps its own, smaller lr family (600 steps: 2e-3 and 5e-3 both learn).
    "antipasto_ablate": Setting(
        "ablate", _big_rank, lambda i, o, c: (_ab(i, o, c) + c.r + 2 * c.r * getattr(c, "k", 1), 0)),
    # dplr's rank-k core trains like a LoRA (156K params on MiniLM): its own lr family, since
    # the gain-only members want 10-50x larger steps (sweep: dplr collapses at 5e-3 and above).
    "antipasto_dplr": Setting(
        "dplr", _big_rank, lambda i, o, c: (_ab(i, o, c) + c.r + 2 * c.r * getattr(c, "lora_rank", 8), 0)),
}

PEFT_LABELS = {
    "lora": "LoRA", "pissa": "PiSSA", "dora": "DoRA", "delora": "DeLoRA", "hra": "HRA",
    "ia3": "IA3", "ia3_ff": "IA3 (feed-forward)", "road": "RoAd", "eva": "EVA",
    "corda": "CorDA-init LoRA",
}


def available(names: list[str] | None = None, log: Callable[[str], None] = print) -> list[str]:
    """Variant names to benchmark, in SETTINGS order: the requested ones (default all) that
    this build registers. Unregistered names are skipped with a note."""
    missing = sorted(set(REGISTRY) - set(SETTINGS))
    if missing:
        raise KeyError(f"registered variants without a benchmark setting: {missing}; add them to "
                       f"lora_bench.adapters.SETTINGS")
    wanted = list(SETTINGS) if names is None else names
    unknown = [n for n in wanted if n not in SETTINGS]
    if unknown:
        raise KeyError(f"unknown variants {unknown}; known: {list(SETTINGS)}")
    skipped = [n for n in wanted if n not in REGISTRY]
    if skipped:
        log(f"note: not registered in this build, skipped: {', '.join(skipped)}")
    return [n for n in wanted if n in REGISTRY]


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
    fields = {"variant": name, "target_names": list(target_names), **SETTINGS[name].knobs(rank, geom),
              **(knobs or {})}
    return ll.AdapterConfig.from_dict(fields)


def attach_ours(model: nn.Module, cfg: ll.AdapterConfig, calibration: list | None) -> None:
    data = calibration if REGISTRY[cfg.variant].calibration_needs(cfg)[0] is not None else None
    ll.attach(model, cfg, calibration_data=data, progress=False)


def added_macs(name: str, cfg: ll.AdapterConfig, layers) -> tuple[int, int]:
    """(per token, per forward call) analytic added MACs of `name` summed over target layers."""
    per_token = per_call = 0
    for layer in layers:
        t, c = SETTINGS[name].macs(layer.in_features, layer.out_features, cfg)
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
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=names,
                               bias="none", use_rslora=False, **init)
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
    return SETTINGS[name].peft
