"""The map between lora-lite adapters and HF PEFT (0.21.x): parity, export and import.

Tensor layout. For the methods both libraries have, our tensors and PEFT's are the same numbers;
`LAYOUT` says where each of ours lives inside PEFT's layer (adapter name "default") and how it
is laid out there:

    lora / pissa / eva  lora_A.default.weight = A, lora_B.default.weight = B
    dora                + lora_magnitude_vector.default.weight = m
    delora              delora_A/B.default = A/B, delora_lambda.default = λ (1,), delora_w_norm.default = w
    hra                 hra_u.default = Uᵀ (d_in, r)
    ia3 / ia3_ff        ia3_l.default = g as (d_out, 1) / (1, d_in)
    road                road_theta.default, road_alpha.default (same layout)

A saved PEFT adapter (`adapter_model.safetensors`) keys them `base_model.model.<module>.<path>`
with ".default" dropped (and DoRA's magnitude as `lora_magnitude_vector`, no ".weight"), next to
`adapter_config.json`; see peft/utils/save_and_load.py.

Export (`export_peft`, `export_peft_file`): lora/eva/dora/delora/hra/ia3/ia3_ff/road as PEFT's
own method with the tensors copied; every other variant whose change is low-rank (W_eff − W =
B A, b unchanged: pissa at rank 2r, lora_xs and the AntiPaSTO family at rank r) as a plain PEFT
LoRA with r = lora_alpha = k, so PEFT's scale is exactly 1. Written from the adapter tensors
alone: no base model, and no `import peft`.

Import (`import_peft`): PEFT LoRA (+ DoRA, rsLoRA), DeLoRA, HRA, IA3 and RoAd adapters attach as
the matching variant through the runtime's `install`; every PEFT option that would change the
function without a lora-lite equivalent is refused, naming it, before the model is touched.

Parity helpers: `peft_config(cfg, targets)` builds the PEFT config of the same method (PiSSA as
PEFT's PiSSA, whose base layer holds the residual) and `copy_to_peft` writes our tensors into a
PEFT model. Only `peft_config` and `copy_to_peft`'s caller need peft installed.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..checkpoint import _DTYPE_CODES, CheckpointError, _parse_config, _parse_json, _read, _verify
from ..config import AdapterConfig
from ..runtime import ensure_free, install, state_of, validate, variant_of
from ..targets import named_linear_layers

PEFT_METHODS = ("lora", "pissa", "dora", "delora", "hra", "ia3", "ia3_ff", "road", "eva")
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# variant -> ((our tensor, its path in PEFT's layer, our layout -> PEFT's), ...); a layout of
# None is the same shape, "T" a transpose, "col"/"row" a (d, 1) / (1, d) view, "1" shape (1,).
_LORA = (("lora_A", "lora_A.default.weight", None), ("lora_B", "lora_B.default.weight", None))
LAYOUT = {
    "lora": _LORA,
    "eva": _LORA,
    "pissa": _LORA,  # PEFT's PiSSA: its base layer holds W − s·B0 A0 (parity only, not export)
    "dora": _LORA + (("lora_m", "lora_magnitude_vector.default.weight", None),),
    "delora": (
        ("lora_A", "delora_A.default", None),
        ("lora_B", "delora_B.default", None),
        ("lora_lambda", "delora_lambda.default", "1"),
        ("lora_wnorm", "delora_w_norm.default", None),
    ),
    "hra": (("lora_U", "hra_u.default", "T"),),
    "ia3": (("lora_g", "ia3_l.default", "col"),),
    "ia3_ff": (("lora_g", "ia3_l.default", "row"),),
    "road": (("lora_road_theta", "road_theta.default", None), ("lora_road_alpha", "road_alpha.default", None)),
}
# Exported as PEFT's own method (tensors copied 1:1); the other variants go through low_rank_delta.
NATIVE_EXPORT = ("lora", "eva", "dora", "delora", "hra", "ia3", "ia3_ff", "road")


def _to_peft(t: torch.Tensor, layout: str | None) -> torch.Tensor:
    if layout is None:
        return t
    if layout == "T":
        return t.T
    return t.reshape({"col": (-1, 1), "row": (1, -1), "1": (1,)}[layout])


def _from_peft(t: torch.Tensor, layout: str | None, shape: tuple[int, ...]) -> torch.Tensor:
    return t.T if layout == "T" else t.reshape(shape)


def _file_key(path: str) -> str:
    """PEFT's saved key for an in-layer path: the adapter name dropped (DoRA's magnitude, a
    module in the layer, is saved without '.weight')."""
    key = path.replace(".default", "")
    return "lora_magnitude_vector" if key == "lora_magnitude_vector.weight" else key


# ---- parity: our adapter in a live PEFT model ---------------------------------------------------

def _method_fields(cfg: AdapterConfig, targets: list[str]) -> dict:
    """PEFT config fields of the same method, rank and scale on the given module names."""
    v = cfg.variant
    if v in ("lora", "pissa", "dora", "eva"):
        # EVA's data-driven init is not replayed: its A is in the tensors.
        return dict(
            peft_type="LORA", r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=targets,
            bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=v == "dora",
            init_lora_weights="pissa" if v == "pissa" else True,
        )
    if v == "delora":
        return dict(peft_type="DELORA", r=cfg.r, delora_lambda=cfg.lambda0, module_dropout=0.0,
                    target_modules=targets, bias="none", init_weights=True)
    if v == "hra":
        return dict(peft_type="HRA", r=cfg.r, apply_GS=False, target_modules=targets, bias="none",
                    init_weights=True)
    if v in ("ia3", "ia3_ff"):
        return dict(peft_type="IA3", target_modules=targets, fan_in_fan_out=False,
                    feedforward_modules=targets if v == "ia3_ff" else [], init_ia3_weights=True)
    if v == "road":
        return dict(peft_type="ROAD", variant=cfg.road_variant, group_size=cfg.group_size,
                    target_modules=targets, init_weights=True)
    raise KeyError(f"variant {v!r} has no HF PEFT counterpart; methods with one: {PEFT_METHODS}")


def peft_config(cfg: AdapterConfig, targets: list[str]):
    """The PEFT config object of the same method, rank and scale on the given module names."""
    import peft

    fields = _method_fields(cfg, targets)
    cls = {"LORA": peft.LoraConfig, "DELORA": peft.DeloraConfig, "HRA": peft.HRAConfig,
           "IA3": peft.IA3Config, "ROAD": peft.RoadConfig}[fields.pop("peft_type")]
    return cls(**fields)


def peft_tensors(layer, cfg: AdapterConfig) -> dict[str, torch.Tensor]:
    """Our adapter tensors of `layer` under PEFT's in-layer paths and layout."""
    if cfg.variant not in LAYOUT:
        raise KeyError(f"variant {cfg.variant!r} has no HF PEFT counterpart; methods with one: {PEFT_METHODS}")
    return {path: _to_peft(getattr(layer, ours), layout) for ours, path, layout in LAYOUT[cfg.variant]}


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


