"""The map between lora-lite adapters and HF PEFT (0.21 and 0.22): parity, export and import.

What is PEFT-specific about a variant is declared in its own file, as `Variant.peft` (a
`PeftMap`: PEFT's method, where each of our tensors lives in PEFT's layer and how it is laid
out, the PEFT config fields of the same method, and how a saved PEFT adapter's config maps to
ours). This module is the machinery over those declarations and PEFT's own LoRA layout (the
form every other low-rank change exports as); it names and imports no variant.

A saved PEFT adapter (`adapter_model.safetensors`) keys tensors `base_model.model.<module>.<path>`
with ".default" dropped (and DoRA's magnitude as `lora_magnitude_vector`, no ".weight"), next to
`adapter_config.json`; see peft/utils/save_and_load.py.

Export (`export_peft`): a variant whose map says `export` is written as PEFT's own method with
the tensors copied; every other variant whose change is low-rank (W_eff − W = B A, b unchanged:
PiSSA at rank 2r, LoRA-XS and the AntiPaSTO family at rank r) as a plain PEFT LoRA with r =
lora_alpha = k, so PEFT's scale is exactly 1. Written from an `Adapter` (an attached model's,
or a checkpoint's via `ll.read`): no base model, and no `import peft`.

Import (`read_peft` -> `Adapter`, `import_peft` = `ll.load` of it): the variants whose map
`imports` the saved config; every PEFT option that would change the function without a
lora-lite equivalent is refused, naming it, before the model is touched.

Layer kinds (kinds.py). PEFT's LoRA and IA3 keep the same tensors on transformers' Conv1D
(`fan_in_fan_out=True` only says the base weight is stored transposed; PEFT sets it per layer
from the layer's type). On an nn.Embedding PEFT's LoRA names the pair `lora_embedding_A` (r, V) /
`lora_embedding_B` (dim, r), our layout, and saves the base embedding beside it
(`<module>.base_layer.weight`). A fused parameter (MoE experts, `target_parameters`) has its
LoRA on a ParamWrapper replacing the owning module, with A and B 2-D ((E·r, d_in) and (d_out,
r·E), `_to_peft`); several parameters of one module nest (`_peft_module`). Which kinds each
PEFT method adapts is `PEFT_KINDS`; an export that PEFT could not load is refused.

Parity helpers: `peft_config(cfg, targets)` builds the PEFT config of the same method and
`copy_to_peft` writes our tensors into a PEFT model. Only these two need peft installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize
from torch import nn

from ..checkpoint import _DTYPE_CODES, Adapter, adapter_of, load, read, write_atomic
from ..config import AdapterConfig
from ..kinds import fused_parameters, is_transposed, kind_of
from ..runtime import ensure_free, state_of, unwrap, variant_of
from ..variant import REGISTRY, PeftMap

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
MODEL_LEVEL = "base_model."  # a tensor PEFT's tuner holds once for the model (VeRA's vera_A): base_model.<name>
# PEFT's LoRA layer: lora_A / lora_B Linear weights, our (r, d_in) / (d_out, r) layout; the plain
# LoRA every low-rank change W_eff − W = B A exports as.
LORA_LAYOUT = (("lora_A", "lora_A.default.weight", None), ("lora_B", "lora_B.default.weight", None))
# Layer kinds each PEFT method adapts (the others PEFT has for nn.Linear only).
PEFT_KINDS = {"LORA": ("linear", "conv1d", "embedding", "fused", "conv"), "IA3": ("linear", "conv1d", "conv"),
              "HRA": ("linear", "conv")}
# Methods whose PEFT conv layers hold kernels (lora_A a conv, gates (1, C, 1, …)); PEFT's HRA
# keeps the dense view (C_in·kernel, r) as we do.
_CONV_KERNELS = ("LORA", "IA3")
# An embedding's LoRA pair: PEFT's in-layer paths for our lora_A / lora_B there.
_EMBEDDING_PATHS = {"lora_A.default.weight": "lora_embedding_A.default",
                    "lora_B.default.weight": "lora_embedding_B.default"}
_EMBEDDING_KEYS = {"lora_embedding_A": "lora_A.weight", "lora_embedding_B": "lora_B.weight"}
_BASE_KEY = ".base_layer.weight"
_TRAINING_ONLY_KEY = ".lora_velora_embed"  # VeLoRA's projection for the activations kept for backward  # the base embedding PEFT saves beside an embedding adapter
# A fused parameter's LoRA pair in PEFT's 2-D layout.
_EXPERT_LAYOUTS = {"lora_A": "experts_A", "lora_B": "experts_B"}


def peft_kinds(m: PeftMap) -> tuple[str, ...]:
    """The layer kinds PEFT's method of map `m` adapts (its declaration, else `PEFT_KINDS`)."""
    return m.kinds or PEFT_KINDS.get(m.method, ("linear",))


