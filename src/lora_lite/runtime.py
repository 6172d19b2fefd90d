"""attach / detach: the whole runtime.

attach = validate -> calibrate -> create tensors -> init -> mutate W -> freeze -> hooks.
Everything that can reject the call runs before the first mutation; if anything still fails,
the model is rolled back. Adapter tensors live on the target layers as `lora_*` parameters or
buffers, so the model's class, forward and state_dict keys stay what they were. The attach
state (config, targets, hook handles, the requires_grad flags attach changed) is kept on the
model as `model._lora_lite`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import collect_stats
from .config import AdapterConfig
from .fingerprint import fingerprint
from .targets import find_targets
from .variant import REGISTRY, ParamSpec, Variant, init_tensor

STATE_ATTR = "_lora_lite"
PREFIX = "lora_"


@dataclass
class AttachState:
    cfg: AdapterConfig
    variant: type[Variant]
    targets: dict[str, nn.Module]                # name -> layer, in model order
    specs: dict[str, dict[str, ParamSpec]]      # name -> tensor specs
    requires_grad: dict[str, bool]              # base parameter -> flag before attach
    fingerprints: dict[str, dict] = field(default_factory=dict)  # base sketches at attach/load
    handles: list = field(default_factory=list)


def attach(
    model: nn.Module,
    cfg: AdapterConfig,
    calibration_data: Iterable | None = None,
    *,
    progress: bool = True,
) -> None:
    """Attach the adapter `cfg` describes to `model` in place.

    calibration_data: iterable of batches (dict -> model(**b), tuple -> model(*b), tensor ->
    model(b)) for variants that read input statistics; `attention_mask` in dict batches drops
    padding. `progress` shows a progress bar over calibration batches (needs tqdm).
    """
    variant = variant_of(cfg)
    ensure_free(model)
    targets = find_targets(model, cfg)
    validate(model, variant, cfg, targets)
    kind, required = variant.calibration_needs(cfg)
    if calibration_data is not None and kind is None:
        which = "" if variant.calibration is None else f" with this {type(cfg).__name__}"
        raise ValueError(
            f"variant {cfg.variant!r} does not use calibration data{which}; call attach without it"
        )
    if calibration_data is None and required:
        raise ValueError(
            f"variant {cfg.variant!r} ({type(cfg).__name__}) needs calibration_data: pass an iterable of batches "
            f"(dicts with input_ids/attention_mask, tuples or tensors) to attach()"
        )
    stats = None
    if calibration_data is not None:
        stats = collect_stats(
            model, targets, kind, calibration_data, min_tokens=cfg.r, progress=progress
        )

    def fill(name: str, layer: nn.Module, specs: dict[str, ParamSpec]) -> None:
        for pname, spec in specs.items():
            init_tensor(getattr(layer, pname), spec.init)
        variant.init(layer, cfg, None if stats is None else stats[name])

    install(model, cfg, variant, targets, fill)


def detach(model: nn.Module) -> None:
    """Remove the adapter: hooks, `lora_*` tensors, W restored (W_res + Δ0), grad flags back."""
    state = state_of(model)
    for h in state.handles:
        h.remove()
    if state.variant.base_delta is not None:
        for layer in state.targets.values():
            shift_weight(layer, state.variant, state.cfg, +1)
    for name, layer in state.targets.items():
        for pname in state.specs[name]:
            _delete(layer, pname)
    _restore_flags(model, state.requires_grad)
    delattr(model, STATE_ATTR)


def reconfigure(model: nn.Module, **changes) -> AdapterConfig:
    """Change config fields of an attached adapter in place, e.g. a steering coefficient:
    `reconfigure(model, coeff=-1.0)`. Only the variant's `runtime_fields` may change; the
    next forward uses the new values, and save() records them. Returns the new config."""
    state = state_of(model)
    frozen = set(changes) - set(state.variant.runtime_fields)
    if frozen:
        raise ValueError(
            f"{sorted(frozen)} cannot change while attached to a {state.cfg.variant!r} adapter "
            f"(changeable: {list(state.variant.runtime_fields) or 'none'}); detach and attach again"
        )
    state.cfg = dataclasses.replace(state.cfg, **changes)  # validates like a new config
    return state.cfg


def variant_of(cfg: AdapterConfig) -> type[Variant]:
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"expected an AdapterConfig (e.g. LoRAConfig), got {type(cfg).__name__}")
    if cfg.variant not in REGISTRY:
        raise KeyError(f"unknown variant {cfg.variant!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[cfg.variant]


def state_of(model: nn.Module) -> AttachState:
    state = model.__dict__.get(STATE_ATTR)
    if state is None:
        raise RuntimeError("no lora-lite adapter is attached to this model; call attach() or load()")
    return state


def ensure_free(model: nn.Module) -> None:
    if STATE_ATTR in model.__dict__:
        raise RuntimeError(
            f"this model already has a lora-lite adapter ({model.__dict__[STATE_ATTR].cfg.variant!r}); "
            f"call lora_lite.detach(model) first"
        )


def validate(
    model: nn.Module, variant: type[Variant], cfg: AdapterConfig, targets: list[tuple[str, nn.Module]]
) -> None:
    """Every check that can reject an attach/load; runs before anything is mutated."""
    ensure_free(model)
    for name, layer in targets:
        leftover = [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(PREFIX)]
        leftover += [n for n, _ in layer.named_buffers(recurse=False) if n.startswith(PREFIX)]
        if leftover:
            raise RuntimeError(f"{name} already holds adapter tensors {leftover}; use a pristine model")
        if variant.needs_dense_weight and not isinstance(layer, nn.Linear):
            raise TypeError(
                f"{name}: variant {cfg.variant!r} reads or rewrites the dense weight and needs "
                f"torch.nn.Linear, got {type(layer).__name__}; hook-only variants "
                f"(lora, ia3, ia3_ff, hra, road) work on quantised layers"
            )
        if variant.uses_rank and cfg.r > min(layer.in_features, layer.out_features):
            raise ValueError(
                f"{name}: r={cfg.r} exceeds min(d_in, d_out)=min({layer.in_features}, "
                f"{layer.out_features}); use a smaller r or exclude this layer"
            )
        try:
            variant.validate(layer, cfg)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None


def install(
    model: nn.Module,
    cfg: AdapterConfig,
    variant: type[Variant],
    targets: list[tuple[str, nn.Module]],
    fill: Callable[[str, nn.Module, dict[str, ParamSpec]], None],
    fingerprints: dict[str, dict] | None = None,
) -> None:
    """Create tensors, fill them, mutate W, freeze the base, add hooks; roll back on any error."""
    state = AttachState(
        cfg=cfg,
        variant=variant,
        targets=dict(targets),
        specs={n: variant.param_specs(m.in_features, m.out_features, cfg) for n, m in targets},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
    )
    # The base as it is now (pristine by contract); save() writes it, load() compares with it.
    state.fingerprints = fingerprints or {n: fingerprint(m) for n, m in targets}
    mutating = variant.base_delta is not None
    created: list[tuple[nn.Module, str]] = []
    shifted: list[nn.Module] = []
    try:
        for name, layer in targets:
            for pname, spec in state.specs[name].items():
                _create(layer, pname, spec, cfg.dtype)
                created.append((layer, pname))
            with torch.no_grad():
                fill(name, layer, state.specs[name])
        if mutating:
            for layer in state.targets.values():
                shift_weight(layer, variant, cfg, -1)
                shifted.append(layer)
        for p in model.parameters():
            p.requires_grad_(False)
        for name, layer in targets:
            for pname, spec in state.specs[name].items():
                if spec.trainable:
                    getattr(layer, pname).requires_grad_(True)
        for layer in state.targets.values():
            state.handles.append(_hook(layer, variant, state))
        setattr(model, STATE_ATTR, state)
    except BaseException:
        for h in state.handles:
            h.remove()
        for layer in shifted:
            shift_weight(layer, variant, cfg, +1)
        for layer, pname in created:
            _delete(layer, pname)
        _restore_flags(model, state.requires_grad)
        raise


@torch.no_grad()
def shift_weight(layer: nn.Module, variant: type[Variant], cfg: AdapterConfig, sign: int) -> None:
    """W <- W + sign * Δ0, in fp32, rounded once to W's dtype."""
    W = layer.weight
    delta = variant.base_delta(layer, cfg).to(device=W.device, dtype=torch.float32)
    W.copy_((W.float() + sign * delta).to(W.dtype))