# ---- export -------------------------------------------------------------------------------------

def export_peft(model: nn.Module | str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """Write the adapter attached to `model` (or saved in the lora-lite file `model`) as a PEFT
    adapter directory that `peft.PeftModel.from_pretrained(pristine_base, out_dir)` loads and
    that computes the same outputs. Returns the PEFT config written."""
    if isinstance(model, (str, os.PathLike)):
        return export_peft_file(model, out_dir)
    state = state_of(model)
    if not state.enabled or state.scale != 1.0:
        raise RuntimeError(
            "export_peft inside ll.disabled / ll.scaled: the exported adapter is the trained one at "
            "strength 1; call it outside the context (or ll.merge to bake in a strength)"
        )
    if state.originals:
        raise ValueError(
            f"export_peft: the adapter also trains base modules ({', '.join(list(state.originals)[:3])}, "
            f"trainable_modules), which this PEFT export does not carry; ll.merge them, or save "
            f"with ll.save"
        )
    return _write_peft(out_dir, state.cfg, state.targets)


def export_peft_file(path: str | os.PathLike, out_dir: str | os.PathLike) -> dict:
    """`export_peft` from a lora-lite checkpoint file alone (no base model)."""
    path = os.fspath(path)
    meta, stored = _read(path)
    _verify(path, meta, stored)
    cfg = _parse_config(path, meta)
    names = _parse_json(path, meta, "targets", list)
    tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for key, t in stored.items():
        name, _, pname = key.rpartition(".")
        if name not in tensors:
            raise CheckpointError(
                f"{path}: tensor {key!r} belongs to no target (trained base modules, "
                f"`trainable_modules`, have no PEFT adapter form here)"
            )
        tensors[name][pname] = t
    layers = {n: SimpleNamespace(**t) for n, t in tensors.items()}
    return _write_peft(out_dir, cfg, layers)


@torch.no_grad()
def _write_peft(out_dir, cfg: AdapterConfig, layers: dict) -> dict:
    names = list(layers)
    if cfg.variant in NATIVE_EXPORT:
        fields = _method_fields(cfg, names)
        tensors = {
            f"{PREFIX}{name}.{_file_key(path)}": t
            for name, layer in layers.items()
            for path, t in peft_tensors(layer, cfg).items()
        }
    else:
        fields, tensors = _low_rank_lora(cfg, layers)
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
    fields = {**fields, "inference_mode": True, "modules_to_save": None, "task_type": None,
              "base_model_name_or_path": None, "revision": None}
    os.makedirs(out_dir, exist_ok=True)
    _atomic(os.path.join(out_dir, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic(os.path.join(out_dir, CONFIG_NAME), lambda tmp: _write_json(tmp, fields))
    return fields


def _low_rank_lora(cfg: AdapterConfig, layers: dict) -> tuple[dict, dict]:
    """A plain PEFT LoRA with B A = W_eff − W at every target; r = lora_alpha = k (scale 1)."""
    variant = variant_of(cfg)
    factors = {name: variant.low_rank_delta(layer, cfg) for name, layer in layers.items()}
    if any(f is None for f in factors.values()):
        raise ValueError(
            f"variant {cfg.variant!r} cannot be exported to PEFT: its change is not a low-rank "
            f"W_eff − W with an unchanged bias and PEFT has no same-method counterpart "
            f"(PEFT methods we map: {NATIVE_EXPORT}); merge it with ll.merge instead"
        )
    ranks = {B.shape[1] for B, _ in factors.values()}
    if len(ranks) != 1:
        raise ValueError(f"{cfg.variant!r}: targets have different ranks {sorted(ranks)}; PEFT's LoRA has one r")
    k = ranks.pop()
    tensors = {}
    for name, (B, A) in factors.items():  # fp32, as low_rank_delta computes them
        tensors[f"{PREFIX}{name}.lora_A.weight"] = A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = B
    fields = dict(
        peft_type="LORA", r=k, lora_alpha=k, lora_dropout=0.0, target_modules=list(layers),
        bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False, init_lora_weights=True,
    )
    return fields, tensors


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _atomic(path: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# ---- import -------------------------------------------------------------------------------------

# PEFT tensors per method: the in-layer key suffixes its saved file uses.
_PEFT_KEYS = {
    "LORA": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "DELORA": ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"),
    "HRA": ("hra_u",),
    "IA3": ("ia3_l",),
    "ROAD": ("road_theta", "road_alpha"),
}
# Config fields that do not change what a loaded adapter computes: bookkeeping, targeting (the
# saved keys say which modules are adapted), dropout (inert at inference), init-only settings
# (the saved tensors replace the init; inits that rewrite the base are refused separately).
_INERT = {
    "peft_type", "peft_version", "auto_mapping", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern",
    "lora_dropout", "module_dropout", "init_weights", "init_ia3_weights", "eva_config", "corda_config",
    "loftq_config", "lora_ga_config", "megatron_core", "qalora_group_size", "ensure_weight_tying",
    "runtime_config", "lambda_pattern", "feedforward_modules",
}
# Fields read by the conversion below.
_READ = {"r", "lora_alpha", "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "init_lora_weights",
         "variant", "group_size", "delora_lambda"}
# Inits that leave the base weight alone; PiSSA/CorDA/OLoRA/LoftQ/LoRA-GA write a residual base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")
_WHY = {
    "modules_to_save": "PEFT trains full copies of these modules; a lora-lite adapter holds adapter tensors only",
    "bias": "PEFT trains the base layers' biases, which lora-lite never changes",
    "lora_bias": "PEFT adds a trainable bias to lora_B, which no lora-lite variant has",
    "fan_in_fan_out": "the base stores W transposed (GPT-2 Conv1D); lora-lite targets nn.Linear-like layers",
    "target_parameters": "PEFT adapts bare nn.Parameters (e.g. MoE experts), not linear layers",
    "layer_replication": "PEFT duplicates base layers, which changes the model itself",
    "trainable_token_indices": "PEFT trains embedding rows, not a linear layer",
    "apply_GS": "Gram-Schmidt orthogonalised reflections are a different parametrisation than lora-lite's HRA",
    "use_qalora": "QA-LoRA pools the input in groups before lora_A",
    "megatron_config": "Megatron parallel layers are not nn.Linear-like",
}


def import_peft(model: nn.Module, peft_dir: str | os.PathLike) -> AdapterConfig:
    """Attach the PEFT adapter saved in `peft_dir` (adapter_config.json + adapter_model.safetensors)
    to a pristine `model` as the matching lora-lite variant; returns its config. Everything is
    checked before the model is touched; the tensors go in through the runtime's install, as in
    `ll.load`."""
    peft_dir = os.fspath(peft_dir)
    ensure_free(model)
    conf, shapes = _read_peft_dir(peft_dir)
    cfg, plan = _convert(peft_dir, conf, shapes)
    variant = variant_of(cfg)
    targets, absent = named_linear_layers(model, list(plan))  # model order, as attach finds them
    if absent:
        raise ValueError(
            f"{peft_dir}: {len(absent)} adapted module(s) are not linear layers of this model, e.g. "
            f"{absent[:3]}; load the base with the same class PEFT wrapped (e.g. AutoModelForCausalLM)"
        )
    validate(model, variant, cfg, targets)
    for name, layer in targets:
        specs = variant.param_specs(layer.in_features, layer.out_features, cfg)
        for pname, spec in specs.items():
            key, layout = plan[name][pname]
            peft_shape = tuple(shapes[key][0])
            if layout == "T":
                ok = peft_shape == tuple(reversed(spec.shape))
            else:  # the same numbers, a reshape apart ((d, 1) gates, DeLoRA's λ of shape (1,))
                ok = math.prod(peft_shape) == math.prod(spec.shape)
            if not ok:
                raise ValueError(f"{peft_dir}: {key} has shape {peft_shape}; {name} needs {pname} of shape {spec.shape}")

    with safe_open(os.path.join(peft_dir, WEIGHTS_NAME), framework="pt") as f:

        def fill(name, layer, specs):
            for pname, spec in specs.items():
                key, layout = plan[name][pname]
                getattr(layer, pname).copy_(_from_peft(f.get_tensor(key), layout, spec.shape))

        install(model, cfg, variant, targets, fill)
    return cfg


def _read_peft_dir(peft_dir: str) -> tuple[dict, dict[str, tuple[tuple[int, ...], torch.dtype | None]]]:
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
            shapes = {k: (tuple(f.get_slice(k).get_shape()), _DTYPE_CODES.get(f.get_slice(k).get_dtype()))
                      for k in f.keys()}
    except Exception as e:  # safetensors' own error types
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    return conf, shapes


def _convert(where: str, conf: dict, shapes: dict) -> tuple[AdapterConfig, dict[str, dict[str, tuple[str, str | None]]]]:
    """PEFT config + saved tensor shapes -> (our config, {target: {our tensor: (PEFT key, layout)}}).
    Refuses, naming the option, whatever has no exact lora-lite equivalent."""
    ptype = conf.get("peft_type")
    if ptype not in _PEFT_KEYS:
        raise ValueError(
            f"{where}: PEFT method peft_type={ptype!r} has no lora-lite counterpart; importable: "
            f"{sorted(_PEFT_KEYS)} (LoRA incl. DoRA and rsLoRA, DeLoRA, HRA, IA3, RoAd)"
        )
    for key, value in conf.items():
        if key in _INERT or key in _READ or value in (None, False, "none", "") or value == {} or value == []:
            continue
        why = _WHY.get(key, "an option lora-lite cannot reproduce exactly")
        raise ValueError(f"{where}: PEFT option {key}={value!r} is not supported: {why}; nothing was changed")
    init = conf.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{where}: PEFT option init_lora_weights={init!r} is not supported: this init rewrites the base "
            f"weight, so the adapter only fits PEFT's residual base; re-save it in PEFT with "
            f"save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain LoRA"
        )

    keys = list(shapes)
    prefix = PREFIX if keys and all(k.startswith(PREFIX) for k in keys) else ""
    suffixes = _PEFT_KEYS[ptype]
    per_target: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        rest = key[len(prefix):]
        suffix = next((s for s in suffixes if rest.endswith("." + s)), None)
        if suffix is None:
            unknown.append(key)
            continue
        per_target.setdefault(rest[: -len(suffix) - 1], {})[suffix] = key
    if unknown:
        raise ValueError(
            f"{where}: tensors that are not {ptype} adapter tensors of linear layers: {unknown[:5]} "
            f"(embedding/conv adapters or saved modules are not supported)"
        )
    if not per_target:
        raise ValueError(f"{where}: no adapter tensors in {WEIGHTS_NAME}")
    dtypes = {dt for _, dt in shapes.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 and None not in dtypes else torch.float32
    common = dict(target_names=tuple(f"^{re.escape(n)}$" for n in per_target), exclude_names=(), dtype=dtype)

    def rank(suffix, dim):
        ranks = {shapes[t[suffix]][0][dim] for t in per_target.values() if suffix in t}
        if len(ranks) > 1:
            raise ValueError(f"{where}: PEFT option rank_pattern gives ranks {sorted(ranks)}; "
                             f"a lora-lite adapter has one r")
        return ranks.pop()

    if ptype == "LORA":
        variant = "dora" if conf.get("use_dora") else "lora"
        r = rank("lora_A.weight", 0)
        alpha = _lora_alpha(where, conf, list(per_target), r)
        cfg = _config(where, variant, r=r, alpha=alpha, **common)
    elif ptype == "DELORA":
        cfg = _config(where, "delora", r=rank("delora_A", 0), lambda0=float(conf.get("delora_lambda", 15.0)), **common)
        variant = "delora"
    elif ptype == "HRA":
        cfg = _config(where, "hra", r=rank("hra_u", 1), **common)
        variant = "hra"
    elif ptype == "IA3":
        kinds = {"ia3" if shapes[t["ia3_l"]][0][1] == 1 else "ia3_ff" for t in per_target.values()}
        if len(kinds) > 1:
            raise ValueError(
                f"{where}: PEFT option feedforward_modules covers some targets but not all; a lora-lite "
                f"adapter is one variant (ia3 gates outputs, ia3_ff gates inputs): save them as two PEFT "
                f"adapters, import one, ll.merge it, then import the other"
            )
        variant = kinds.pop()
        cfg = _config(where, variant, **common)
    else:
        variant = "road"
        cfg = _config(where, "road", road_variant=conf.get("variant", "road_1"),
                      group_size=int(conf.get("group_size", 64)), **common)

    inverse = {path: (ours, layout) for ours, path, layout in LAYOUT[variant]}
    plan: dict[str, dict[str, tuple[str, str | None]]] = {}
    for name, found in per_target.items():
        plan[name] = {}
        for suffix, key in found.items():
            path = next((p for p in inverse if _file_key(p) == suffix), None)
            if path is None:  # e.g. a DoRA magnitude while use_dora is false
                raise ValueError(f"{where}: {key} is not a tensor of a {variant!r} adapter; check use_dora")
            ours, layout = inverse[path]
            plan[name][ours] = (key, layout)
        missing = [_file_key(path) for ours, path, _ in LAYOUT[variant] if ours not in plan[name]]
        if missing:
            raise ValueError(f"{where}: {name} lacks the PEFT tensor(s) {missing} of a {variant!r} adapter")
    return cfg, plan


def _lora_alpha(where: str, conf: dict, names: list[str], r: int) -> float:
    """Our alpha (scale = alpha / r) from PEFT's lora_alpha, alpha_pattern / rank_pattern and
    use_rslora (scale lora_alpha / √r, so alpha = lora_alpha·√r)."""
    rank_pattern, alpha_pattern = conf.get("rank_pattern") or {}, conf.get("alpha_pattern") or {}
    pairs = set()
    for name in names:
        pairs.add((_pattern_value(rank_pattern, name, conf.get("r", 8)),
                   _pattern_value(alpha_pattern, name, conf.get("lora_alpha", 8))))
    if len(pairs) > 1:
        raise ValueError(
            f"{where}: PEFT options rank_pattern/alpha_pattern give the targets different (r, lora_alpha) "
            f"{sorted(pairs)}; a lora-lite adapter has one r and one alpha"
        )
    r_conf, alpha = pairs.pop()
    if r_conf != r:
        raise ValueError(f"{where}: adapter_config.json says r={r_conf} but the saved lora_A has rank {r}")
    return float(alpha) * math.sqrt(r) if conf.get("use_rslora") else float(alpha)


def _pattern_value(pattern: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _config(where: str, variant: str, **fields) -> AdapterConfig:
    d = {"variant": variant, **{k: (v if not isinstance(v, torch.dtype) else str(v).removeprefix("torch."))
                                for k, v in fields.items()}}
    try:
        return AdapterConfig.from_dict(d)
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"{where}: the PEFT adapter maps to an invalid {variant!r} config: {e}") from None


__all__ = ["PEFT_METHODS", "LAYOUT", "peft_config", "peft_tensors", "copy_to_peft", "export_peft",
           "export_peft_file", "import_peft"]