def peft_methods() -> list[str]:
    """Variants with an HF PEFT counterpart (same function, same tensors)."""
    return [n for n, v in REGISTRY.items() if v.peft is not None]


def native_export() -> list[str]:
    """Variants exported as PEFT's own method; the others go through low_rank_delta."""
    return [n for n, v in REGISTRY.items() if v.peft is not None and v.peft.export]


def _map(variant: str) -> PeftMap:
    m = REGISTRY[variant].peft if variant in REGISTRY else None
    if m is None:
        raise KeyError(f"variant {variant!r} has no HF PEFT counterpart; methods with one: {peft_methods()}")
    return m


def _to_peft(t: torch.Tensor, layout: str | None) -> torch.Tensor:
    if layout is None:
        return t
    if layout == "T":
        return t.T
    if layout == "experts_A":  # (E, r, d_in) -> (E·r, d_in)
        return t.reshape(-1, t.shape[-1])
    if layout == "experts_B":  # (E, d_out, r) -> (d_out, r·E), column j·E + e = B_e[:, j]
        return t.permute(1, 2, 0).reshape(t.shape[1], -1)
    return t.reshape({"col": (-1, 1), "row": (1, -1), "1": (1,)}[layout])


def _from_peft(t: torch.Tensor, layout: str | None, experts: int = 1) -> torch.Tensor:
    if layout == "experts_A":
        return t.reshape(experts, -1, t.shape[-1]).contiguous()
    if layout == "experts_B":
        return t.reshape(t.shape[0], -1, experts).permute(2, 0, 1).contiguous()
    if layout == "T":
        return t.T.contiguous()
    if layout == "1":
        return t.reshape(())
    return t.reshape(-1) if layout in ("col", "row") else t


def _peft_module(name: str, kinds: dict[str, str]) -> str:
    """Where PEFT keeps the adapter of target `name`. A fused parameter's LoRA lives on a
    ParamWrapper that replaces its owner; several parameters of one owner nest, the first in
    model order innermost: owner.base_layer…base_layer, one per later sibling."""
    if kinds.get(name) != "fused":
        return name
    owner = name.rpartition(".")[0]
    siblings = [n for n, k in kinds.items() if k == "fused" and n.rpartition(".")[0] == owner]
    return owner + ".base_layer" * (len(siblings) - 1 - siblings.index(name))


def _kind_fields(fields: dict, names: list[str], kinds: dict[str, str]) -> dict:
    """PEFT config fields adjusted to the targets' kinds: fan_in_fan_out on Conv1D, fused
    parameters under target_parameters (PEFT matches them by exact name)."""
    fields = dict(fields)
    if "fan_in_fan_out" in fields:
        fields["fan_in_fan_out"] = "conv1d" in kinds.values()
    fused = [n for n in names if kinds.get(n) == "fused"]
    if fused:
        fields["target_modules"] = [n for n in names if n not in fused]
        fields["target_parameters"] = fused
    return fields


def _file_key(path: str) -> str:
    """PEFT's saved key for an in-layer path: the adapter name dropped (DoRA's magnitude, a
    module in the layer, is saved without '.weight')."""
    key = path.replace(".default", "")
    return "lora_magnitude_vector" if key == "lora_magnitude_vector.weight" else key


# ---- parity: our adapter in a live PEFT model ---------------------------------------------------

def peft_config(cfg: AdapterConfig, targets: list[str], kinds: dict[str, str] | None = None):
    """The PEFT config object of the same method, rank and scale on the given targets (of the
    given kinds, kinds.py; default nn.Linear)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    m = _map(cfg.variant)
    return PEFT_TYPE_TO_CONFIG_MAPPING[m.method](**_kind_fields(m.config(cfg, targets), targets, kinds or {}))


def peft_tensors(name: str, layer, cfg: AdapterConfig, kind: str = "linear",
                 conv: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Our adapter tensors of target `name` (`layer`: a module or a namespace of tensors, of that
    kind) under PEFT's in-layer paths and layout (that of the variant placed there, `at_target`);
    a conv target needs its layer (`conv`, default `layer`) for PEFT's kernel shapes."""
    _map(cfg.variant)  # KeyError for a variant without a PEFT counterpart
    tensors = _in_peft_layout(variant_of(cfg).at_target(name, cfg).peft.tensors, layer, kind)
    if kind == "conv":
        conv = layer if conv is None else conv
        _check_peft_conv(name, conv, cfg)
        if _map(cfg.variant).method in _CONV_KERNELS:
            tensors = {path: _conv_layout(path, t, conv.weight.shape) for path, t in tensors.items()}
    return tensors


