"""attach / detach: the whole runtime.

attach = validate -> advise -> calibrate -> create tensors -> init -> freeze -> hooks.
Everything that can reject the call runs before the first change; if anything still fails,
the model is rolled back. Adapter tensors live on the target layers as `lora_*` parameters or
buffers, so the model's class, forward and base state_dict entries stay what they were: no
variant writes a base weight (only `merge` does, on request). The attach state (config,
targets, the requires_grad flags attach changed, the `scale` and `enabled` knobs of
`ll.scaled` / `ll.disabled`) is kept on the model as `model._lora_lite`, and each target's hook
is an object holding that same state: `copy.deepcopy(model)` or `torch.save(model)` copies the
state and the hooks together, so the copy is an independent attached model.

Hooks: an output hook returns y + scale·Δy, a pre-hook hands the layer x + scale·Δx, with Δ
from the variant's `delta` / `delta_input` (a gate variant, Δ = t ⊙ (g − 1), declares `gate`
and gets the same change as one product, t ⊙ (1 + scale·(g − 1)): `gated`). `scale` (and a
variant's run-time `coeff`) is a float or a coefficient tensor of shape (batch,) or (batch,
seq), one value per example or per token, broadcast over the other dimensions (`per_row`); the
float and the tensor path do the same arithmetic, so a row of a tensor-scaled batch is the
row the float gives, bit for bit (for values exact in the activation's dtype). With
cfg.compute == "input" (default, AMP-style) the variant computes Δ in the activation's dtype,
casting its small tensors; with "adapter" the activation is cast to the adapter tensors' dtype
first and Δ back.

Several adapters (amendment 8; docs/several-adapters.md). `attach(..., name=)` adds a named
adapter (a Python identifier not attached yet; DEFAULT is the one-adapter API, its state at
`model._lora_lite`, the others' at `model._lora_lite_named[name]`). A named adapter's tensors
are registered as `lora_X_<name>`; its variant code, and save/merge/describe, read them as
`lora_X` through a `view` of the layer (a subclass of the layer's class whose `lora_*`
attributes resolve to that adapter's). A layer with one adapter holds that adapter's hook; a
layer several output hooks share holds one `SharedHook`: y_base + Σ_k c_k·Δ_k, each Δ_k from the
layer's input and y_base (a gate's as y_base ⊙ (g_k − 1)). An input pre-hook variant or a fused
parameter shares no layer (validate refuses). attach freezes every other parameter, earlier
adapters included; detach gives the remaining adapters their flags back and, with the last
adapter, the base its flags from before the first attach. A function given no name acts on the
only adapter (`state_of`) and raises, naming them, when there are several.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from .calibration import collect_stats
from .config import AdapterConfig, coefficient
from .fingerprint import fingerprint
from .kinds import DESCRIBED, FusedParameter, dims, kind_of, label, per_channel
from .quant import weight_storage
from .targets import find_targets
from .variant import REGISTRY, ParamSpec, Variant, init_tensor, like, per_row

STATE_ATTR = "_lora_lite"
TENSOR_PREFIX = "lora_"  # every adapter tensor name starts with it
DEFAULT = "default"        # the adapter of the one-adapter API: state at STATE_ATTR, tensors lora_X
NAMED_ATTR = "_lora_lite_named"  # {name: AttachState} of the adapters attached under another name


@dataclass
class AttachState:
    cfg: AdapterConfig
    variant: type[Variant]
    targets: dict[str, nn.Module]                # name -> layer, in model order
    specs: dict[str, dict[str, ParamSpec]]      # name -> tensor specs
    requires_grad: dict[str, bool]              # base parameter -> flag before attach
    shared: dict[str, nn.Parameter] = field(default_factory=dict)  # ParamSpec shared=True: one each
    originals: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable base params at attach
    fingerprints: dict[str, dict] = field(default_factory=dict)  # base sketches at attach/load
    scale: float | torch.Tensor = 1.0           # ll.scaled: y + scale·Δy at every target
    enabled: bool = True                        # ll.disabled: False skips every hook
    per_row: tuple[torch.Tensor, ...] = ()      # the coefficient tensors in effect (scale, coeff)
    name: str = DEFAULT                         # tensors registered as lora_X_<name> unless DEFAULT

    def set_coefficients(self, scale: float | torch.Tensor, cfg: AdapterConfig) -> None:
        """Set the strength and the config together, with the tensors the hooks match against
        each activation's leading dimensions."""
        self.scale, self.cfg = scale, cfg
        values = (scale, *(getattr(cfg, f) for f in self.variant.runtime_fields))
        self.per_row = tuple(v for v in values if isinstance(v, torch.Tensor))

    def refuse_per_row(self, what: str) -> None:
        """Raise for an operation that needs one strength for the whole model (merge; save and
        export refuse a coefficient tensor in the config through `to_dict`)."""
        for name, value in (("ll.scaled", self.scale),
                            *((f"{f}", getattr(self.cfg, f)) for f in self.variant.runtime_fields)):
            if isinstance(value, torch.Tensor):
                raise RuntimeError(
                    f"{what}: {name} is a coefficient tensor of shape {tuple(value.shape)}, one value per "
                    f"example or token, while {what} needs one value for every input; "
                    + ("leave the ll.scaled block first" if name == "ll.scaled" else
                       f"set a float first (lora_lite.reconfigure(model, {name}=1.0))")
                )

    @property
    def device(self) -> torch.device:
        """Where the adapter tensors are (those of the first target)."""
        name, layer = next(iter(self.targets.items()))
        return getattr(layer, next(iter(self.specs[name]))).device

    def check_coefficient(self, c: float | torch.Tensor, what: str) -> None:
        """`config.coefficient` on the adapter's device, and one value throughout where a target
        is a fused parameter (its forward adds c·B A to the one weight all rows share)."""
        coefficient(c, what, self.device)
        if not isinstance(c, torch.Tensor):
            return
        fused = [n for n, m in self.targets.items() if isinstance(m, FusedParameter)]
        if fused and not bool((c == c.reshape(-1)[0]).all()):
            raise ValueError(
                f"{what}: {fused[0]} is a fused parameter (kinds.py): its forward runs on W + c·B A, one "
                f"weight for every row of the batch, so its coefficient must be one value; this tensor's "
                f"entries differ (min {float(c.min()):g}, max {float(c.max()):g}). Use a float, or run the "
                f"rows that need different coefficients in separate forwards"
            )


