"""Adapter configs: one frozen dataclass per variant, validated on construction.

`AdapterConfig` holds the fields every variant reads (targets, dtype, compute policy); a variant
with a rank builds on `RankConfig` (+ `r`), one with a LoRA scale s = alpha / r on
`ScaledConfig` (+ `alpha`), and a variant file adds its own knobs. A config offers only the
fields its variant reads: `IA3Config(r=8)` is an unknown field, not a silent no-op.

Every field carries its documentation (`knob(default, doc)`), and `register` assembles each
config's `__doc__` from those docs, so `help(ll.LoRAConfig)` and IDEs list every field with its
meaning, default and valid values, and the docs cannot drift from the fields.

Configs travel through checkpoints as JSON, so `to_dict`/`from_dict` are exact inverses and
`from_dict` treats its input as untrusted data: unknown fields, wrong types and dtype strings
outside the allow-list raise `ValueError` naming the field, and so does the constructor
(`LoRAConfig(lora_alpha=16)`).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import sys
import textwrap
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

# HF PEFT's config and API names -> (what to use here, or None where there is no counterpart;
# advice). Written once: a config's unknown-field error reads it, and docs/from-peft.md's table is
# checked against it (tests/test_from_peft.py).
PEFT_NAMES: dict[str, tuple[str | None, str]] = {
    "r": ("r", "the same rank"),
    "lora_alpha": ("alpha", "the same scale s = alpha / r"),
    "target_modules": ("target_names", "regexes searched in the full module name: PEFT's "
                       "['q_proj', 'v_proj'] is target_names=(r'(^|\\.)(q_proj|v_proj)$',); 'all-linear' is the "
                       "default target_names=() (every linear-like layer, lm_head excluded)"),
    "exclude_modules": ("exclude_names", "regexes searched in the full module name"),
    "layers_to_transform": ("layers", "block indices, read from the first integer in the module path"),
    "target_parameters": ("target_parameters", "regexes over parameter names (fused MoE experts)"),
    "modules_to_save": ("trainable_modules", "regexes naming base modules that train with the adapter "
                        "and are saved with it"),
    "feedforward_modules": ("feedforward_modules", "IA3Config's regexes for the gates that scale an input"),
    "use_dora": (None, "DoRA is its own config: ll.DoRAConfig(r=..., alpha=...)"),
    "use_rslora": (None, "rsLoRA's scale is lora_alpha / sqrt(r): set alpha = lora_alpha * sqrt(r)"),
    "lora_dropout": ("dropout", "the low-rank branch reads dropout(x) in training mode, as PEFT's does "
                     "(LoRA, DoRA, DeLoRA, EVA)"),
    "init_lora_weights": (None, "each config has one init: LoRAConfig's is PEFT's default (True); a "
                          "data-driven or SVD init (PiSSA, EVA, CorDA) is a variant of its own "
                          "(docs/variants.md)"),
    "rank_pattern": (None, "one config has one rank and scale on every target: attach one config, "
                     "ll.merge it, then attach the next"),
    "alpha_pattern": (None, "one config has one rank and scale on every target: attach one config, "
                      "ll.merge it, then attach the next"),
    "bias": (None, "lora-lite never trains base biases on its own; name the layer in trainable_modules "
             "to train all of its parameters"),
    "lora_bias": (None, "no lora-lite variant adds a bias to lora_B"),
    "fan_in_fan_out": (None, "not needed: transformers' Conv1D (weight stored transposed) is recognised "
                       "by its type"),
    "layers_pattern": (None, "not needed: `layers` reads the first integer in the module path"),
    "task_type": (None, "not needed: the model is not wrapped, its class and forward stay what they were"),
    "inference_mode": (None, "not needed: ll.load gives trainable adapter tensors; freeze them with "
                       "requires_grad_(False) or run under torch.no_grad()"),
    "base_model_name_or_path": (None, "not needed: a checkpoint records fingerprints of the base it was "
                                "trained on and warns on another"),
    "trainable_token_indices": (None, "training embedding rows is not an adapter lora-lite has; name the "
                                "embedding in trainable_modules to train all of it"),
    "layer_replication": (None, "PEFT duplicates base layers, which changes the model itself"),
}


def peft_advice(key: str) -> str:
    """What to use here for PEFT's config field `key` (PEFT_NAMES), as one sentence."""
    ours, why = PEFT_NAMES[key]
    if ours is None:
        return f"{key!r} is PEFT's field, with no counterpart here: {why}"
    return f"PEFT's {key!r} is {ours!r} here ({why})"


# variant name -> config class; filled by `lora_lite.variant.register`.
CONFIGS: dict[str, type[AdapterConfig]] = {}


def knob(default: Any, doc: str, *, per_row: bool = False, **kwargs: Any) -> Any:
    """A config field with its documentation: `help()` of every config lists it (tests require
    one on every field). `per_row` marks a float run-time coefficient that may also hold a
    coefficient tensor (see `coefficient`) while attached; a config holding one is not saved."""
    return field(default=default, metadata={"doc": doc, **({"per_row": True} if per_row else {})}, **kwargs)


