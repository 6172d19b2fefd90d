"""Target discovery: which linear-like modules an adapter attaches to.

Linear-like = nn.Linear, a quantised linear (has `in_features`, `out_features`, `weight`; for
hook-only variants) or transformers' Conv1D (kinds.py). An nn.Embedding is a candidate only
when a `target_names` pattern names it. Filters apply in this order: `exclude_names`, `layers`,
`target_names`, then `target_roles`. Roles are classified only when role filtering is asked
for, and only for modules that survived the other filters, so an ambiguous square layer that
the name filters exclude never raises.

Every `target_names` pattern must select at least one layer (after `exclude_names` and
`layers`, before roles); otherwise attach raises, naming the pattern and why: it matches no
module (a typo, or a name from another architecture), only modules that cannot be adapted (with
their types), or only layers the other filters remove. An error rather than a warning: a silently
dropped pattern costs a whole training run on fewer layers, and warnings scroll by. A config
meant for several architectures writes the alternatives in ONE pattern (`r"(q_proj|query)$"`),
which selects wherever one alternative exists.

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
from .kinds import DESCRIBED, FusedParameter, dims, fused_parameters, kind_of

# Names that resolve a square (d_model -> d_model) layer's role: attention and FFN names of the
# Llama/Qwen/Mistral/Gemma/Phi-3 (q_proj, qkv_proj, gate_up_proj, down_proj), GPT-2 (c_attn,
# c_fc, c_proj), GPT-NeoX/Falcon/Bloom (query_key_value, dense_h_to_4h, dense_4h_to_h,
# attention.dense), BERT (query, intermediate.dense, output.dense), OPT/BART (fc1, fc2,
# out_proj) and T5 (q, wi, wo) families. FFN names matter when the intermediate size equals
# the width, as in small configs. GPT-2's c_proj is a writer in both attention and MLP.
_SQUARE_READER = re.compile(
    r"(^|[._])(q|k|v|query|key|value|q_proj|k_proj|v_proj|qkv|qkv_proj|c_attn|wq|wk|wv|"
    r"query_key_value|gate_proj|up_proj|gate_up_proj|c_fc|fc1|wi|wi_0|wi_1|dense_h_to_4h|"
    r"intermediate\.dense)$"
)
_SQUARE_WRITER = re.compile(
    r"(^|[._])(o|o_proj|out_proj|c_proj|wo|down_proj|fc2|dense_4h_to_h|"
    r"(attention|attn|self_attention)\.dense|attention\.output\.dense|output\.dense)$"
)
ADAPTABLE = "; ".join(DESCRIBED.values())
_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def is_linear_like(module: nn.Module) -> bool:
    """A layer computing x Wᵀ + b on features: nn.Linear, a quantized linear or a Conv1D."""
    return kind_of(module) in ("linear", "conv1d")


# Kinds selected only when a target_names pattern names them (never by default or by role).
NAMED_ONLY = ("embedding", "conv")


def is_adaptable(module: nn.Module) -> bool:
    """A layer of a kind lora-lite adapts (kinds.py): linear-like or an embedding."""
    return kind_of(module) is not None


def targets_by_name(model: nn.Module, names) -> tuple[list[tuple[str, nn.Module]], list[str]]:
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
    modules = [(n, m) for n, m in model.named_modules() if n]
    # Embeddings and convolutions are never adapted by default: only a target_names pattern selects them.
    candidates = [(n, m) for n, m in modules
                  if is_linear_like(m) or (cfg.target_names and kind_of(m) in NAMED_ONLY)]
    selected = []
    for name, module in candidates:
        if any(re.search(p, name) for p in cfg.exclude_names):
            continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        if cfg.target_names and not any(re.search(p, name) for p in cfg.target_names):
            continue
        selected.append((name, module))
    _refuse_unadaptable(modules, cfg)
    for pattern in cfg.target_names:
        if not any(re.search(pattern, n) for n, _ in selected):
            raise ValueError(_why_unselected(pattern, modules, cfg))
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


def _refuse_unadaptable(modules: list[tuple[str, nn.Module]], cfg: AdapterConfig) -> None:
    """A target_names pattern never narrows silently: ValueError naming a layer (a module holding
    a weight matrix or kernel of its own) that the pattern selects and lora-lite cannot adapt,
    even when the pattern selects adaptable layers too; and the out_proj of an
    nn.MultiheadAttention, whose forward reads out_proj.weight directly and never calls it (a
    hook there would be a no-op). Norms and biases (1-D) are no such layer, so a block prefix
    such as r'^layers[.]0[.]' stays a scope; 3-D parameters outside convolutions are fused ones,
    adapted through target_parameters."""
    parents = {f"{n}.{c}": m for n, m in modules for c, _ in m.named_children()}
    for name, module in modules:
        if not any(re.search(p, name) for p in cfg.target_names):
            continue
        if any(re.search(p, name) for p in cfg.exclude_names):
            continue
        if cfg.layers is not None and layer_index(name) not in cfg.layers:
            continue
        pattern = next(p for p in cfg.target_names if re.search(p, name))
        if isinstance(parents.get(name), nn.MultiheadAttention):
            raise ValueError(
                f"target_names pattern {pattern!r} selects {name}, a part of nn.MultiheadAttention, whose forward "
                f"reads its weights directly (F.multi_head_attention_forward) and never calls {name}: an adapter "
                f"there would have no effect; narrow the pattern (e.g. end it with '$')"
            )
        if _holds_weights(module) and not is_adaptable(module):
            why = ("its forward reads in_proj_weight and out_proj.weight directly"
                   if isinstance(module, nn.MultiheadAttention) else f"supported: {ADAPTABLE}")
            raise ValueError(
                f"target_names pattern {pattern!r} selects {name} ({type(module).__name__}), which lora-lite "
                f"cannot adapt ({why}); narrow the pattern (e.g. end it with '$') or exclude it with exclude_names"
            )


def _holds_weights(module: nn.Module) -> bool:
    conv_like = isinstance(module, nn.modules.conv._ConvNd)
    return any(p.dim() == 2 or p.dim() > 3 or (p.dim() == 3 and conv_like) for p in module.parameters(recurse=False))


def _why_unselected(pattern: str, modules: list[tuple[str, nn.Module]], cfg: AdapterConfig) -> str:
    """The error for a target_names pattern that selects no layer: no module matches, only
    modules that cannot be adapted match, or the other filters remove every match."""
    head = f"target_names pattern {pattern!r}"
    matched = [(n, m) for n, m in modules if re.search(pattern, n)]
    if not matched:
        some = [n for n, m in modules if is_adaptable(m)]
        listed = ", ".join(some[:8]) + (f" ... ({len(some)} in all)" if len(some) > 8 else "")
        return (
            f"{head} matches no module of this model (a typo, or a name from another "
            f"architecture); its adaptable layers are: {listed or '(none)'}. For a config shared "
            f"across architectures write the alternatives in one pattern, e.g. r'\\.(q_proj|query)$'"
        )
    linear = [n for n, m in matched if is_adaptable(m)]
    if not linear:
        leaves = [(n, m) for n, m in matched if next(m.children(), None) is None]
        shown = leaves or matched
        found = ", ".join(f"{n} ({type(m).__name__})" for n, m in shown[:5])
        found += f" and {len(shown) - 5} more" if len(shown) > 5 else ""
        if not leaves:  # only blocks matched: the pattern names a container, not its layers
            return (
                f"{head} matches only blocks, not layers: {found}; a pattern is searched in each "
                f"layer's full name, so write e.g. r'attn\\.' to select the layers inside a block"
            )
        return f"{head} matches only modules lora-lite cannot adapt: {found}; supported: {ADAPTABLE}"
    removed = [
        f"{n} (by exclude_names={cfg.exclude_names})" if any(re.search(p, n) for p in cfg.exclude_names)
        else f"{n} (block {layer_index(n)}, not in layers={cfg.layers})"
        for n in linear
    ]
    hint = ("; exclude_names defaults to (r'(^|\\.)lm_head$',): pass exclude_names=() or a narrower "
            "tuple to keep such a layer" if any("exclude_names" in r for r in removed) else "")
    return (
        f"{head} matches {len(linear)} layer(s), but the other filters remove all of them: "
        f"{', '.join(removed[:5])}{hint}"
    )
