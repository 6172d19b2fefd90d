"""Target discovery: which linear-like modules an adapter attaches to.

Linear-like = nn.Linear, a quantised linear (has `in_features`, `out_features`, `weight`; for
hook-only variants) or transformers' Conv1D (kinds.py). An nn.Embedding is a candidate only
when a `target_names` pattern names it. Filters apply in this order: `exclude_names`, `layers`,
`target_names`, then `target_roles`. Roles are classified only when role filtering is asked
for, and only for modules that survived the other filters, so an ambiguous square layer that
the name filters exclude never raises.

Roles relative to the model width d_model (`model.config.hidden_size` when present):
    reader  d_model -> other   (q/k/v, up/gate, fc1)
    writer  other -> d_model   (o_proj, down_proj, fc2)
    inner   neither side is d_model
    square  d_model -> d_model: resolved by name (q/k/v-like = reader, o/out-like = writer)
"""

from __future__ import annotations

import re

from torch import nn

from .config import AdapterConfig
from .kinds import FusedParameter, dims, fused_parameters, kind_of

_SQUARE_READER = re.compile(r"(^|[._])(q|k|v|query|key|value|q_proj|k_proj|v_proj|qkv|c_attn|wq|wk|wv)$")
_SQUARE_WRITER = re.compile(r"(^|[._])(o|o_proj|out_proj|c_proj|wo|attention\.output\.dense)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def is_linear_like(module: nn.Module) -> bool:
    """A layer computing x Wᵀ + b on features: nn.Linear, a quantized linear or a Conv1D."""
    return kind_of(module) in ("linear", "conv1d")


def is_adaptable(module: nn.Module) -> bool:
    """A layer of a kind lora-lite adapts (kinds.py): linear-like or an embedding."""
    return kind_of(module) is not None


def named_linear_layers(model: nn.Module, names) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """([(name, layer)] for the `names` that are adaptable layers of `model`, in model order;
    the names that are not) — how a saved or imported adapter finds its targets."""
    wanted = set(names)
    found = [(n, m) for n, m in model.named_modules() if n in wanted and is_adaptable(m)]
    found += [(n, FusedParameter(owner, p)) for n, owner, p in fused_parameters(model) if n in wanted]
    have = {n for n, _ in found}
    return found, [n for n in names if n not in have]


def find_fused(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """(parameter name, FusedParameter) for the 3-D parameters `cfg.target_parameters` names
    (after exclude_names and layers); ValueError naming a pattern that matches none of them."""
    fused = fused_parameters(model)
    selected = []
    for pattern in cfg.target_parameters:
        hits = [f for f in fused if re.search(pattern, f[0])]
        if not hits:
            others = [n for n, p in model.named_parameters() if re.search(pattern, n)]
            found = (f"it matches {others[0]} of shape {tuple(model.get_parameter(others[0]).shape)}, not a "
                     f"3-D fused parameter; adapt its module with target_names") if others else \
                f"fused (3-D) parameters of this model: {', '.join(f[0] for f in fused[:4]) or 'none'}"
            raise ValueError(f"target_parameters: {pattern!r} matches no fused parameter; {found}")
        selected += [f for f in hits if f not in selected]
    selected = [f for f in fused if f in selected]  # model order
    return [(name, FusedParameter(owner, pname)) for name, owner, pname in selected
            if not any(re.search(p, name) for p in cfg.exclude_names)
            and (cfg.layers is None or layer_index(name) in cfg.layers)]


def layer_index(name: str) -> int | None:
    """Block index of a module path: the first all-digit path component ('model.layers.3.mlp' -> 3)."""
    m = _LAYER_INDEX.search(name)
    return int(m.group(1)) if m else None


def role(name: str, module: nn.Module, d_model: int | None) -> str:
    if d_model is None:
        raise ValueError(
            "target_roles needs the model width: the model has no config.hidden_size; "
            "use target_names instead"
        )
    d_in, d_out = dims(module)
    if d_in == d_model and d_out != d_model:
        return "reader"
    if d_out == d_model and d_in != d_model:
        return "writer"
    if d_in != d_model and d_out != d_model:
        return "inner"
    if _SQUARE_READER.search(name):
        return "reader"
    if _SQUARE_WRITER.search(name):
        return "writer"
    raise ValueError(
        f"cannot tell the role of square layer {name!r} ({d_in} -> {d_out}) from its name; "
        f"exclude it with exclude_names or select layers with target_names"
    )


def find_targets(model: nn.Module, cfg: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """Ordered (name, module) pairs the config selects; ValueError if there are none."""
    # An embedding is never adapted by default: only a target_names pattern can select it.
    candidates = [(n, m) for n, m in model.named_modules()
                  if n and (is_linear_like(m) or (cfg.target_names and kind_of(m) == "embedding"))]
    selected = []
    for name, module in candidates:
        if any(re.search(p, name) for p in cfg.exclude_names):
            continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        if cfg.target_names and not any(re.search(p, name) for p in cfg.target_names):
            continue
        selected.append((name, module))
    if cfg.target_roles:
        d_model = getattr(getattr(model, "config", None), "hidden_size", None)
        selected = [(n, m) for n, m in selected if role(n, m, d_model) in cfg.target_roles]
    if cfg.target_parameters:
        if not (cfg.target_names or cfg.target_roles):
            selected = []  # parameters only, as PEFT's target_modules=[]
        selected += find_fused(model, cfg)
    if not selected:
        some = ", ".join(n for n, _ in candidates[:8]) or "(the model has no linear-like modules)"
        raise ValueError(
            f"no target layers match target_names={cfg.target_names}, "
            f"target_roles={cfg.target_roles}, layers={cfg.layers}, "
            f"exclude_names={cfg.exclude_names}; linear-like modules include: {some}"
        )
    return selected
