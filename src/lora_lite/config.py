"""Adapter configs: one frozen dataclass per variant, validated on construction.

`AdapterConfig` holds the fields every variant shares; a variant file subclasses it and adds its
own knobs. Configs travel through checkpoints as JSON, so `to_dict`/`from_dict` are exact
inverses and `from_dict` treats its input as untrusted data: unknown fields, wrong types and
dtype strings outside the allow-list raise `ValueError` naming the field, and so does the
constructor (`LoRAConfig(lora_alpha=16)`).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

# dtype strings accepted in configs and checkpoint metadata. Never `getattr(torch, s)`.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# variant name -> config class; filled by `lora_lite.variant.register`.
CONFIGS: dict[str, type[AdapterConfig]] = {}


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """Fields shared by every variant.

    r, alpha     rank and LoRA scale numerator (s = alpha / r); variants that ignore them say so.
    dtype        dtype of the adapter tensors (the fp32 master copy by default); a torch.dtype
                 or its name ("bfloat16").
    compute      "input" (default): the adapter's change is computed in the activation's dtype,
                 casting the small adapter tensors (AMP-style; a bf16 base keeps bf16 activations
                 for backward); "adapter": activations are cast to `dtype` for the adapter math
                 and the change back (more precise on a low-precision base, more memory).
    target_names regexes; a linear-like module is a candidate if any matches its full name.
    target_roles subset of {"reader", "writer", "inner"} (see targets.py); empty = no role filter.
    target_parameters  regexes over parameter names (PEFT's field of that name): fused
                 parameters such as MoE experts (`mlp.experts.gate_up_proj`, (E, d_out, d_in))
                 adapted per expert, for variants that adapt the "fused" kind (kinds.py). With
                 target_parameters and neither target_names nor target_roles, no module is a
                 target (as PEFT's target_modules=[]).
    exclude_names regexes that remove candidates (default: the LM head).
    layers       block indices (the first integer in the module path) to keep; None = all.
    trainable_modules  regexes naming base modules (a classifier head, an embedding) whose
                 parameters train with the adapter (PEFT's modules_to_save): save stores them,
                 load restores them, detach puts the attach-time values back.
    """

    variant: str = field(default="", init=False)
    r: int = 8
    alpha: float = 16.0
    dtype: torch.dtype = torch.float32
    compute: Literal["input", "adapter"] = "input"
    target_names: tuple[str, ...] = ()
    target_roles: tuple[Literal["reader", "writer", "inner"], ...] = ()
    target_parameters: tuple[str, ...] = ()
    exclude_names: tuple[str, ...] = (r"(^|\.)lm_head$",)
    layers: tuple[int, ...] | None = None
    trainable_modules: tuple[str, ...] = ()
    # {old name: name} of fields renamed since a release; `from_dict` (saved configs) maps them
    renamed_fields: ClassVar[dict[str, str]] = {}

    def __new__(cls, *args, **kwargs):
        # Runs before the dataclass __init__, which would raise TypeError for an unknown keyword:
        # configs are often written from memory (PEFT's lora_alpha), so name it and the valid ones.
        if args:
            raise ValueError(f"{cls.__name__} takes keyword arguments only, got {len(args)} positional")
        settable = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        for key in kwargs:
            if key not in settable:
                raise ValueError(f"{cls.__name__}: unknown field {key!r}; valid fields: {settable}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        if type(self) is AdapterConfig or self.variant not in CONFIGS:
            raise TypeError(
                f"{type(self).__name__} is not a registered variant config; "
                f"use one of {sorted(CONFIGS)} (e.g. LoRAConfig)"
            )
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):  # accept lists where tuples are expected
                value = tuple(value)
                object.__setattr__(self, f.name, value)
            if hints[f.name] is torch.dtype and not isinstance(value, torch.dtype):
                if not isinstance(value, str) or value not in DTYPES:
                    raise ValueError(
                        f"{type(self).__name__}.{f.name}: unknown dtype {value!r}; allowed: {sorted(DTYPES)}"
                    )
                value = DTYPES[value]
                object.__setattr__(self, f.name, value)
            takes_float = hints[f.name] is float or float in typing.get_args(hints[f.name])
            if isinstance(value, int) and not isinstance(value, bool) and takes_float:
                value = float(value)
                object.__setattr__(self, f.name, value)
            if not _matches(value, hints[f.name]):
                raise ValueError(
                    f"{type(self).__name__}.{f.name}: expected {_type_name(hints[f.name])}, "
                    f"got {value!r}"
                )
        if self.r < 1:
            raise ValueError(f"{type(self).__name__}.r: must be >= 1, got {self.r}")
        for fname in ("target_names", "target_parameters", "exclude_names", "trainable_modules"):
            for pattern in getattr(self, fname):
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ValueError(
                        f"{type(self).__name__}.{fname}: invalid regex {pattern!r}: {e}"
                    ) from None
        self.check()

    def check(self) -> None:
        """Variant-specific field checks; override in subclasses (raise ValueError)."""

    @property
    def scale(self) -> float:
        """LoRA scale s = alpha / r."""
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: dtypes become their names, tuples become lists."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.dtype):
                value = _DTYPE_NAMES[value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AdapterConfig:
        """Inverse of `to_dict`; routes on d["variant"] and validates every field."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a dict, got {type(d).__name__}")
        name = d.get("variant")
        if name not in CONFIGS:
            raise KeyError(f"unknown variant {name!r}; registered: {sorted(CONFIGS)}")
        cls = CONFIGS[name]
        kwargs = {cls.renamed_fields.get(k, k): v for k, v in d.items() if k != "variant"}
        return cls(**kwargs)  # the constructor validates every field (dtype names included)


def _matches(value: Any, tp: Any) -> bool:
    """Whether `value` is an instance of the annotation `tp` (the subset configs use)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(_matches(v, a) for v, a in zip(value, args))
    if tp is type(None):
        return value is None
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, float)
    return isinstance(value, tp)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
