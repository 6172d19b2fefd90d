"""A PEFT config (a `peft.LoraConfig`-like object or its dict) as the lora-lite config that
trains the same adapter: `from_peft_config`.

The method, rank and scale go through the same map `import_peft` reads (each variant's
`PeftMap.imports`, and the same refusals, `importers`); what selects layers is translated from
PEFT's matching rules to our regexes. PEFT matches a list entry `k` against a module name `n`
when n == k or n ends with "." + k, and a string with re.fullmatch (`peft/tuners/tuners_utils.py`,
`check_target_module_exists`); "all-linear" is every linear layer but the output layer, our
default targets.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

from ..config import PEFT_NAMES, AdapterConfig, peft_advice
from ..variant import REGISTRY
from .peft import importers

# PEFT fields that select modules or parameters, with the one of ours that holds the same selection
# (PEFT_NAMES); the variant's config must have that field for the selection to be kept.
_SELECTORS = ("target_modules", "exclude_modules", "modules_to_save", "feedforward_modules", "target_parameters")
# Settings only a training config has to reproduce (a saved adapter's tensors make them moot).
_TRAINING = ("init_lora_weights", "rank_pattern", "alpha_pattern")
_WHERE = "from_peft_config"


def from_peft_config(config: Any) -> AdapterConfig:
    """The lora-lite config that trains what a PEFT config `config` would: a PEFT config object
    (`peft.LoraConfig(...)`, `IA3Config`, ...) or its dict (`config.to_dict()`, a saved
    adapter_config.json). Raises ValueError naming the PEFT option for whatever lora-lite cannot
    reproduce (the messages `import_peft` gives); warns when `lora_dropout` is set for a variant
    without a dropout field.

    >>> import lora_lite as ll
    >>> ll.from_peft_config({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    LoRAConfig(r=8, alpha=16.0, ..., target_names=('(^|\\\\.)(q_proj|v_proj)$',), ...)
    """
    conf = _as_dict(config)
    candidates = importers(_WHERE, conf, also=_SELECTORS + _TRAINING)
    for key in _TRAINING:
        value = conf.get(key)
        if key == "init_lora_weights" and value in (None, True) or key != "init_lora_weights" and not value:
            continue
        raise ValueError(f"{_WHERE}: PEFT option {key}={value!r} is not supported: {PEFT_NAMES[key][1]}")
    r = conf.get("r", 8)
    for variant in candidates:  # a config has no saved tensors: every dim a variant reads is the rank
        m = REGISTRY[variant].peft
        fields = m.imports(conf, "", {ours: (r, r) for ours, _, _ in m.tensors})
        if fields is not None:
            break
    else:
        raise ValueError(f"{_WHERE}: no lora-lite variant reads this {conf.get('peft_type')} config")
    cls = REGISTRY[variant].config
    dropout = conf.get("lora_dropout") or 0.0
    if dropout and "dropout" not in cls.__dataclass_fields__:
        warnings.warn(f"{_WHERE}: lora_dropout={dropout} is not applied: {cls.__name__} has no dropout field",
                      stacklevel=2)
    fields = {**fields, **_targeting(conf)}
    return AdapterConfig.from_dict({"variant": variant, **{k: v for k, v in fields.items()
                                                          if k in cls.__dataclass_fields__}})


def _as_dict(config: Any) -> dict:
    if not isinstance(config, dict):
        if not callable(getattr(config, "to_dict", None)):
            raise ValueError(f"{_WHERE}: expected a PEFT config or its dict, got {type(config).__name__}")
        config = config.to_dict()
    # PEFT's objects hold sets of names and an enum of the method; its JSON, lists and strings
    return {k: sorted(v) if isinstance(v, set) else getattr(v, "value", v) for k, v in config.items()}


def _targeting(conf: dict) -> dict:
    """Our target_names / exclude_names / layers / trainable_modules / ... from PEFT's selectors."""
    targets = conf.get("target_modules")
    if targets is None and not conf.get("target_parameters"):
        raise ValueError(f"{_WHERE}: target_modules=None (PEFT's per-model-type default targets); name the "
                         f"modules, e.g. target_modules=['q_proj', 'v_proj'], or 'all-linear'")
    out: dict[str, Any] = {}
    if targets == "all-linear":
        out["target_names"] = ()
    elif targets is not None:
        out["target_names"] = _patterns(targets)
    if targets != "all-linear" or conf.get("exclude_modules"):
        out["exclude_names"] = _patterns(conf.get("exclude_modules") or [])
    layers = conf.get("layers_to_transform")
    if layers is not None:
        out["layers"] = (layers,) if isinstance(layers, int) else tuple(layers)
    for key in ("modules_to_save", "feedforward_modules", "target_parameters"):
        if conf.get(key):
            out[PEFT_NAMES[key][0]] = _patterns(conf[key])
    return out


def _patterns(names: str | list[str]) -> tuple[str, ...]:
    """PEFT's module selection as our regexes (re.search on the full name): a list of names, each
    the whole name or its last dotted parts; a string, a regex the whole name must match."""
    if isinstance(names, str):
        return (f"^(?:{names})$",)
    if not names:
        return ()
    return (r"(^|\.)(" + "|".join(re.escape(n) for n in names) + ")$",)



def names_table() -> str:
    """PEFT_NAMES as the markdown table docs/from-peft.md shows (a test keeps them equal)."""
    rows = ["| PEFT | lora-lite | |", "|---|---|---|"]
    for key, (ours, why) in PEFT_NAMES.items():
        rows.append(f"| `{key}` | {f'`{ours}`' if ours else '—'} | {why.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


__all__ = ["from_peft_config", "names_table"]