def attach(
    model: nn.Module,
    cfg: AdapterConfig,
    calibration_data: Iterable | None = None,
    *,
    progress: bool = True,
    name: str = DEFAULT,
) -> None:
    """Attach the adapter `cfg` describes to `model` in place (returns None; no wrapper), as
    adapter `name` (an identifier not yet attached; several adapters compose as
    y_base + Σ_k c_k·Δ_k, see docs/several-adapters.md).

    What it does to the model:
      * finds the targets (`cfg.target_names`, `target_roles`, `target_parameters`,
        `exclude_names`, `layers`) and registers the variant's tensors on each target layer as
        parameters or buffers named `lora_*` (`layer.lora_A`, ...), in `cfg.dtype`; they appear
        in `model.parameters()` and `state_dict()` beside the base's own, whose keys stay;
      * sets `requires_grad=False` on every base parameter, then True on the adapter's trainable
        tensors and on the parameters of the modules `cfg.trainable_modules` names (those
        modules' values are kept, for `detach`);
      * registers a forward hook (or a forward pre-hook, by variant) on each target; the base
        weights are never written (a fused parameter is swapped for the forward only);
      * for a data-driven variant, first runs `model` over `calibration_data` once, under
        `torch.no_grad()` in eval mode (mode restored), collecting each target's input
        statistics; each target must see at least r unmasked tokens.

    calibration_data: iterable of batches (dict -> model(**b), tuple -> model(*b), tensor ->
    model(b)) for variants that read input statistics; `attention_mask` in dict batches drops
    padding. `progress` shows a progress bar over calibration batches (needs tqdm).
    `torch.compile`'s wrapper is seen through. `ll.detach` undoes all of it.

    Raises, before the model is changed (a failure part-way rolls everything back):
      RuntimeError  the model already has an adapter (`ll.detach` it first);
      ValueError    a pattern selects no layer (naming it and why), r larger than a layer allows,
                    calibration data missing, unused, too short, or of a wrong batch type;
      TypeError     a target's kind (conv, embedding, fused, quantized) the variant does not adapt.

    Example:
        >>> cfg = ll.LoRAConfig(r=8, alpha=16, target_names=(r"(q|v)_proj$",))
        >>> ll.attach(model, cfg)
        >>> [n for n, p in model.named_parameters() if p.requires_grad][:2]
        ['model.layers.0.self_attn.q_proj.lora_A', 'model.layers.0.self_attn.q_proj.lora_B']
    """
    model = unwrap(model)
    variant = variant_of(cfg)
    ensure_free(model, name)
    targets = find_targets(model, cfg)
    validate(model, variant, cfg, targets, adapter=name)
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
    variant.advise(dict(targets), cfg)  # warnings about a config that is valid but risky
    stats = None
    if calibration_data is not None:
        stats = collect_stats(
            model, targets, kind, calibration_data, min_tokens=getattr(cfg, "r", 1), progress=progress
        )

    def fill(name: str, layer: nn.Module, specs: dict[str, ParamSpec]) -> None:
        for pname, spec in specs.items():
            init_tensor(getattr(layer, pname), spec.init)
        variant.at_target(name, cfg).init(layer, cfg, None if stats is None else stats[name])

    def fill_shared(shared: dict[str, torch.Tensor], specs: dict[str, ParamSpec]) -> None:
        for pname, t in shared.items():
            init_tensor(t, specs[pname].init)
        variant.init_shared(shared, cfg)

    install(model, cfg, variant, targets, fill, fill_shared=fill_shared, name=name)


def detach(model: nn.Module, name: str | None = None) -> None:
    """Remove the adapter (`name`, or the only one): hooks, `lora_*` tensors and the attach
    state; grad flags back. The base weights were never written, and the parameters of
    `trainable_modules` get their values from attach time back, so without other adapters the
    model is the pristine base bit for bit; the other adapters stay attached as they were."""
    model = unwrap(model)
    state = state_of(model, name)
    _remove_hooks(state)
    for name, layer in state.targets.items():
        for pname in state.specs[name]:
            _delete(layer_of(layer), registered(state.name, pname))
        if isinstance(layer, FusedParameter):
            layer.owner._modules.pop(layer.slot, None)
    _restore_values(model, state.originals)
    others = [s for s in adapters(model).values() if s is not state]
    # Every attach snapshot holds the base flags from before the first adapter (install copies
    # them); while other adapters stay, the base stays frozen and only their tensors' flags return.
    _restore_flags(model, {n: f for n, f in state.requires_grad.items() if not others or _is_adapter_tensor(n)})
    if state.name == DEFAULT:
        delattr(model, STATE_ATTR)
    else:
        del model.__dict__[NAMED_ATTR][state.name]


def reconfigure(model: nn.Module, **changes) -> AdapterConfig:
    """Change config fields of an attached adapter in place, e.g. a steering coefficient:
    `reconfigure(model, coeff=-1.0)`. Only the variant's `runtime_fields` may change; the
    next forward uses the new values, and save() records them. Returns the new config.

    A steering `coeff` may also be a coefficient tensor, checked like `ll.scaled`'s: shape
    (batch,) (one value per example) or (batch, seq) (one per token), floating point, finite,
    on the adapter's device; `coeff=torch.tensor([1.0, -1.0])` steers the first example up and
    the second down in one forward. A config holding a tensor is not saved (save, merge and
    export_peft raise): set a float again first."""
    state = state_of(unwrap(model))
    changeable = list(state.variant.runtime_fields) or "none"
    fields = [f.name for f in dataclasses.fields(state.cfg) if f.name != "variant"]
    unknown = sorted(set(changes) - set(fields))
    if unknown:
        raise ValueError(
            f"{unknown} {'is not a field' if len(unknown) == 1 else 'are not fields'} of "
            f"{type(state.cfg).__name__}; its fields: {fields} (changeable while attached: {changeable})"
        )
    frozen = set(changes) - set(state.variant.runtime_fields)
    if frozen:
        raise ValueError(
            f"{sorted(frozen)} cannot change while attached to a {state.cfg.variant!r} adapter "
            f"(changeable: {changeable}); detach and attach again"
        )
    cfg = dataclasses.replace(state.cfg, **changes)  # validates like a new config
    for f in dataclasses.fields(cfg):
        if f.name in changes and f.metadata.get("per_row"):
            state.check_coefficient(getattr(cfg, f.name), f"reconfigure({f.name}=...)")
    state.set_coefficients(state.scale, cfg)
    return state.cfg