def coefficient(c: Any, what: str, device: torch.device | None = None) -> float | torch.Tensor:
    """`c` checked as a run-time coefficient: a finite float (an int is taken as one), or a
    floating-point tensor of shape (batch,) (one value per example) or (batch, seq) (one per
    token) with finite entries, on `device` when one is given. Anything else raises ValueError
    naming `what`. The values are checked here, once (one device sync for a tensor), so the
    hooks need not check them."""
    if isinstance(c, torch.Tensor):
        problem = None
        if device is not None and c.device != device:
            problem = f"is on {c.device}, the adapter on {device}; move it there (c.to({str(device)!r}))"
        elif c.dtype == torch.bool or not c.dtype.is_floating_point:
            problem = f"has dtype {c.dtype}; use a floating-point tensor (e.g. c.float())"
        elif c.ndim not in (1, 2):
            problem = (f"has shape {tuple(c.shape)}; use shape (batch,), one value per example, or "
                       f"(batch, seq), one per token" + ("; for one value for all rows pass a float"
                                                          if c.ndim == 0 else ""))
        elif not c.is_meta and not bool(torch.isfinite(c.detach()).all()):
            problem = "holds NaN or Inf"
        if problem:
            raise ValueError(f"{what}: the coefficient tensor {problem}")
        return c
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c):
        raise ValueError(f"{what}: c must be a finite number or a floating-point tensor of shape (batch,) "
                         f"or (batch, seq), got {c!r}")
    return float(c)