def _in_peft_layout(tensors, layer, kind: str) -> dict[str, torch.Tensor]:
    """{PEFT in-layer path: tensor} for a PeftMap's tensor map on a target of that kind."""
    if kind == "fused":
        return {path: _to_peft(getattr(layer, ours), _EXPERT_LAYOUTS[ours]) for ours, path, _ in tensors}
    rename = _EMBEDDING_PATHS if kind == "embedding" else {}
    return {rename.get(path, path): _to_peft(getattr(layer, ours), layout) for ours, path, layout in tensors}


@torch.no_grad()
def copy_to_peft(model: nn.Module, peft_model: nn.Module) -> None:
    """Copy the adapter attached to `model` into the same-method PEFT model `peft_model`; where
    PEFT's init rewrote the base weight (PiSSA's residual), the residual our tensors imply
    replaces it, so the PEFT model computes our function and not PEFT's init mixed with ours."""
    state = state_of(model)
    inner = peft_model.base_model.model
    kinds = {n: kind_of(m) for n, m in state.targets.items()}
    for name, layer in state.targets.items():
        target = inner.get_submodule(_peft_module(name, kinds))
        base = variant_of(state.cfg).at_target(name, state.cfg).peft.base
        copies = dict(peft_tensors(name, layer, state.cfg, kinds[name]))
        if base is not None:
            W = base(layer, state.cfg)
            copies["base_layer.weight"] = W.T if is_transposed(target.base_layer) else W  # (Conv1D stores Wᵀ)
        for path, tensor in copies.items():
            owner, _, leaf = path.rpartition(".")
            _copy(getattr(target.get_submodule(owner), leaf), tensor, f"{name}.{path}")
    for ours, theirs in variant_of(state.cfg).peft.shared:  # PEFT's tuner holds them once, per adapter
        _copy(getattr(peft_model.base_model, theirs)["default"], state.shared[ours], theirs)


def _copy(slot: torch.Tensor, tensor: torch.Tensor, where: str) -> None:
    if slot.shape != tensor.shape:
        raise ValueError(f"{where}: PEFT holds {tuple(slot.shape)}, ours is {tuple(tensor.shape)}")
    slot.copy_(tensor)


def _check_peft_conv(name: str, layer: nn.Module, cfg: AdapterConfig) -> None:
    """PEFT's conv LoRA runs lora_A as a dense convolution without the layer's groups and
    dilation (a grouped layer's ΔW then crosses its groups): only groups = dilation = 1 is the
    same function. PEFT's IA3 has Conv2d and Conv3d layers, not Conv1d."""
    method = REGISTRY[cfg.variant].peft.method
    if method == "HRA" and not (isinstance(layer, nn.Conv2d) and layer.groups == 1 and set(layer.dilation) == {1}
                                and len({*layer.kernel_size}) == len({*layer.stride}) == len({*layer.padding}) == 1
                                and layer.padding_mode == "zeros"):
        raise ValueError(
            f"{name}: PEFT's HRA adapts nn.Conv2d with groups=1, dilation 1, zero padding and square kernel, "
            f"stride and padding only (it convolves with kernel_size[0], stride[0], padding[0]); merge it "
            f"with ll.merge instead"
        )
    if method == "LORA" and (layer.groups != 1 or set(layer.dilation) != {1}):
        raise ValueError(
            f"{name}: PEFT's conv LoRA applies lora_A without the layer's groups={layer.groups} and "
            f"dilation={layer.dilation}, so it computes another function than this adapter; merge it "
            f"with ll.merge instead"
        )
    if method == "IA3" and isinstance(layer, nn.Conv1d):
        raise ValueError(f"{name}: PEFT's IA3 adapts nn.Conv2d and nn.Conv3d, not nn.Conv1d; merge it with ll.merge instead")