@dataclass
class Description:
    """What `describe(model)` found; prints as a short report (`print(model)` cannot show hooks)."""

    variant: str
    config: AdapterConfig
    targets: list[str]
    adapter_params: int                         # trainable adapter parameters
    base_params: dict[str, int]                 # trainable_modules parameter -> numel
    adapter_dtypes: list[str]                   # dtypes the adapter tensors are in now
    hook: str                                   # "output" or "input (pre-hook)"
    scale: float | torch.Tensor
    enabled: bool
    name: str = DEFAULT

    def __str__(self) -> str:
        cfg = self.config
        default = type(cfg)()
        values = {f.name: _shown(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
        defaults = {f.name: _shown(getattr(default, f.name)) for f in dataclasses.fields(cfg)}
        fields = [f"{k}={v}" for k, v in values.items()
                  if k not in ("variant", "target_names", "target_roles", "target_parameters", "exclude_names",
                               "layers", "trainable_modules") and (k in ("r", "alpha", "dtype") or v != defaults[k])]
        some = self.targets if len(self.targets) <= 3 else [*self.targets[:2], "...", self.targets[-1]]
        compute = ("in the activation's dtype (AMP-style)" if cfg.compute == "input"
                   else "in the adapter dtype (activations cast)")
        lines = [
            f"lora-lite adapter{'' if self.name == DEFAULT else f' {self.name!r}'}: {self.variant} ({type(cfg).__name__})",
            f"  config: {', '.join(fields)}",
            f"  targets: {len(self.targets)} layers ({', '.join(some)}); selected by "
            f"target_names={cfg.target_names}, target_roles={cfg.target_roles}, layers={cfg.layers}"
            + (f", target_parameters={cfg.target_parameters}" if cfg.target_parameters else ""),
            f"  trainable: {self.adapter_params:,} adapter parameters"
            + (f" + {sum(self.base_params.values()):,} in trainable_modules ({', '.join(self.base_params)})"
               if self.base_params else ""),
            f"  adapter tensors: {'/'.join(self.adapter_dtypes)}; compute {compute}",
            f"  hooks: {self.hook}, {'enabled' if self.enabled else 'disabled'}, scale {_strength(self.scale)}",
        ]
        return "\n".join(lines)

    __repr__ = __str__


def _shown(value) -> str:
    """A config value or strength as `describe` prints it; a coefficient tensor by its shape."""
    if isinstance(value, torch.Tensor):
        return f"<coefficient tensor {tuple(value.shape)}>"
    if isinstance(value, torch.dtype):
        return repr(str(value).removeprefix("torch."))
    return repr(value)


def _strength(scale) -> str:
    return f"{scale:g}" if isinstance(scale, float) else _shown(scale)


class Descriptions(dict):
    """{name: Description} of a model with several adapters; prints each in attach order."""

    def __str__(self) -> str:
        return "\n".join(map(str, self.values()))

    __repr__ = __str__


def describe(model: nn.Module, name: str | None = None) -> Description | Descriptions | str:
    """What is attached to `model`: variant, key config fields, targets, trainable parameter
    counts, adapter dtype, compute policy, hook state. `print(ll.describe(model))`. With several
    adapters: a `Descriptions` of each (or the one `name` picks)."""
    model = unwrap(model)
    found = adapters(model)
    if not found:
        return "no lora-lite adapter is attached to this model"
    if name is None and len(found) > 1:
        return Descriptions({n: _describe(model, s) for n, s in found.items()})
    return _describe(model, state_of(model, name))


def _describe(model: nn.Module, state: AttachState) -> Description:
    tensors = [getattr(layer, p) for n, layer in state.targets.items() for p in state.specs[n]]
    trainable = list({id(t): t for n, layer in state.targets.items() for p, spec in state.specs[n].items()
                      if spec.trainable for t in (getattr(layer, p),)}.values())  # a shared one once
    return Description(
        variant=state.cfg.variant,
        config=state.cfg,
        targets=list(state.targets),
        adapter_params=sum(t.numel() for t in trainable),
        base_params={n: model.get_parameter(n).numel() for n in state.originals},
        adapter_dtypes=sorted({str(t.dtype).removeprefix("torch.") for t in tensors}),
        hook=_hook_kinds(state),
        scale=state.scale,
        enabled=state.enabled,
        name=state.name,
    )


def hook_only() -> list[str]:
    """Variants that never read the base weight: they run on any linear-like layer."""
    return [n for n, v in REGISTRY.items() if not v.needs_dense_weight]


def _hook_kinds(state: AttachState) -> str:
    """'output', 'input (pre-hook)', the weight swap of fused parameters, or several of them with
    their targets (a per-target placement)."""
    kinds: dict[str, list[str]] = {}
    for name, layer in state.targets.items():
        if isinstance(layer, FusedParameter):
            key = "W + ΔW swapped in for the forward of each fused parameter's owner"
        else:
            placed = state.variant.at_target(name, state.cfg)
            key = "input (pre-hook)" if placed.delta_input is not None else "output"
        kinds.setdefault(key, []).append(name)
    if len(kinds) == 1:
        return next(iter(kinds))
    return "; ".join(f"{k} on {len(v)} ({', '.join(v[:2])}{', ...' if len(v) > 2 else ''})" for k, v in kinds.items())


def variant_of(cfg: AdapterConfig) -> type[Variant]:
    if not isinstance(cfg, AdapterConfig):
        raise TypeError(f"expected an AdapterConfig (e.g. LoRAConfig), got {type(cfg).__name__}")
    if cfg.variant not in REGISTRY:
        raise KeyError(f"unknown variant {cfg.variant!r}; registered: {sorted(REGISTRY)}")
    return REGISTRY[cfg.variant]


def unwrap(model: nn.Module) -> nn.Module:
    """The module a `torch.compile` wrapper (OptimizedModule) compiles, else `model`: the
    adapter state, the targets and the parameter names live on that module, and the wrapper
    runs its forward, so every public function accepts either."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # no wrapper can exist before it loads
    while dynamo is not None and isinstance(model, dynamo.OptimizedModule):
        model = model._orig_mod
    return model


def adapters(model: nn.Module) -> dict[str, AttachState]:
    """{name: attach state} of every adapter on `model`, the default one first."""
    found = {DEFAULT: model.__dict__[STATE_ATTR]} if STATE_ATTR in model.__dict__ else {}
    return {**found, **model.__dict__.get(NAMED_ATTR, {})}


def state_of(model: nn.Module, name: str | None = None) -> AttachState:
    """The attach state of adapter `name`, or of the only adapter when `name` is None."""
    found = adapters(model)
    if name is None:
        if len(found) == 1:
            return next(iter(found.values()))
        if not found:
            raise RuntimeError("no lora-lite adapter is attached to this model; call attach() or load()")
        raise RuntimeError(f"this model carries several adapters ({', '.join(map(repr, found))}); name the one meant")
    if name not in found:
        raise KeyError(f"no adapter named {name!r} is attached; attached: {', '.join(map(repr, found)) or 'none'}")
    return found[name]


def ensure_free(model: nn.Module, name: str = DEFAULT) -> None:
    """Refuse an adapter name that is not an identifier or is already attached."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"adapter name {name!r} is not a valid Python identifier (e.g. 'task', 'steer_1')")
    found = adapters(model)
    if name in found:
        raise RuntimeError(
            f"this model already has a lora-lite adapter named {name!r} ({found[name].cfg.variant!r}); "
            f"call lora_lite.detach(model{'' if name == DEFAULT else f', {name!r}'}) first, or attach "
            f"this one under another name (name=...)"
        )


def registered(name: str, pname: str) -> str:
    """The attribute name on the layer of adapter `name`'s tensor `pname` (lora_X as the variant
    reads it): lora_X for the default adapter, lora_X_<name> for the others."""
    return pname if name == DEFAULT else f"{pname}_{name}"


def _is_adapter_tensor(qualified: str) -> bool:
    return qualified.rsplit(".", 1)[-1].startswith(TENSOR_PREFIX)


def layer_of(target: nn.Module) -> nn.Module:
    """The model's layer behind a target (a `view` of a named adapter, or the layer itself)."""
    return target.__dict__.get("_lora_layer", target)


class _View:
    """Mixed into a subclass of the layer's class (isinstance checks hold): an instance is the
    layer as a named adapter's variant math sees it. `lora_X` reads that adapter's `lora_X_<name>`
    on the layer, every other attribute the layer's own (live: `.to()`, new buffers). It holds
    no state but (layer, name), so copies and pickles rebuild it over the copied layer."""

    def __getattr__(self, attr):
        d = self.__dict__
        if attr.startswith(TENSOR_PREFIX):
            return getattr(d["_lora_layer"], f"{attr}_{d['_lora_name']}")
        return getattr(d["_lora_layer"], attr)

    def __reduce__(self):
        return view, (self.__dict__["_lora_layer"], self.__dict__["_lora_name"])


_VIEW_CLASSES: dict[type, type] = {}


def view(layer: nn.Module, name: str) -> nn.Module:
    """Adapter `name`'s view of `layer` (`_View`)."""
    cls = type(layer)
    sub = _VIEW_CLASSES.get(cls)
    if sub is None:
        sub = _VIEW_CLASSES[cls] = type(cls.__name__, (_View, cls), {"__module__": cls.__module__})
    v = object.__new__(sub)
    v.__dict__.update(_lora_layer=layer, _lora_name=name)
    return v


def validate(
    model: nn.Module, variant: type[Variant], cfg: AdapterConfig, targets: list[tuple[str, nn.Module]],
    *, adapter: str = DEFAULT,
) -> None:
    """Every check that can reject an attach/load; runs before anything is mutated."""
    ensure_free(model, adapter)
    held: dict[int, list[tuple[str, type[Variant]]]] = {}  # layer -> the adapters already on it
    owned: set[tuple[int, str]] = set()
    for other in adapters(model).values():
        for n, t in other.targets.items():
            held.setdefault(id(layer_of(t)), []).append((other.name, other.variant.at_target(n, other.cfg)))
            owned.update((id(layer_of(t)), registered(other.name, p)) for p in other.specs[n])
    for name, layer in targets:
        placed = variant.at_target(name, cfg)
        leftover = [n for n, _ in layer.named_parameters(recurse=False) if n.startswith(TENSOR_PREFIX)]
        leftover += [n for n, _ in layer.named_buffers(recurse=False) if n.startswith(TENSOR_PREFIX)]
        leftover = [n for n in leftover if (id(layer), n) not in owned]
        if leftover:
            raise RuntimeError(f"{name} already holds adapter tensors {leftover}; use a pristine model")
        if adapter != DEFAULT and isinstance(layer, FusedParameter):
            raise TypeError(f"{name}: a fused parameter carries the default adapter only; attach without name=")
        here = held.get(id(layer), [])
        pre = [n for n, v in [(adapter, placed), *here] if v.delta_input is not None]
        if here and (pre or isinstance(layer, FusedParameter)):
            raise ValueError(
                f"{name}: adapter {adapter!r} would share this layer with {', '.join(repr(n) for n, _ in here)}, "
                f"but an input pre-hook variant (or a fused parameter) cannot share a layer with another "
                f"adapter: each adapter's change must come from the layer's own input; exclude the layer "
                f"from one of them (exclude_names)"
            )
        check_kind(name, layer, placed)
        if placed.needs_dense_weight and weight_storage(layer) is None:
            w = getattr(layer, "weight", None)
            raise TypeError(
                f"{name}: variant {cfg.variant!r} reads the weight W and needs torch.nn.Linear, "
                f"got {type(layer).__name__} (weight {type(w).__name__}, {getattr(w, 'dtype', None)}), "
                f"or a quantized linear it can dequantize (bitsandbytes Linear4bit / Linear8bitLt, "
                f"torchao quantize_); variants that do not read W ({', '.join(hook_only())}) work on "
                f"any linear-like layer"
            )
        d_in, d_out = dims(layer)
        if placed.uses_rank and not placed.wide_ranks and cfg.r > min(d_in, d_out):
            wide = ", ".join(n for n, v in REGISTRY.items() if v.wide_ranks)
            raise ValueError(
                f"{name}: r={cfg.r} exceeds min(d_in, d_out)=min({d_in}, {d_out}), which variant "
                f"{cfg.variant!r} needs; use a smaller r or exclude this layer (variants that take any r: {wide})"
            )
        try:
            placed.validate(layer, cfg)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None
    variant.validate_targets([n for n, _ in targets], cfg)
    trainable_params(model, cfg, targets)


def check_kind(name: str, layer: nn.Module, variant: type[Variant]) -> None:
    """Refuse a layer whose kind (kinds.py) the variant does not adapt, naming what it adapts."""
    kind = kind_of(layer)
    if kind not in variant.kinds:
        others = sorted(n for n, v in REGISTRY.items() if kind in v.kinds)
        hint = f"; variants that adapt it: {', '.join(others)}" if others else ""
        raise TypeError(
            f"{name}: variant {variant.name!r} does not adapt {label(kind, layer)}; it adapts "
            f"{'; '.join(DESCRIBED[k] for k in variant.kinds)}{hint}"
        )
    if kind == "conv":
        plain = next(c for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) if isinstance(layer, c))
        if (type(layer).forward, type(layer)._conv_forward) != (plain.forward, plain._conv_forward):
            raise TypeError(
                f"{name}: {type(layer).__name__} overrides the forward of {plain.__name__}, so its output is "
                f"not the convolution the adapter's kernels repeat; only plain convolutions are adapted"
            )
    if kind == "embedding":
        if layer.max_norm is not None:
            raise TypeError(
                f"{name}: nn.Embedding with max_norm={layer.max_norm} renormalises rows in place at "
                f"every lookup, which an additive adapter cannot follow; use max_norm=None"
            )
        if type(layer).forward is not nn.Embedding.forward:
            raise TypeError(
                f"{name}: {type(layer).__name__} overrides nn.Embedding.forward (e.g. scales the "
                f"lookup), so its output is not embed(ids, W); only plain lookups are adapted"
            )


def trainable_params(
    model: nn.Module, cfg: AdapterConfig, targets: list[tuple[str, nn.Module]]
) -> dict[str, nn.Parameter]:
    """{full name: parameter} of the base modules `cfg.trainable_modules` names (by regex, then
    in model order; a parameter reached twice is listed once).

    Refuses a regex that matches no module, a module without parameters, one that overlaps an
    adapter target or shares a parameter with one (a layer is either adapted or trained in
    full) and non-floating parameters (a quantized layer cannot be trained in full)."""
    if not cfg.trainable_modules:
        return {}
    modules = [(n, m) for n, m in model.named_modules() if n]
    target_names = [n for n, _ in targets]
    target_params = {id(p): n for n, t in targets for p in t.parameters()}
    found: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for pattern in cfg.trainable_modules:
        hits = [(n, m) for n, m in modules if re.search(pattern, n)]
        if not hits:
            some = ", ".join(n for n, _ in modules if "." not in n) or "(none)"
            raise ValueError(
                f"trainable_modules: {pattern!r} matches no module of this model; top-level modules: {some}"
            )
        for mname, module in hits:
            overlap = [t for t in target_names if t == mname or t.startswith(mname + ".") or mname.startswith(t + ".")]
            if overlap:
                raise ValueError(
                    f"trainable_modules: {mname!r} overlaps the adapter target {overlap[0]!r}; a layer "
                    f"is either adapted or trained in full: narrow the regex or exclude the target "
                    f"with exclude_names"
                )
            params = list(module.named_parameters())
            if not params:
                raise ValueError(f"trainable_modules: {mname!r} ({type(module).__name__}) has no parameters")
            for pname, p in params:
                if not p.dtype.is_floating_point:
                    raise TypeError(
                        f"trainable_modules: {mname}.{pname} is {p.dtype} ({type(module).__name__}); only "
                        f"floating-point parameters can train"
                    )
                if id(p) in target_params:
                    raise ValueError(
                        f"trainable_modules: {mname}.{pname} is also a parameter of the adapter target "
                        f"{target_params[id(p)]!r} (tied weights); a layer is either adapted or trained in full"
                    )
                if id(p) not in seen:
                    seen.add(id(p))
                    found[f"{mname}.{pname}"] = p
    return found


def install(
    model: nn.Module,
    cfg: AdapterConfig,
    variant: type[Variant],
    targets: list[tuple[str, nn.Module]],
    fill: Callable[[str, nn.Module, dict[str, ParamSpec]], None],
    fingerprints: dict[str, dict] | None = None,
    trainable_values: dict[str, torch.Tensor] | None = None,
    *,
    fill_shared: Callable[[dict[str, torch.Tensor], dict[str, ParamSpec]], None],
    name: str = DEFAULT,
) -> None:
    """Create tensors, fill them (`fill_shared` the shared ones, once, then `fill` each target's
    own), freeze the base, unfreeze `trainable_modules` (keeping their values for detach;
    `trainable_values` sets them, as load does), add hooks; roll back on any error. An adapter
    `name` other than DEFAULT registers lora_X as lora_X_<name>, and its state's targets are the
    layers' `view`s, through which the variant (and save, merge, describe) reads lora_X."""
    before = adapters(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}  # rolled back to on failure
    state = AttachState(
        cfg=cfg,
        variant=variant,
        name=name,
        targets={n: m if name == DEFAULT else view(m, name) for n, m in targets},
        specs={n: layer_specs(variant.at_target(n, cfg), m, cfg) for n, m in targets},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
    )
    for other in list(before.values())[:1]:  # the base flags from before the first adapter (detach)
        state.requires_grad.update({n: f for n, f in other.requires_grad.items() if not _is_adapter_tensor(n)})
    # The base as it is now (pristine by contract); save() writes it, load() compares with it.
    state.fingerprints = fingerprints or {n: fingerprint(m) for n, m in targets}
    created: list[tuple[nn.Module, str]] = []
    placed: list[FusedParameter] = []
    try:
        group = shared_specs(state.specs)
        for pname, spec in group.items():  # one tensor each, on the first target's device
            state.shared[pname] = nn.Parameter(torch.empty(spec.shape, dtype=cfg.dtype, device=_device(targets[0][1])),
                                               requires_grad=False)
        if group:
            with torch.no_grad():
                fill_shared(state.shared, group)
        for tname, layer in targets:
            if isinstance(layer, FusedParameter):  # registered beside its parameter: .to(), copies, state_dict
                layer.owner.add_module(layer.slot, layer)
                placed.append(layer)
            for pname, spec in state.specs[tname].items():
                _create(layer, registered(name, pname), spec, cfg.dtype, state.shared.get(pname))
                created.append((layer, registered(name, pname)))
            with torch.no_grad():
                fill(tname, state.targets[tname], {p: s for p, s in state.specs[tname].items() if not s.shared})
        for p in model.parameters():
            p.requires_grad_(False)
        for tname, target in state.targets.items():
            for pname, spec in state.specs[tname].items():
                if spec.trainable:
                    getattr(target, pname).requires_grad_(True)
        for pname, p in trainable_params(model, cfg, targets).items():
            state.originals[pname] = p.detach().clone()
            if trainable_values is not None:
                with torch.no_grad():
                    p.copy_(trainable_values[pname])
            p.requires_grad_(True)
        for tname, layer in targets:
            _add_hook(layer, variant.at_target(tname, cfg), state, next(iter(state.specs[tname])),
                      None if name == DEFAULT else state.targets[tname])
        state.specs = {n: {p: dataclasses.replace(s, init=None) for p, s in specs.items()}
                       for n, specs in state.specs.items()}  # inits ran; closures would not pickle
        if name == DEFAULT:
            setattr(model, STATE_ATTR, state)
        else:
            model.__dict__.setdefault(NAMED_ATTR, {})[name] = state
    except BaseException:
        _remove_hooks(state)
        for layer, pname in created:
            _delete(layer, pname)
        for layer in placed:
            layer.owner._modules.pop(layer.slot, None)
        _restore_values(model, state.originals)
        _restore_flags(model, flags)
        raise


def layer_specs(variant: type[Variant], layer: nn.Module, cfg: AdapterConfig) -> dict[str, ParamSpec]:
    """The variant's tensors for this layer; for a fused parameter one per expert: a leading
    expert dimension, each slice initialised as the variant's own tensor (shared tensors excepted)."""
    specs = variant.param_specs(*dims(layer), cfg)
    if not isinstance(layer, FusedParameter):
        return specs
    E = layer.num_experts
    return {n: s if s.shared else dataclasses.replace(s, shape=(E, *s.shape), init=_per_expert(s.init))
            for n, s in specs.items()}


def shared_specs(specs: dict[str, dict[str, ParamSpec]]) -> dict[str, ParamSpec]:
    """{name: spec} of the shared tensors (ParamSpec shared=True) over all targets' specs, each
    shaped to the elementwise largest shape a target declares: every target reads its leading
    block. The first target's spec gives the init."""
    group: dict[str, ParamSpec] = {}
    for per in specs.values():
        for pname, spec in per.items():
            if not spec.shared:
                continue
            have = group.setdefault(pname, spec)
            if len(have.shape) != len(spec.shape):
                raise ValueError(f"shared tensor {pname}: targets declare shapes {have.shape} and {spec.shape}")
            group[pname] = dataclasses.replace(have, shape=tuple(map(max, have.shape, spec.shape)))
    return group


def _device(layer: nn.Module) -> torch.device:
    return layer.weight.device


def _per_expert(init):
    def fill(t):
        for e in range(t.shape[0]):
            init_tensor(t[e], init)
    return fill


class AdapterHook:
    """Forward hook of one target: y + scale·Δy, Δy = variant.delta(layer, cfg, x, y).

    An object, not a closure: its fields (the attach state it reads on every call) are what
    `copy.deepcopy` and `torch.save` copy with the model, so a copy of an attached model gets
    its own switches. `first` names one of the layer's adapter tensors, whose current dtype is
    the adapter dtype (it follows `.to()`)."""

    def __init__(self, state: AttachState, delta: Callable, first: str, scale_outside: bool = False,
                 gate: Callable | None = None, view: nn.Module | None = None):
        self.state, self.delta, self.first, self.scale_outside, self.gate = state, delta, first, scale_outside, gate
        self.view = view  # a named adapter's view of the layer (runtime.view); the layer itself if None

    def __call__(self, module: nn.Module, args: tuple, y: torch.Tensor):
        # Runs once per target per forward: every skipped no-op cast and every kernel folded
        # into the final add shows on models with many small layers (bench cost --models tiny64).
        state, module = self.state, self.reads(module, y)
        if module is None:
            return None
        x, cfg = args[0], state.cfg
        if self.gate is not None:
            return gated(y, self.gate(module, cfg), state.scale, self.adapter_dtype(module, cfg))
        dt = self.adapter_dtype(module, cfg) or x.dtype
        d = _as(times(self.delta(module, cfg, _as(x, dt), _as(y, dt)), state.scale), y.dtype)
        return y.add(d, alpha=cfg.scale) if self.scale_outside else y.add(d)

    def change(self, module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
        """The change this hook adds to y, c·Δy in y's dtype (a gate's as the sum y ⊙ (g − 1)),
        or None while disabled: what `SharedHook` sums over the adapters of one layer."""
        state, module = self.state, self.reads(module, y)
        if module is None:
            return None
        x, cfg = args[0], state.cfg
        dt = self.adapter_dtype(module, cfg)
        if self.gate is not None:
            g = self.gate(module, cfg)
            t = y if dt is None else _as(y, dt)
            return _as(times(t * (_as(g, t.dtype) if dt else g).sub(1.0), state.scale), y.dtype)
        dt = dt or x.dtype
        d = times(self.delta(module, cfg, _as(x, dt), _as(y, dt)), state.scale)
        return _as(d * cfg.scale if self.scale_outside else d, y.dtype)

    def reads(self, module: nn.Module, t: torch.Tensor) -> nn.Module | None:
        """The module the variant math reads (this adapter's view of it), or None while the
        adapter is disabled; first checks the coefficient tensors' shapes against activation t."""
        if not self.state.enabled:
            return None
        if self.state.per_row:
            self.check_rows(module, t)
        return module if self.view is None else self.view

    def adapter_dtype(self, module: nn.Module, cfg: AdapterConfig) -> torch.dtype | None:
        """The adapter tensors' dtype with compute="adapter" (the math runs in it), else None."""
        return getattr(module, self.first).dtype if cfg.compute == "adapter" else None

    def check_rows(self, module: nn.Module, t: torch.Tensor) -> None:
        """Each coefficient tensor in effect must be t's leading dimensions, with a dimension of t
        left over to broadcast along (shapes only: the values were checked when they were set)."""
        for c in self.state.per_row:
            if t.ndim <= c.ndim or t.shape[:c.ndim] != c.shape:
                name = next((n for n, m in self.state.targets.items() if layer_of(m) is module), type(module).__name__)
                raise ValueError(
                    f"{name}: a coefficient tensor of shape {tuple(c.shape)} does not fit this layer's "
                    f"activation of shape {tuple(t.shape)}: a (batch,) coefficient needs the batch size "
                    f"first, a (batch, seq) one needs (batch, seq, ..., hidden) activations; pass the "
                    f"shape of the batch this forward runs on"
                )


class AdapterPreHook(AdapterHook):
    """Forward pre-hook of one target: the layer runs on x + scale·Δx, Δx = variant.delta_input(layer, cfg, x)."""

    def __call__(self, module: nn.Module, args: tuple):
        state, x = self.state, args[0]
        module = self.reads(module, x)
        if module is None:
            return None
        if self.gate is not None:
            g = self.gate(module, state.cfg)
            return (gated(x, g, state.scale, self.adapter_dtype(module, state.cfg)),) + args[1:]
        dt = self.adapter_dtype(module, state.cfg) or x.dtype
        d = self.delta(module, state.cfg, _as(x, dt))
        return (x.add(_as(times(d, state.scale), x.dtype)),) + args[1:]


def times(d: torch.Tensor, c: float | torch.Tensor) -> torch.Tensor:
    """c·d: d itself at c = 1, else one product with the float or with the coefficient tensor
    viewed over d's rows (`per_row`, in d's dtype). Every hook scales its change this way, then
    adds it: the product and the add round once each, whether c is a float or a tensor, so a
    row of a tensor-scaled batch is the row the same float gives, bit for bit. (One fused
    y.add(d, alpha=c) would round once, and differently from a tensor's product.)"""
    if isinstance(c, torch.Tensor):
        return d * per_row(c, d)
    return d if c == 1.0 else d * c


def gated(t: torch.Tensor, g: torch.Tensor, c: float | torch.Tensor, dt: torch.dtype | None = None) -> torch.Tensor:
    """t + c·t ⊙ (g − 1), the change of a gate variant at strength c, as one product: t ⊙ g at
    c = 1, t ⊙ (1 + c·(g − 1)) otherwise (formed on the small gate; exactly t at g = 1 or c = 0).
    A coefficient tensor c is viewed over t's rows in g's dtype, so the factor is
    (batch, [seq,] …, d) and each row's factor is the one its float gives, bit for bit.
    The product runs in the promoted dtype of t and g (a bf16 activation times an fp32 gate is
    rounded once, as PEFT's IA3 does; a gate cast to bf16 first moves in steps of 2⁻⁷), or in
    `dt` (compute="adapter": the adapter tensors' dtype); the result is in t's dtype. Against
    the additive form t + c·(t ⊙ (g − 1)) it saves an activation-sized kernel forward and backward."""
    if isinstance(c, torch.Tensor):
        f = torch.add(g, -1.0).mul(per_row(c, t, g.dtype)).add_(1.0)
    else:
        f = g if c == 1 else torch.add(g, -1.0).mul_(c).add_(1.0)
    return _as(t * f if dt is None else _as(t, dt) * _as(f, dt), t.dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, without a call into torch when it already is (hooks run per layer per step)."""
    return t if t.dtype == dtype else t.to(dtype)


class EmbeddingHook(AdapterHook):
    """Forward hook of an nn.Embedding target: y + scale·Δy, Δy = variant.delta_embedding(layer,
    cfg, ids, y); the input is token ids, so the change is computed in y's dtype."""

    def __call__(self, module: nn.Module, args: tuple, y: torch.Tensor):
        d = self.change(module, args, y)
        return None if d is None else y + d

    def change(self, module: nn.Module, args: tuple, y: torch.Tensor) -> torch.Tensor | None:
        state, module = self.state, self.reads(module, y)
        if module is None:
            return None
        dt = self.adapter_dtype(module, state.cfg) or y.dtype
        d = self.delta(module, state.cfg, args[0], y.to(dt))
        return _as(times(d, state.scale), y.dtype)


class FusedPreHook(AdapterHook):
    """Forward pre-hook on the module owning a fused parameter (kinds.FusedParameter): for its
    forward the parameter slot holds W + scale·B A per expert (one baddbmm in W's dtype, B A
    from the variant's `low_rank_delta`). The Parameter is kept aside on the FusedParameter
    and never written. One weight serves every row of the batch, so a coefficient tensor must
    hold one value throughout (`scaled` checks), which is used as that float."""

    def __init__(self, state: AttachState, delta: Callable, target: FusedParameter):
        super().__init__(state, delta, "")
        self.target = target

    def __call__(self, module: nn.Module, args: tuple):
        state, target = self.state, self.target
        if not state.enabled:
            return None
        W = module._parameters[target.parameter_name]
        B, A = self.delta(target, state.cfg)                        # (E, d_out, k), (E, k, d_in)
        c = state.scale
        B, A = like(W, times(B, c.reshape(-1)[0] if isinstance(c, torch.Tensor) else c), A)
        W_eff = torch.baddbmm(W, A.mT, B.mT) if target.transposed else torch.baddbmm(W, B, A)
        target.__dict__["_parameter"] = W
        module._parameters[target.parameter_name] = W_eff          # what module.<name> reads now
        return None


class FusedPostHook(FusedPreHook):
    """Forward hook (always called, also when the forward raises): the Parameter back in its slot."""

    def __call__(self, module: nn.Module, args: tuple, output=None):
        W = self.target.__dict__.pop("_parameter", None)
        if W is not None:
            module._parameters[self.target.parameter_name] = W
        return None


class ChannelGate:
    """A variant's gate g (C_out,) on a conv target, shaped to broadcast over the channel
    dimension of (N, C_out, *spatial); an object so that copies and pickles of the hook keep it."""

    def __init__(self, gate: Callable):
        self.gate = gate

    def __call__(self, module: nn.Module, cfg: AdapterConfig) -> torch.Tensor:
        return per_channel(module, self.gate(module, cfg))


class SharedHook:
    """Forward hook of a layer that several adapters' output hooks share (amendment 8):
    y_base + Σ_k c_k·Δ_k, every adapter's `change` computed from the layer's own input and
    output y_base, none from another adapter's result. A layer with one adapter holds that
    adapter's hook instead, so one adapter pays nothing for this."""

    def __init__(self, hooks: list[AdapterHook]):
        self.hooks = hooks

    def __call__(self, module: nn.Module, args: tuple, y: torch.Tensor):
        out = y
        for hook in self.hooks:
            d = hook.change(module, args, y)
            if d is not None:
                out = out + d
        return None if out is y else out


def _add_hook(layer: nn.Module, variant: type[Variant], state: AttachState, first: str,
              view: nn.Module | None = None) -> None:
    kind = kind_of(layer)
    if kind == "fused":
        layer.owner.register_forward_pre_hook(FusedPreHook(state, variant.low_rank_delta, layer))
        layer.owner.register_forward_hook(FusedPostHook(state, variant.low_rank_delta, layer), always_call=True)
    elif variant.delta_input is not None and kind != "conv":
        layer.register_forward_pre_hook(AdapterPreHook(state, variant.delta_input, first, gate=variant.gate, view=view))
    else:
        if kind == "embedding":
            hook = EmbeddingHook(state, variant.delta_embedding, first, view=view)
        elif kind == "conv":  # every variant's change on a conv is an output hook (delta_conv)
            gate = None if variant.gate is None else ChannelGate(variant.gate)
            hook = AdapterHook(state, variant.delta_conv, first, gate=gate, view=view)
        else:
            hook = AdapterHook(state, variant.delta, first, variant.scale_outside, variant.gate, view)
        mine = [k for k, h in layer._forward_hooks.items() if isinstance(h, (AdapterHook, SharedHook))]
        if not mine:
            layer.register_forward_hook(hook)
            return
        had = layer._forward_hooks[mine[0]]  # validate let at most output hooks share a layer: one entry
        layer._forward_hooks[mine[0]] = SharedHook([*getattr(had, "hooks", [had]), hook])


def _remove_hooks(state: AttachState) -> None:
    """Remove the hooks that read `state` from its targets (found by identity, so this works on
    a deepcopied or unpickled model as on the original); a layer's SharedHook loses that
    adapter's hook, and becomes the remaining adapter's own hook when one is left."""
    for target in state.targets.values():
        layer = target.owner if isinstance(target, FusedParameter) else layer_of(target)
        for key, h in list(layer._forward_hooks.items()):
            if isinstance(h, SharedHook):
                rest = [x for x in h.hooks if x.state is not state]
                layer._forward_hooks[key] = rest[0] if len(rest) == 1 else SharedHook(rest)
        for hooks, extra in ((layer._forward_hooks, ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
                             (layer._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",))):
            for key in [k for k, h in hooks.items() if isinstance(h, AdapterHook) and h.state is state]:
                del hooks[key]
                for name in extra:
                    getattr(layer, name, {}).pop(key, None)


def _create(layer: nn.Module, pname: str, spec: ParamSpec, dtype: torch.dtype,
            shared: nn.Parameter | None = None) -> None:
    """Register tensor `pname` on `layer`: a new one per `spec`, or the adapter's `shared` one."""
    if not pname.startswith(TENSOR_PREFIX):
        raise ValueError(f"adapter tensor names must start with {TENSOR_PREFIX!r}, got {pname!r}")
    if hasattr(layer, pname):
        raise RuntimeError(f"{type(layer).__name__} already has an attribute {pname!r}")
    if shared is not None:
        layer.register_parameter(pname, shared)
        return
    t = torch.empty(spec.shape, dtype=dtype, device=_device(layer))
    if spec.is_buffer:
        layer.register_buffer(pname, t, persistent=True)
    else:
        layer.register_parameter(pname, nn.Parameter(t, requires_grad=False))


def _delete(layer: nn.Module, pname: str) -> None:
    layer._parameters.pop(pname, None)
    layer._buffers.pop(pname, None)
    layer._non_persistent_buffers_set.discard(pname)


@torch.no_grad()
def _restore_values(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    for name, value in originals.items():
        model.get_parameter(name).copy_(value)


def _restore_flags(model: nn.Module, flags: dict[str, bool]) -> None:
    for n, p in model.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