def least(c: float | torch.Tensor) -> float:
    """The smallest value of a coefficient (a float, or a tensor's smallest entry)."""
    return float(c.min()) if isinstance(c, torch.Tensor) else c


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """The fields every variant reads: which layers to adapt, the adapter dtype and the compute
    policy. A variant's config subclasses this (or `RankConfig` / `ScaledConfig`)."""

    variant: str = knob("", "the variant's registry name, set by the class (not an argument); "
                            "`AdapterConfig.from_dict` routes a saved config on it", init=False)
    dtype: torch.dtype = knob(torch.float32, (
        "dtype of the adapter tensors: torch.float32 (default, the fp32 master copy), bfloat16, "
        "float16 or float64, as a torch.dtype or its name ('bfloat16')"))
    compute: Literal["input", "adapter"] = knob("input", (
        "'input': the change is computed in the activation's dtype, casting the small adapter "
        "tensors (AMP-style; a bf16 base keeps bf16 activations for backward); 'adapter': "
        "activations are cast to `dtype` for the adapter math and the change back (more precise "
        "on a low-precision base, more memory)"))
    target_names: tuple[str, ...] = knob((), (
        "regexes (re.search on the full module name): a linear-like module, or an nn.Embedding, "
        "is a candidate if any matches; () = every linear-like module. Each pattern must select "
        "a layer, or attach raises naming it"))
    target_roles: tuple[Literal["reader", "writer", "inner"], ...] = knob((), (
        "keep only targets of these roles: 'reader' (d_model -> other), 'writer' (other -> "
        "d_model), 'inner' (neither); square layers are resolved by name (targets.py); () = no "
        "role filter"))
    target_parameters: tuple[str, ...] = knob((), (
        "regexes over parameter names (PEFT's field of that name): fused 3-D parameters such as "
        "MoE experts (mlp.experts.gate_up_proj, (E, d_out, d_in)) adapted per expert, for "
        "variants that adapt the 'fused' kind; with neither target_names nor target_roles, no "
        "module is a target (PEFT's target_modules=[])"))
    exclude_names: tuple[str, ...] = knob((r"(^|\.)lm_head$",), (
        "regexes (re.search) that remove candidates; the default keeps the LM head out"))
    layers: tuple[int, ...] | None = knob(None, (
        "block indices to keep, read from the first integer in the module path "
        "(model.layers.3.mlp -> 3); None = every block"))
    trainable_modules: tuple[str, ...] = knob((), (
        "regexes naming base modules (a classifier head, an embedding) whose parameters train "
        "with the adapter (PEFT's modules_to_save): save stores them, load restores them, "
        "detach puts the attach-time values back"))

    def __new__(cls, *args, **kwargs):
        # Runs before the dataclass __init__, which would raise TypeError for an unknown keyword:
        # configs are often written from memory (PEFT's lora_alpha), so name it and the valid ones.
        if args:
            raise ValueError(f"{cls.__name__} takes keyword arguments only, got {len(args)} positional")
        settable = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        for key in kwargs:
            if key not in settable:
                # a PEFT name that is ours too (r, target_parameters) has nothing to translate
                hint = f"; {peft_advice(key)}" if PEFT_NAMES.get(key, (key,))[0] != key else ""
                raise ValueError(f"{cls.__name__}: unknown field {key!r}{hint}; valid fields: {settable}")
        return super().__new__(cls)

    @classmethod
    def _variant_name(cls) -> str:
        return cls.__dataclass_fields__["variant"].default

    def __post_init__(self) -> None:
        if type(self) is AdapterConfig or self.variant not in CONFIGS:
            raise TypeError(
                f"{type(self).__name__} is not a registered variant config; "
                f"use one of {sorted(CONFIGS)} (e.g. LoRAConfig)"
            )
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("per_row"):  # a finite float, or a coefficient tensor
                object.__setattr__(self, f.name, coefficient(value, f"{type(self).__name__}.{f.name}"))
                continue
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
        if isinstance(self, _Rank) and self.r < 1:
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: dtypes become their names, tuples become lists. A field holding a
        coefficient tensor (a run-time setting, `knob(per_row=True)`) raises ValueError."""
        out: dict[str, Any] = {"variant": self.variant}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                raise ValueError(
                    f"{type(self).__name__}.{f.name} holds a coefficient tensor of shape {tuple(value.shape)}, "
                    f"a setting for the batch at hand that a saved config cannot hold; set a float first "
                    f"(lora_lite.reconfigure(model, {f.name}=1.0))"
                )
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
        return cls(**{k: v for k, v in d.items() if k != "variant"})  # the constructor validates every field (dtype names included)


# r and alpha live in two small mixins listed after AdapterConfig: dataclasses order fields along
# the reversed MRO, so they come first in the signature and in to_dict, as PEFT users expect.
@dataclass(frozen=True, kw_only=True)
class _Rank:
    r: int = knob(8, "rank of the adapter's change: an int >= 1, at most min(d_in, d_out) of every "
                     "target (attach checks)")


@dataclass(frozen=True, kw_only=True)
class _Scale(_Rank):
    alpha: float = knob(16.0, "LoRA scale numerator: the change is scaled by s = alpha / r (PEFT's "
                              "lora_alpha; its rsLoRA lora_alpha/√r is alpha = lora_alpha·√r); any "
                              "float, alpha = 2r is common")

    @property
    def scale(self) -> float:
        """LoRA scale s = alpha / r."""
        return self.alpha / self.r


@dataclass(frozen=True, kw_only=True)
class RankConfig(AdapterConfig, _Rank):
    """The fields every variant reads plus the rank r, for variants whose tensors have a rank."""


@dataclass(frozen=True, kw_only=True)
class ScaledConfig(AdapterConfig, _Scale):
    """The fields every variant reads plus r and alpha, for variants scaled by s = alpha / r."""


SHARED = (AdapterConfig, RankConfig, ScaledConfig)
_SUMMARIES: dict[type, str] = {}


def field_doc(cls: type[AdapterConfig], name: str) -> str | None:
    """The doc of field `name`: from the most derived class that documents it (a subclass may
    redefine a field's default alone and keep its base's doc)."""
    for klass in cls.__mro__:
        f = vars(klass).get("__dataclass_fields__", {}).get(name)
        if f is not None and "doc" in f.metadata:
            return f.metadata["doc"]
    return None


def document(cls: type[AdapterConfig]) -> None:
    """Set `cls.__doc__` to its summary and every field: type, default, doc, and for a shared
    field which registered variants read it. `register` calls this for every config."""
    if cls not in _SUMMARIES:
        own = vars(cls).get("__doc__") or ""
        if own.startswith(cls.__name__ + "("):  # the dataclass's signature stand-in: no docstring
            module = sys.modules.get(cls.__module__)
            own = ((module.__doc__ or "").strip().split("\n\n")[0] if module else "") or cls.__name__
            own += f"\n\nThe method, its equations and tensors: help({cls.__module__})."
        _SUMMARIES[cls] = inspect.cleandoc(own)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    common = [f for f in fields if f.name in AdapterConfig.__dataclass_fields__]
    lines = [_SUMMARIES[cls]]
    if len(common) < len(fields):
        lines += ["", "Fields (keyword arguments; to_dict / AdapterConfig.from_dict for JSON):"]
        lines += [line for f in fields if f not in common for line in _field_lines(cls, f)]
    lines += ["", "Fields every variant reads (targets, dtype, compute policy):"]
    for f in common:
        lines += _field_lines(cls, f)
    variant = cls._variant_name()
    if variant:
        lines += ["", f"variant = {variant!r}: {field_doc(cls, 'variant')}."]
    cls.__doc__ = "\n".join(lines)


def _field_lines(cls: type[AdapterConfig], f: dataclasses.Field) -> list[str]:
    tp = f.type if isinstance(f.type, str) else _type_name(f.type)
    doc = field_doc(cls, f.name) or "(undocumented)"
    if f.name in _Scale.__dataclass_fields__:
        readers = sorted(n for n, c in CONFIGS.items() if f.name in c.__dataclass_fields__)
        others = sorted(set(CONFIGS) - set(readers))
        doc += (f". Shared: every variant but {', '.join(others)} reads it" if len(others) < len(readers)
                else f". Shared by {', '.join(readers)}")
    body = textwrap.wrap(doc, 92, initial_indent="    ", subsequent_indent="    ",
                         break_on_hyphens=False, break_long_words=False)
    return [f"{f.name}: {tp} = {f.default!r}", *body]


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