def _conv_layout(path: str, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """One of our tensors on a conv target (weight `shape` (C_out, C_in/groups, *kernel)) in
    PEFT's conv layout: lora_A a kernel (r, C_in, *kernel), lora_B a 1×1 kernel (C_out, r, 1, …),
    a per-channel vector (DoRA's magnitude, IA3's gate) (1, C_out, 1, …)."""
    ones = (1,) * (len(shape) - 2)
    if ".lora_A." in f".{path}":
        return t.reshape(t.shape[0], *shape[1:])
    if t.numel() == shape[0] and (t.dim() == 1 or 1 in t.shape):
        return t.reshape(1, shape[0], *ones)
    return t.reshape(*t.shape, *ones)


# ---- export -------------------------------------------------------------------------------------

def export_peft(source: nn.Module | str | os.PathLike | Adapter, out_dir: str | os.PathLike) -> dict:
    """Write an adapter — attached to a model, saved in a lora-lite file, or an `Adapter` — as a
    PEFT adapter directory that `peft.PeftModel.from_pretrained(pristine_base, out_dir)` loads
    and that computes the same outputs. Returns the PEFT config written."""
    if isinstance(source, nn.Module):
        source = unwrap(source)
        state = state_of(source)
        if not state.enabled or isinstance(state.scale, torch.Tensor) or state.scale != 1.0:
            raise RuntimeError(
                "export_peft inside ll.disabled / ll.scaled: the exported adapter is the trained one at "
                "strength 1; call it outside the context (or ll.merge to bake in a strength)"
            )
        convs = {n: m for n, m in state.targets.items() if kind_of(m) == "conv"}
        return write_peft(adapter_of(source), out_dir, convs)
    elif not isinstance(source, Adapter):
        source = read(source)
    return write_peft(source, out_dir)


def export_peft_file(path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """`export_peft` from a lora-lite checkpoint file alone (no base model)."""
    return write_peft(read(path), out_dir)


@torch.no_grad()
def write_peft(adapter: Adapter, out_dir: str | os.PathLike, convs: dict[str, nn.Module] | None = None) -> dict:
    """The PEFT exporter: `adapter` as adapter_config.json + adapter_model.safetensors. PEFT
    stores a conv target's tensors as kernels, whose shape only the layer knows: `convs` maps
    those targets to their layers (export_peft of a model passes them)."""
    cfg, names = adapter.config, adapter.targets
    kinds = {n: adapter.kinds.get(n, "linear") for n in names}
    missing = [n for n in names if kinds[n] == "conv" and n not in (convs or {})]
    if missing:
        raise ValueError(
            f"export_peft: {missing[0]} is a convolution, whose PEFT kernels need the layer's kernel shape; "
            f"export from the model (ll.load it, then export_peft(model, dir))"
        )
    layers = {n: SimpleNamespace(**t) for n, t in adapter.tensors.items()}
    m = REGISTRY[cfg.variant].peft
    native = m is not None and m.export
    if native:
        unsupported = sorted({k for k in kinds.values() if k not in peft_kinds(m)})
        if unsupported and variant_of(cfg).low_rank_delta(next(iter(layers.values())), cfg) is None:
            raise ValueError(
                f"variant {cfg.variant!r} cannot be exported to PEFT on {', '.join(unsupported)} layers: "
                f"PEFT's {m.method} adapts only {', '.join(peft_kinds(m))} layers "
                f"and the change is not a low-rank W_eff − W; merge it with ll.merge instead"
            )
        native = not unsupported  # else: a plain LoRA of its low-rank change
    if native:
        fields = {"peft_type": m.method, **_kind_fields(m.config(cfg, names), names, kinds)}
        tensors = {
            f"{PREFIX}{_peft_module(name, kinds)}.{_file_key(path)}": t
            for name, layer in layers.items()
            for path, t in peft_tensors(name, layer, cfg, kinds[name], (convs or {}).get(name)).items()
        }
        tensors.update({f"{MODEL_LEVEL}{theirs}": adapter.shared[ours] for ours, theirs in m.shared})
    else:
        fields, tensors = _low_rank_lora(cfg, layers, kinds)
    saved = _saved_modules(adapter)
    tensors.update({PREFIX + p: t for p, t in adapter.trainable.items()})
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    fields = {**fields, "inference_mode": True, "modules_to_save": saved or None, "task_type": None,
              "base_model_name_or_path": None, "revision": None}
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, WEIGHTS_NAME), serialize(tensors, metadata={"format": "pt"}))
    write_atomic(os.path.join(out_dir, CONFIG_NAME), (json.dumps(fields, indent=2, sort_keys=True) + "\n").encode())
    return fields


def _saved_modules(adapter: Adapter) -> list[str]:
    """PEFT's modules_to_save for the adapter's trainable_modules: for each trained parameter the
    outermost module on its path that a trainable_modules regex matches (PEFT saves that module's
    parameters under their own names, as we do)."""
    saved: list[str] = []
    for pname in adapter.trainable:
        parts = pname.split(".")[:-1]
        module = next(".".join(parts[:i]) for i in range(1, len(parts) + 1)
                      if any(re.search(p, ".".join(parts[:i])) for p in adapter.config.trainable_modules))
        if module not in saved:
            saved.append(module)
    return saved