def _hook(layer: nn.Module, variant: type[Variant], state: AttachState):
    dtype = state.cfg.dtype
    if variant.forward_input is not None:
        fwd_in = variant.forward_input

        def pre_hook(module, args):
            x = args[0]
            if x.dtype == dtype:
                return (fwd_in(module, state.cfg, x),) + args[1:]
            # Only the adapter's change x' - x goes through the adapter dtype, so a
            # lower-precision adapter never rounds the base layer's input itself.
            x_a = x.to(dtype)
            return (x + (fwd_in(module, state.cfg, x_a) - x_a).to(x.dtype),) + args[1:]

        return layer.register_forward_pre_hook(pre_hook)
    fwd = variant.forward

    def out_hook(module, args, y):
        x = args[0]
        return fwd(module, state.cfg, x if x.dtype == dtype else x.to(dtype), y)

    return layer.register_forward_hook(out_hook)


def _create(layer: nn.Module, pname: str, spec: ParamSpec, dtype: torch.dtype) -> None:
    if not pname.startswith(PREFIX):
        raise ValueError(f"adapter tensor names must start with {PREFIX!r}, got {pname!r}")
    if hasattr(layer, pname):
        raise RuntimeError(f"{type(layer).__name__} already has an attribute {pname!r}")
    t = torch.empty(spec.shape, dtype=dtype, device=layer.weight.device)
    if spec.is_buffer:
        layer.register_buffer(pname, t, persistent=True)
    else:
        layer.register_parameter(pname, nn.Parameter(t, requires_grad=False))


def _delete(layer: nn.Module, pname: str) -> None:
    layer._parameters.pop(pname, None)
    layer._buffers.pop(pname, None)
    layer._non_persistent_buffers_set.discard(pname)


def _restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
