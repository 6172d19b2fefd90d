"""Target discovery: which linear-like modules an adapter attaches to.

Linear-like = has `in_features`, `out_features`, `weight` and is callable, so quantised linears
qualify for hook-only variants. Filters apply in this order: `exclude_names`, `layers`,
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

_SQUARE_READER = re.compile(r"(^|[._])(q|k|v|query|key|value|q_proj|k_proj|v_proj|qkv|c_attn|wq|wk|wv)$")
_SQUARE_WRITER = re.compile(r"(^|[._])(o|o_proj|out_proj|c_proj|wo|attention\.output\.dense)$")
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def is_linear_like(module: nn.Module) -> bool:
    return (
        hasattr(module, "in_features")
        and hasattr(module, "out_features")
        and getattr(module, "weight", None) is not None
        and callable(module)
    )


def named_linear_layers(model: nn.Module, names) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """([(name, layer)] for the `names` that are linear-like layers of `model`, in model order;
    the names that are not) — how a saved or imported adapter finds its targets."""
    wanted = set(names)
    found = [(n, m) for n, m in model.named_modules() if n in wanted and is_linear_like(m)]
    have = {n for n, _ in found}
    return found, [n for n in names if n not in have]


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
    d_in, d_out = module.in_features, module.out_features
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
    candidates = [(n, m) for n, m in model.named_modules() if n and is_linear_like(m)]
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
    if not selected:
        some = ", ".join(n for n, _ in candidates[:8]) or "(the model has no linear-like modules)"
        raise ValueError(
            f"no target layers match target_names={cfg.target_names}, "
            f"target_roles={cfg.target_roles}, layers={cfg.layers}, "
            f"exclude_names={cfg.exclude_names}; linear-like modules include: {some}"
        )
    return selected