def _low_rank_lora(cfg: AdapterConfig, layers: dict, kinds: dict[str, str]) -> tuple[dict, dict]:
    """A plain PEFT LoRA with B A = W_eff − W at every target; r = lora_alpha = k (scale 1)."""
    variant = variant_of(cfg)
    factors = {name: variant.at_target(name, cfg).low_rank_delta(layer, cfg) for name, layer in layers.items()}
    if any(f is None for f in factors.values()):
        raise ValueError(
            f"variant {cfg.variant!r} cannot be exported to PEFT: its change is not a low-rank "
            f"W_eff − W with an unchanged bias and PEFT has no same-method counterpart "
            f"(PEFT methods we map: {native_export()}); merge it with ll.merge instead"
        )
    ranks = {B.shape[1] for B, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"{cfg.variant!r}: targets have different ranks {sorted(ranks)}; PEFT's LoRA has one r")
    k = ranks.pop()
    tensors = {}
    for name, (B, A) in factors.items():  # fp32, as low_rank_delta computes them
        lora = {"lora_A": A, "lora_B": B}
        for path, t in _in_peft_layout(LORA_LAYOUT, SimpleNamespace(**lora), kinds[name]).items():
            tensors[f"{PREFIX}{_peft_module(name, kinds)}.{_file_key(path)}"] = t
    fields = dict(
        peft_type="LORA", r=k, lora_alpha=k, lora_dropout=0.0, target_modules=list(layers),
        bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
    )
    return _kind_fields(fields, list(layers), kinds), tensors


# ---- import -------------------------------------------------------------------------------------

# Config fields that do not change what a loaded adapter computes: bookkeeping, targeting (the
# saved keys say which modules are adapted), dropout (inert at inference), init-only settings
# (the saved tensors replace the init; inits that rewrite the base are refused separately).
_INERT = {
    "peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "lora_dropout", "module_dropout", "init_weights", "init_ia3_weights", "eva_config", "corda_config",
    "loftq_config", "lora_ga_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "runtime_config", "lambda_pattern", "feedforward_modules",
    # PEFT decides it per layer from the layer's type (Conv1D: True, nn.Linear: False), as we do
    "fan_in_fan_out",
    # read from the saved keys with the model (`read_peft(dir, model)`)
    "target_parameters",
    # the saved modules' parameters, read by read_peft as trainable_modules
    "modules_to_save",
    # training-only: VeLoRA compresses the activations LoRA saves for backward; the forward is LoRA's
    "velora_config",
}
# Inits that leave the base weight alone; PiSSA/CorDA/OLoRA/LoftQ/LoRA-GA write a residual base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal",
                "mica")  # MiCA: B from W's minor singular vectors, A = 0, B frozen in training only
_WHY = {
    "bias": "PEFT trains the base layers' biases, which lora-lite never changes",
    "lora_bias": "PEFT adds a trainable bias to lora_B, which no lora-lite variant has",
    "layer_replication": "PEFT duplicates base layers, which changes the model itself",
    "trainable_token_indices": "PEFT trains embedding rows, not a linear layer",
    "apply_GS": "Gram-Schmidt orthogonalised reflections are a different parametrisation than lora-lite's HRA",
    "use_qalora": "QA-LoRA pools the input in groups before lora_A",
    "megatron_config": "Megatron parallel layers are not nn.Linear-like",
}


def import_peft(model: nn.Module, peft_dir: str | os.PathLike) -> AdapterConfig:
    """Attach the PEFT adapter saved in `peft_dir` (adapter_config.json + adapter_model.safetensors)
    to a pristine `model` as the matching lora-lite variant; returns its config. Everything is
    checked before the model is touched (`ll.load` of `read_peft(peft_dir)`)."""
    model = unwrap(model)
    ensure_free(model)
    adapter = read_peft(peft_dir, model)
    load(model, adapter)
    return adapter.config


def read_peft(peft_dir: str | os.PathLike, model: nn.Module | None = None) -> Adapter:
    """A saved PEFT adapter as an `Adapter` of the matching variant (no fingerprints: PEFT
    records none); ValueError naming the option for anything without an exact equivalent.

    `model` (the base it is for) is needed for a `target_parameters` adapter: which parameter a
    nested ParamWrapper holds, and the expert count, come from the model. With a model, a base
    embedding PEFT saved beside an embedding adapter must be that model's (PEFT loads it over the
    base); without one it is not read."""
    peft_dir = os.fspath(peft_dir)
    conf, weights = _read_peft_dir(peft_dir)
    with safe_open(weights, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        bases = [k for k in shapes if k.endswith(_BASE_KEY)]
        if model is not None:
            _check_saved_bases(peft_dir, model, {k: f.get_tensor(k) for k in bases})
        shapes = {k: v for k, v in shapes.items() if k not in bases and not k.endswith(_TRAINING_ONLY_KEY)}
        saved = _saved_keys(conf, shapes)
        trainable = {p: f.get_tensor(k) for p, (k, _) in saved.items()}
        shapes = {k: v for k, v in shapes.items() if k not in {k for k, _ in saved.values()}}
        dtypes = {_DTYPE_CODES.get(f.get_slice(k).get_dtype()) for k in shapes}
        model_level = [k for k in shapes if not k.startswith(PREFIX) and k.startswith(MODEL_LEVEL)]
        shapes = {k: v for k, v in shapes.items() if k not in model_level}
        # every key under the name a linear layer's LoRA would have: stored key -> that name
        alias = _unnest_parameters(peft_dir, model, conf, shapes)
        kinds = {}
        for key in shapes:
            module, _, leaf = alias.get(key, (key, None))[0].rpartition(".")
            if leaf in _EMBEDDING_KEYS:
                alias[key] = (f"{module}.{_EMBEDDING_KEYS[leaf]}", None)
                kinds[module.removeprefix(PREFIX)] = "embedding"
        experts = {new: E for new, E in alias.values() if E}
        for new, E in alias.values():
            if E:
                kinds[new.removeprefix(PREFIX).rpartition(".lora_")[0]] = "fused"
        original = {alias.get(k, (k, None))[0]: k for k in shapes}

        def per_expert(key, shape):  # PEFT's (E·r, d_in) / (d_out, r·E) as one expert's (r, d_in) / (d_out, r)
            E = experts.get(key)
            return shape if not E else ((shape[0] // E, shape[1]) if key.endswith("lora_A.weight") else (shape[0], shape[1] // E))

        cfg, plan = _convert(peft_dir, conf, {k: per_expert(k, shapes[v]) for k, v in original.items()},
                             torch.float32 if None in dtypes or len(dtypes) != 1 else dtypes.pop())
        tensors = {name: {ours: _from_peft(f.get_tensor(original[key]),
                                           _EXPERT_LAYOUTS[ours] if key in experts else layout, experts.get(key, 1))
                          for ours, (key, layout) in per.items()}
                   for name, per in plan.items()}
        modules = dict(model.named_modules()) if model is not None else {}
        _refuse_peft_layers(peft_dir, conf, list(plan), modules)
        for name, per in tensors.items():  # PEFT's conv kernels (kernel dims after the first two) as the dense view
            if (kind_of(modules[name]) == "conv" if name in modules
                    else any(len(shapes[original[key]]) > 2 for key, _ in plan[name].values())):
                kinds[name] = "conv"
                tensors[name] = {ours: _from_conv_layout(t, plan[name][ours][0]) for ours, t in per.items()}
        shared = _read_shared(peft_dir, REGISTRY[cfg.variant].peft, model_level, f)
    fused = [n for n, k in kinds.items() if k == "fused"]
    if fused:  # parameters are named by target_parameters
        patterns = {n: f"^{re.escape(n)}$" for n in fused}
        cfg = dataclasses.replace(cfg, target_names=tuple(p for p in cfg.target_names if p not in patterns.values()),
                                  target_parameters=tuple(patterns.values()))
    if trainable:
        modules = dict.fromkeys(m for _, m in saved.values())
        cfg = dataclasses.replace(cfg, trainable_modules=tuple(f"^{re.escape(m)}$" for m in modules))
    return Adapter(config=cfg, tensors=tensors, trainable=trainable, fingerprints=None, kinds=kinds,
                   shared=shared, source=peft_dir)


def _saved_keys(conf: dict, shapes: dict) -> dict[str, tuple[str, str]]:
    """{parameter name: (saved key, module)} of the modules_to_save parameters in the file: keys
    under a module that is, or ends with '.', an entry of modules_to_save (PEFT's matching)."""
    entries = conf.get("modules_to_save") or []
    found = {}
    for key in shapes:
        pname = key.removeprefix(PREFIX)
        parts = pname.split(".")[:-1]
        module = next((".".join(parts[:i]) for i in range(1, len(parts) + 1)
                       if any(".".join(parts[:i]) == e or ".".join(parts[:i]).endswith("." + e) for e in entries)), None)
        if module is not None and ".lora_" not in f".{pname}" and ".ia3_" not in f".{pname}" and ".hra_" not in f".{pname}":
            found[pname] = (key, module)
    missing = [e for e in entries if not any(m == e or m.endswith("." + e) for _, m in found.values())]
    if missing:
        raise ValueError(f"PEFT option modules_to_save={entries!r}: the adapter file holds no parameters of "
                         f"{missing}; nothing was changed")
    return found


def _refuse_peft_layers(where: str, conf: dict, names: list[str], modules: dict[str, nn.Module]) -> None:
    """PEFT layers whose function lora-lite has no form for, found with the model: its LoRA on
    nn.MultiheadAttention and its conv LoRA on a grouped convolution."""
    for name in names:
        owner = modules.get(name.split(".base_layer")[0])
        if isinstance(owner, nn.MultiheadAttention):
            raise ValueError(
                f"{where}: {name}: PEFT's LoRA on nn.MultiheadAttention is not supported: lora-lite does not "
                f"adapt nn.MultiheadAttention (its forward reads in_proj_weight and out_proj.weight directly); "
                f"nothing was changed"
            )
        layer = modules.get(name)
        if conf.get("peft_type") == "LORA" and kind_of(layer) == "conv" and layer.groups > 1:
            raise ValueError(
                f"{where}: {name}: PEFT's LoRA on a grouped conv (groups={layer.groups}) runs lora_A over all "
                f"input channels, so its change crosses the layer's groups and has no form in lora-lite's "
                f"grouped conv LoRA; nothing was changed"
            )


def _read_shared(where: str, m: PeftMap, keys: list[str], f) -> dict[str, torch.Tensor]:
    """{our shared tensor: PEFT's model-level tensor} (`PeftMap.shared`); refuses a model-level
    key the map does not name, and a map's tensor that is missing."""
    names = {MODEL_LEVEL + theirs: ours for ours, theirs in m.shared}
    unknown = sorted(set(keys) - set(names))
    if unknown:
        raise ValueError(f"{where}: model-level tensors {unknown} are not part of a {m.method} adapter lora-lite reads")
    missing = sorted(set(names) - set(keys))
    if missing:
        raise ValueError(f"{where}: {missing} are missing: the adapter was saved without its shared tensors "
                         f"(PEFT's save_projection=False); save it again with save_projection=True")
    return {ours: f.get_tensor(key) for key, ours in names.items()}


def _from_conv_layout(t: torch.Tensor, key: str) -> torch.Tensor:
    """A PEFT conv-layer tensor saved under `key` in our dense-view layout (inverse of
    `_conv_layout`): DoRA's per-channel magnitude (1, C_out, 1, …) as (C_out,), a kernel
    (a, b, *kernel) as (a, b·kernel); IA3's gate arrives flat already (layout "col")."""
    if key.endswith("lora_magnitude_vector"):
        return t.reshape(-1)
    return t.flatten(1) if t.dim() > 2 else t


def _check_saved_bases(where: str, model: nn.Module, bases: dict[str, torch.Tensor]) -> None:
    for key, t in bases.items():
        name = key.removeprefix(PREFIX)[: -len(_BASE_KEY)]
        try:
            W = model.get_submodule(name).weight
        except AttributeError:
            W = None
        if W is None or not torch.equal(t, W.detach().cpu()):
            raise ValueError(
                f"{where}: {key} is a base weight that differs from this model's {name}.weight "
                f"(PEFT saves the base embedding with the adapter, save_embedding_layers=True, and "
                f"loads it over the base); load the base model the adapter was trained on"
            )


def _unnest_parameters(where: str, model: nn.Module | None, conf: dict, shapes: dict
                       ) -> dict[str, tuple[str, int]]:
    """{PEFT key of a `target_parameters` adapter (on nested ParamWrappers, `_peft_module`):
    (the key under the parameter's own name, number of experts)}."""
    wanted = conf.get("target_parameters") or []
    if not wanted:
        return {}
    if model is None:
        raise ValueError(f"{where}: a target_parameters adapter needs the model to read (read_peft(dir, model))")
    hits = [(n, owner, p) for n, owner, p in fused_parameters(model)
            if n in wanted or any(n.endswith("." + t) for t in wanted)]
    if not hits:
        raise ValueError(
            f"{where}: target_parameters={wanted} names no fused (3-D) parameter of this model; "
            f"load the base model the adapter was trained on"
        )
    kinds = {n: "fused" for n, _, _ in hits}
    where_is = {_peft_module(n, kinds): (n, owner.get_parameter(p).shape[0]) for n, owner, p in hits}
    alias = {}
    for key in shapes:
        module, _, leaf = key.removeprefix(PREFIX).rpartition(".lora_")
        if module in where_is:
            name, E = where_is[module]
            alias[key] = (f"{PREFIX}{name}.lora_{leaf}", E)
    return alias


def _read_peft_dir(peft_dir: str) -> tuple[dict, str]:
    conf_path, weights = os.path.join(peft_dir, CONFIG_NAME), os.path.join(peft_dir, WEIGHTS_NAME)
    if not os.path.isfile(conf_path):
        raise ValueError(f"{peft_dir}: no {CONFIG_NAME}; not a PEFT adapter directory")
    if not os.path.isfile(weights):
        other = " (adapter_model.bin is a pickle and is never read: re-save with safe_serialization=True)" \
            if os.path.isfile(os.path.join(peft_dir, "adapter_model.bin")) else ""
        raise ValueError(f"{peft_dir}: no {WEIGHTS_NAME}{other}")
    try:
        with open(conf_path) as fh:
            conf = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{conf_path}: not readable JSON ({e})") from None
    if not isinstance(conf, dict):
        raise ValueError(f"{conf_path}: expected a JSON object")
    try:
        with safe_open(weights, framework="pt") as f:
            list(f.keys())
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    return conf, weights


def importers(where: str, conf: dict, also: tuple[str, ...] = ()) -> list[str]:
    """The variants a PEFT config `conf` may import as (same method, `PeftMap.imports`), after
    refusing, naming it, every option they cannot reproduce (besides the keys in `also`)."""
    ptype = conf.get("peft_type")
    candidates = [n for n in peft_methods() if REGISTRY[n].peft.method == ptype and REGISTRY[n].peft.imports]
    if not candidates:
        importable = sorted({REGISTRY[n].peft.method for n in peft_methods() if REGISTRY[n].peft.imports})
        raise ValueError(f"{where}: PEFT method peft_type={ptype!r} has no lora-lite counterpart; importable: {importable}")
    reads = set().union(*(REGISTRY[n].peft.reads for n in candidates))
    for key, value in conf.items():
        if key in _INERT or key in reads or key in also:
            continue
        if value in (None, False, "none", "") or value == {} or value == []:
            continue
        why = _WHY.get(key, "an option lora-lite cannot reproduce exactly")
        raise ValueError(f"{where}: PEFT option {key}={value!r} is not supported: {why}; nothing was changed")
    return candidates


def _convert(where: str, conf: dict, shapes: dict, dtype: torch.dtype
             ) -> tuple[AdapterConfig, dict[str, dict[str, tuple[str, str | None]]]]:
    """PEFT config + saved tensor shapes -> (our config, {target: {our tensor: (PEFT key, layout)}}).
    Refuses, naming the option, whatever has no exact lora-lite equivalent."""
    ptype, candidates = conf.get("peft_type"), importers(where, conf)
    init = conf.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{where}: PEFT option init_lora_weights={init!r} is not supported: this init rewrites the base "
            f"weight, so the adapter only fits PEFT's residual base; re-save it in PEFT with "
            f"save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA"
        )

    keys = list(shapes)
    prefix = PREFIX if keys and all(k.startswith(PREFIX) for k in keys) else ""
    suffixes = {_file_key(path) for n in candidates for _, path, _ in REGISTRY[n].peft.tensors}
    per_target: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        rest = key[len(prefix):]
        suffix = next((s for s in sorted(suffixes, key=len, reverse=True) if rest.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        per_target.setdefault(rest[: -len(suffix) - 1], {})[suffix] = key
    if unknown:
        raise ValueError(
            f"{where}: tensors that are not {ptype} adapter tensors of linear, Conv1D, conv, embedding or "
            f"fused-parameter targets: {unknown[:5]} (saved modules are not supported)"
        )
    if not per_target:
        raise ValueError(f"{where}: no adapter tensors in {WEIGHTS_NAME}")

    choice: dict[str, tuple[str, dict]] = {}
    plan: dict[str, dict[str, tuple[str, str | None]]] = {}
    for name, found in per_target.items():
        for variant in candidates:
            m = REGISTRY[variant].peft
            slots = {_file_key(path): (ours, layout) for ours, path, layout in m.tensors}
            if not set(found) <= set(slots):
                continue
            missing = [s for s in slots if s not in found]
            if missing:
                raise ValueError(f"{where}: {name} lacks the PEFT tensor(s) {missing} of a {variant!r} adapter")
            fields = m.imports(conf, name, {slots[s][0]: shapes[k] for s, k in found.items()})
            if fields is not None:
                choice[name] = (variant, fields)
                plan[name] = {slots[s][0]: (k, slots[s][1]) for s, k in found.items()}
                break
        else:
            raise ValueError(f"{where}: {name}: tensors {sorted(found)} match no lora-lite variant's PEFT "
                             f"{ptype} layout (check use_dora)")
    distinct = {(v, tuple(sorted(f.items()))) for v, f in choice.values()}
    variants = {v for v, _ in choice.values()}
    if len(distinct) > 1 and len(variants) == 1 and REGISTRY[min(variants)].peft.combine is not None:
        # one variant placed differently per target (IA3's feed-forward targets): one config
        combined = REGISTRY[min(variants)].peft.combine({n: f for n, (_, f) in choice.items()})
        distinct = {(min(variants), tuple(sorted(combined.items())))}
    if len(distinct) > 1:
        raise ValueError(
            f"{where}: the targets map to different lora-lite configs {sorted(distinct)[:3]} (PEFT's "
            f"rank_pattern / alpha_pattern); a lora-lite adapter is one variant "
            f"with one config: save them as separate PEFT adapters, import one, ll.merge it, then the next"
        )
    variant, fields = next(iter(distinct))
    fields = dict(fields)
    common = dict(target_names=[f"^{re.escape(n)}$" for n in per_target], exclude_names=[],
                  dtype=str(dtype).removeprefix("torch."))
    try:
        cfg = AdapterConfig.from_dict({"variant": variant, **fields, **common})
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: the PEFT adapter maps to an invalid {variant!r} config: {e}") from None
    return cfg, plan


__all__ = ["peft_methods", "native_export", "peft_config", "peft_tensors", "copy_to_peft", "export_peft",
           "export_peft_file", "write_peft", "read_peft", "import_peft"]
