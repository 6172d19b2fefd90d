"""The variant protocol: what a variant declares, and the registry the runtime reads.

A variant is a class of static functions (math only; no hooks, no model walking, no I/O):

    param_specs(d_in, d_out, cfg) -> {name: ParamSpec}   tensors to create, names start "lora_"
    validate(layer, cfg)                                 optional; raise before anything mutates
    validate_targets(names, cfg)                         optional; the same, over all target names
    advise(layers, cfg)                                  optional; once per attach, all targets:
                                                         warn about a config known to train badly
    init(layer, cfg, stats)                              optional; fill tensors from W / stats
    init_shared(shared, cfg)                             optional; fill the tensors shared by all
                                                         targets (ParamSpec shared=True), once
    delta(layer, cfg, x, y) -> Δy                        output hook: the layer returns y + Δy
                                                         (Δy / s with scale_outside, below), or
    delta_input(layer, cfg, x) -> Δx                     input pre-hook: the layer runs on x + Δx
    gate(layer, cfg) -> g                                optional, for a delta (delta_input) that is
                                                         y ⊙ (g − 1) (x ⊙ (g − 1)): the hook applies
                                                         t ⊙ (1 + c·(g − 1)), t ⊙ g at c = 1, as one
                                                         product (see `gated` in runtime.py)
    effective_weight(layer, cfg) -> (W_eff, b_eff)       closed form of the adapted layer
    low_rank_delta(layer, cfg) -> (B, A) | None          W_eff − W = B A when that is low-rank
                                                         and b_eff = b (exported as a plain LoRA)
    hold(factors) -> (config fields, tensors)            optional, on the one variant that holds any
                                                         change: {target: (B, A)} -> the fields and
                                                         {target: {tensor: value}} with W_eff = W + B A
                                                         (ll.combine writes its result this way)
    delta_embedding(layer, cfg, ids, y) -> Δy            output hook of an nn.Embedding target:
                                                         the input is token ids (see kinds below)
    delta_conv(layer, cfg, x, y) -> Δy                   output hook of a conv target: x an image
                                                         (N, C_in, *spatial), Δy (N, C_out, *spatial)
    at_target(name, cfg) -> variant class                optional placement per target (below)

Layer kinds (kinds.py). W is always the dense (d_out, d_in) matrix `dense_weight(layer)`, so
the math above holds on every kind; what differs is the input of an embedding: token ids, i.e.
x = onehot(ids) and x Aᵀ = embed(ids, Aᵀ). A variant lists the kinds it adapts:

    kinds               default ("linear", "conv1d"); add "embedding" together with
                        `delta_embedding`, and "fused" (a 3-D parameter of E experts) when
                        `low_rank_delta` computes B A from the adapter tensors alone with
                        batched matmuls: on a fused target every tensor gets a leading expert
                        dimension (ParamSpec shape (E, ...), each slice initialised as one
                        tensor) and the runtime adds scale·B A to the parameter for the owner's
                        forward; "conv" (nn.Conv1d/2d/3d, W the dense view (C_out,
                        C_in/groups·kernel)) together with `delta_conv`, or a `gate` (broadcast
                        over the channel dimension). Attach refuses any other kind, naming the
                        variant, the module and the kinds the variant adapts.

Placement. A method may act differently on different targets: IA3 gates the *outputs* of k/v
and the *input* of the FFN down-projection, in one adapter. `at_target(name, cfg)` returns the
variant class whose per-layer functions apply at target `name` (default: the class itself); the
runtime, checkpoint load, merge, interop and tests read param_specs, validate, init, delta or
delta_input (so the hook kind), effective_weight, low_rank_delta, params_per_layer, the PEFT
tensor layout (`peft.tensors`) and the per-layer flags (uses_rank, needs_dense_weight) from that
class, and everything else (config, calibration, identity and gradient declarations,
runtime_fields, examples, the PEFT config and import, the registry entry) from the registered
variant. The returned class must take the registered variant's config.

Every variant is additive: it returns the *change* of the layer's output (or input), and the
base weight is read, never written. The runtime adds the change, so `ll.scaled(model, c)` is
y + c·Δy and `ll.disabled(model)` skips the call. The change is computed in the dtype of the
activation it is added to: a variant casts its (small) tensors with `like(x, t)` rather than
casting the activations, and does the parts that need fp32 (norms, inverses, solves, gates
near 1 written as g − 1) in fp32 before that cast.

Class attributes say what the runtime must check or provide:

    uses_rank           r is a rank: runtime requires 1 <= r <= min(d_in, d_out) (config: RankConfig)
    wide_ranks          r may exceed min(d_in, d_out) too: the math holds for any r (B A is then
                        a full-rank-capable product; PEFT's default r = 8 on a 2-wide head)
    needs_dense_weight  reads W through quant.dense_weight (SVD, norms): nn.Linear or a
                        quantized linear that dense_weight dequantizes
    calibration         None | "gram" | "diag": input statistics the runtime collects
    requires_calibration  attach refuses without calibration data
    (override `calibration_needs(cfg)` when a config knob decides both)
    identity_at_init    the adapted model equals the base at init (Δ = 0)
    zero_grad_at_init   trainable tensors whose gradient is zero at step 0 by design
                        (LoRA's A while B = 0); every other trainable gets a gradient
    runtime_fields      config fields that `lora_lite.reconfigure` may change while attached;
                        one declared `knob(..., per_row=True)` may hold a coefficient tensor
                        ((batch,) or (batch, seq)), which the math reads as `per_row(value, x)`
    scale_outside       delta returns Δy / s (s = cfg.scale, LoRA's alpha / r) and the output
                        hook applies s inside its one add, y.add(Δ, alpha=s·scale): a kernel and
                        an autograd node fewer per call; `change(layer, cfg, x, y)` is Δy either way
                        (config: ScaledConfig, which has alpha and s)

What the rest of the code would otherwise list by variant name is declared here too, and read
from the registry (interop, the generic test suites, the benchmark):

    identity_tol        {base dtype: max |y − y_base| / max |y_base| at init}; absent = bit for bit
    neutral             tensors to zero for an exact identity when identity_at_init is False
    peft                PeftMap: the same function as an HF PEFT method (tensor map, config
                        fields, import); None = no counterpart (export goes through low_rank_delta)

Optional declarations for the test suites and the benchmark (`register` fills the defaults, so
a new variant needs none of them to attach, save, merge and export):

    params_per_layer(d_in, d_out, cfg)  trainable parameters per target, as the paper counts them
                        (tests compare it with what attach creates); default: None = not stated
    examples            {case name: Example}: small configs every generic suite runs; default:
                        one case named after the variant with the config's defaults
    bench               BenchSetting: the benchmark's lr grid, knobs and analytic MACs; default:
                        BenchSetting() (see its fields' defaults)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import CONFIGS, SHARED, AdapterConfig, document, field_doc
from .kinds import KINDS, bias
from .quant import dense_weight

INITS = ("zeros", "ones", "near_zero", "near_one", "kaiming")


@dataclass(frozen=True)
class ParamSpec:
    """One adapter tensor. `init` is a name from INITS or a callable filling the tensor in place;
    None leaves the values to whoever fills them (the attach state keeps its specs so, once the
    tensors exist: a callable may be a closure, which a whole-model `torch.save` cannot pickle).

    Trainable specs become `nn.Parameter`s; frozen ones become persistent buffers when
    `as_buffer` (the default for frozen tensors) or frozen parameters otherwise.

    `shared`: one tensor for the whole adapter instead of one per target (VeRA's random
    projections). Every target declares the shape it reads; the runtime creates one tensor of
    the elementwise largest shape, initialised once (`init`, then the variant's `init_shared`),
    and registers that same `nn.Parameter` on every target (as tied weights are), so the math
    reads it as `layer.<name>`, sliced to its own leading block, and `.to()`, `copy.deepcopy`
    and `torch.save` keep one tensor. A checkpoint stores it once.
    """

    shape: tuple[int, ...]
    init: str | Callable[[torch.Tensor], object] | None = "zeros"
    trainable: bool = True
    as_buffer: bool | None = None
    shared: bool = False

    def __post_init__(self) -> None:
        if self.init is not None and not callable(self.init) and self.init not in INITS:
            raise ValueError(f"ParamSpec.init: unknown init {self.init!r}; use one of {INITS}")
        if self.trainable and self.as_buffer:
            raise ValueError("ParamSpec: a trainable tensor cannot be a buffer")
        if self.shared and self.as_buffer:
            raise ValueError("ParamSpec: a shared tensor is one Parameter tied across targets, not a buffer")

    @property
    def is_buffer(self) -> bool:
        if self.shared:  # module buffers are converted per module by .to(); a tied Parameter stays one
            return False
        return (not self.trainable) if self.as_buffer is None else self.as_buffer


@torch.no_grad()
def init_tensor(t: torch.Tensor, init: str | Callable[[torch.Tensor], object] | None) -> None:
    """Fill `t` in place according to a ParamSpec init."""
    if init is None:
        return
    if callable(init):
        init(t)
    elif init == "zeros":
        t.zero_()
    elif init == "ones":
        t.fill_(1.0)
    elif init == "near_zero":
        t.normal_(0.0, 1e-4)
    elif init == "near_one":
        t.normal_(1.0, 1e-4)
    elif t.dim() >= 2:  # kaiming_uniform_(a=sqrt(5)): U(+-1/sqrt(fan_in)), fan_in = shape[1]
        nn.init.kaiming_uniform_(t, a=math.sqrt(5))
    else:
        t.normal_(0.0, 0.02)


class Variant:
    """Defaults of the protocol; a variant subclasses this and overrides what it needs."""

    name: ClassVar[str]
    config: ClassVar[type[AdapterConfig]]
    uses_rank: ClassVar[bool] = True
    wide_ranks: ClassVar[bool] = False
    needs_dense_weight: ClassVar[bool] = False
    calibration: ClassVar[str | None] = None
    requires_calibration: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True
    zero_grad_at_init: ClassVar[tuple[str, ...]] = ()
    runtime_fields: ClassVar[tuple[str, ...]] = ()
    scale_outside: ClassVar[bool] = False
    identity_tol: ClassVar[dict] = {}
    neutral: ClassVar[tuple[str, ...]] = ()
    examples: ClassVar[dict]
    peft: ClassVar[PeftMap | None] = None
    bench: ClassVar[BenchSetting]
    params_per_layer: ClassVar[Callable[[int, int, AdapterConfig], int] | None] = None
    kinds: ClassVar[tuple[str, ...]] = ("linear", "conv1d")

    delta: ClassVar[Callable | None] = None
    delta_input: ClassVar[Callable | None] = None
    gate: ClassVar[Callable | None] = None
    delta_embedding: ClassVar[Callable | None] = None
    hold: ClassVar[Callable | None] = None
    delta_conv: ClassVar[Callable | None] = None

    @staticmethod
    def param_specs(d_in: int, d_out: int, cfg: AdapterConfig) -> dict[str, ParamSpec]:
        raise NotImplementedError

    @staticmethod
    def validate(layer: nn.Module, cfg: AdapterConfig) -> None:
        """Raise ValueError/TypeError if this layer cannot take the adapter."""

    @staticmethod
    def validate_targets(names: list[str], cfg: AdapterConfig) -> None:
        """Raise ValueError if the selected targets (full names, model order) cannot take the
        adapter as a whole, e.g. a per-target pattern in the config that matches none of them."""

    @staticmethod
    def advise(layers: dict[str, nn.Module], cfg: AdapterConfig) -> None:
        """Warn (never raise, never mutate) when `cfg` will attach to these layers {name: layer}
        but is measured to train badly there. Runs once per attach, after every layer validated,
        so one warning can summarise all targets; load and PEFT import do not call it."""

    @staticmethod
    def init(layer: nn.Module, cfg: AdapterConfig, stats: dict | None) -> None:
        """Fill tensors that depend on W or on calibration statistics (ParamSpec inits ran)."""

    @staticmethod
    def init_shared(shared: dict[str, torch.Tensor], cfg: AdapterConfig) -> None:
        """Fill the shared tensors {name: tensor} (ParamSpec shared=True) once per attach, after
        their ParamSpec inits ran and before any per-target `init`."""

    @classmethod
    def change(cls, layer: nn.Module, cfg: AdapterConfig, x: torch.Tensor, y: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Δy (output hook) or Δx (input pre-hook) at strength 1, as the hook adds it."""
        if cls.delta_input is not None:
            return cls.delta_input(layer, cfg, x)
        d = cls.delta(layer, cfg, x, y)
        return d * cfg.scale if cls.scale_outside else d

    @classmethod
    def calibration_needs(cls, cfg: AdapterConfig) -> tuple[str | None, bool]:
        """(statistic the runtime collects or None, whether data is required) for this config."""
        return cls.calibration, cls.requires_calibration

    @classmethod
    def effective_weight(
        cls, layer: nn.Module, cfg: AdapterConfig
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W_eff, b_eff) in fp32. Default: W + B A from `low_rank_delta` (bias unchanged);
        a variant whose change is not low-rank overrides this."""
        factors = cls.low_rank_delta(layer, cfg)
        if factors is None:
            raise NotImplementedError(f"{cls.__name__} defines neither effective_weight nor low_rank_delta")
        B, A = factors
        return dense_weight(layer) + B @ A, bias(layer)

    @classmethod
    def at_target(cls, name: str, cfg: AdapterConfig) -> type[Variant]:
        """The variant class whose per-layer functions apply at target `name` (see Placement)."""
        return cls

    @staticmethod
    def low_rank_delta(layer: nn.Module, cfg: AdapterConfig) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B (d_out, k), A (k, d_in)) in fp32 with W_eff − W = B A and b_eff = b, or None when
        the change is not low-rank (or moves the bias)."""
        return None


def like(ref: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The tensors in `ref`'s dtype (a no-op when they already are): adapter math runs in the
    activation's precision by casting the small adapter tensors, never the activations."""
    out = tuple(t if t.dtype == ref.dtype else t.to(ref.dtype) for t in tensors)
    return out[0] if len(out) == 1 else out


def per_row(c: float | torch.Tensor, t: torch.Tensor | None, dtype: torch.dtype | None = None
            ) -> float | torch.Tensor:
    """A run-time coefficient ready to multiply `t` (or a tensor that broadcasts with it): a
    float as it is; a (batch,) or (batch, seq) coefficient tensor in `dtype` (default t's),
    viewed as (batch, 1, …) or (batch, seq, 1, …) with t's number of dimensions, so it
    broadcasts over every other dimension of t (hidden, or a variant's (…, r) coordinates).
    The hook checked that t's leading dimensions are c's shape. t = None is a closed form (one
    weight for every input: effective_weight, low_rank_delta, merge, export), which a tensor
    cannot give: ValueError."""
    if not isinstance(c, torch.Tensor):
        return c
    if t is None:
        raise ValueError(
            f"a coefficient tensor of shape {tuple(c.shape)} (one value per example or per token) has no "
            f"single weight, which merge, export and the closed forms need; use a float coefficient there"
        )
    c = c if c.dtype == (dtype or t.dtype) else c.to(dtype or t.dtype)
    return c.view(*c.shape, *(1,) * (t.ndim - c.ndim))


def straight_through_clamp(t: torch.Tensor, lo: float | None = None, hi: float | None = None) -> torch.Tensor:
    """clamp(t, lo, hi) in the forward (exactly), identity in the backward: a value pushed past
    a bound keeps its gradient and can come back, where a plain clamp would zero it for good."""
    return t.clamp(lo, hi).detach() + (t - t.detach())


@dataclass(frozen=True)
class Example:
    """A small configuration of a variant that the generic test suites run (identity, reload,
    detach, merge, PEFT parity, compile, properties): `fields` are config fields (targets are
    added by the suite); `calibrate` passes calibration data when the config takes it; a case
    with `minilm=False` runs on the tiny decoder only (it changes only hook math that another
    case of the variant already runs on both models)."""

    fields: dict
    calibrate: bool = True
    minilm: bool = True


@dataclass(frozen=True)
class PeftMap:
    """How a variant is the same function as an HF PEFT (0.21, 0.22) method.

    method    PEFT's peft_type ("LORA", "DELORA", "HRA", "IA3", "ROAD")
    tensors   ((our tensor, its path in PEFT's layer for adapter "default", layout), ...); layout
              None = same shape, "T" = transposed, "col"/"row" = a (d, 1) / (1, d) view, "1" =
              shape (1,) for our scalar
    config    (cfg, target names) -> PEFT config fields of the same method, rank and scale
    export    True: export_peft writes this PEFT method (tensors copied); False: parity only
              (PiSSA: PEFT's base holds a residual), export goes through low_rank_delta
    imports   (PEFT config dict, target name, {our tensor: PEFT shape} at that target) -> our
              config fields when a saved PEFT adapter is this variant there, else None (every
              target must give the same fields); None = never imported as this variant
    reads     the PEFT config fields `imports` interprets (any other non-default field that
              changes the function is refused on import)
    combine   ({target: fields from `imports`}) -> one config's fields, when the targets' fields
              differ because the variant places differently per target (IA3's
              feedforward_modules); None = differing fields are refused
    base      (target layer, cfg) -> the weight (d_out, d_in), fp32, that PEFT's base layer holds
              under this adapter when PEFT's init rewrites it (PiSSA: W − s·B0 A0); `copy_to_peft`
              writes it. None = PEFT leaves the pristine W
    shared    ((our shared tensor, PEFT's model-level name), ...): tensors PEFT keeps once on its
              tuner (VeRA's vera_A / vera_B, `base_model.<name>` in the saved file), same layout
    kinds     the layer kinds PEFT's method adapts; None = interop's table for the method
              (`PEFT_KINDS`: nn.Linear only unless listed)
    """

    method: str
    tensors: tuple[tuple[str, str, str | None], ...]
    config: Callable[[AdapterConfig, list[str]], dict]
    export: bool = True
    imports: Callable[[dict, str, dict], dict | None] | None = None
    reads: tuple[str, ...] = ()
    combine: Callable[[dict[str, dict]], dict] | None = None
    base: Callable[[Any, AdapterConfig], Any] | None = None
    shared: tuple[tuple[str, str], ...] = ()
    kinds: tuple[str, ...] | None = None


# The quality benchmark's learning-rate grid for a variant that states none: LoRA's range.
DEFAULT_LRS = (1e-4, 3e-4, 1e-3, 3e-3)


@dataclass(frozen=True)
class BenchSetting:
    """The benchmark's default setting of a variant (lora_bench reads it; the library never does).

    lrs     the learning rates the quality benchmark sweeps for this variant
    knobs   (rank, geometry) -> config fields; geometry has min_dim (the smallest target side)
            and out_gcd (gcd of the targets' d_out). Default: {"r": rank} when the config has r,
            else {}
    macs    (d_in, d_out, cfg) -> (added MACs per token, added MACs per forward call). Default:
            one MAC per adapter tensor value per token (`param_specs`), nothing per call
    peft    the benchmark's PEFT row for the same method (a PEFT_ROWS key of lora_bench), or None
    family  rows with the same family share one lr choice in the sweep (a row and its PEFT
            twin, or methods with the same update geometry); default: the variant's own name
    """

    lrs: tuple[float, ...] = DEFAULT_LRS
    knobs: Callable[[int, object], dict] | None = None
    macs: Callable[[int, int, AdapterConfig], tuple[int, int]] | None = None
    peft: str | None = None
    family: str | None = None

    def __post_init__(self) -> None:
        lrs = self.lrs
        if not (isinstance(lrs, (tuple, list)) and lrs and all(isinstance(v, (int, float)) and v > 0 for v in lrs)
                and list(lrs) == sorted(set(lrs))):
            raise ValueError(f"BenchSetting.lrs must be ascending distinct positive learning rates, got {lrs!r}")


def _bench_defaults(cls: type[Variant]) -> BenchSetting:
    """`cls.bench` (or BenchSetting()) with every unstated field derived from the variant."""
    s = getattr(cls, "bench", None) or BenchSetting()
    has_r = "r" in cls.config.__dataclass_fields__

    def knobs(rank, geom):
        return {"r": rank} if has_r else {}

    def macs(d_in, d_out, cfg):
        return sum(math.prod(p.shape) for p in cls.param_specs(d_in, d_out, cfg).values()), 0

    return dataclasses.replace(s, lrs=tuple(s.lrs), knobs=s.knobs or knobs, macs=s.macs or macs,
                               family=s.family or cls.name)


REGISTRY: dict[str, type[Variant]] = {}


def register(cls: type[Variant]) -> type[Variant]:
    """Class decorator: add a variant (and its config class) to the registries."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__}: a variant needs a non-empty `name`")
    if name in REGISTRY:
        raise KeyError(f"variant {name!r} is already registered by {REGISTRY[name].__name__}")
    cfg_cls = getattr(cls, "config", None)
    if not (isinstance(cfg_cls, type) and issubclass(cfg_cls, AdapterConfig)):
        raise TypeError(f"{cls.__name__}.config must be an AdapterConfig subclass")
    default = cfg_cls.__dataclass_fields__["variant"].default
    if default != name:
        raise ValueError(f"{cfg_cls.__name__}.variant defaults to {default!r}, expected {name!r}")
    if (cls.delta is None) == (cls.delta_input is None):
        raise TypeError(f"{cls.__name__}: define exactly one of delta / delta_input")
    if not set(cls.kinds) <= set(KINDS):
        raise ValueError(f"{cls.__name__}.kinds: unknown kinds {sorted(set(cls.kinds) - set(KINDS))}; known: {KINDS}")
    if ("embedding" in cls.kinds) != (cls.delta_embedding is not None):
        raise TypeError(f"{cls.__name__}: an 'embedding' in kinds goes with a delta_embedding, and only then")
    if "fused" in cls.kinds and cls.low_rank_delta is Variant.low_rank_delta:
        raise TypeError(f"{cls.__name__}: a 'fused' in kinds needs low_rank_delta (the per-expert B A)")
    if cls.scale_outside and cls.delta is None:
        raise TypeError(f"{cls.__name__}: scale_outside applies to an output hook's delta, not delta_input")
    if cls.gate is not None and cls.scale_outside:
        raise TypeError(f"{cls.__name__}: a gate is applied as t ⊙ (1 + c·(g − 1)); scale_outside does not apply")
    if cls.calibration not in (None, "gram", "diag"):
        raise ValueError(f"{cls.__name__}.calibration must be None, 'gram' or 'diag'")
    if cls.requires_calibration and cls.calibration is None:
        raise ValueError(f"{cls.__name__}: requires_calibration needs a calibration kind")
    unknown = set(cls.runtime_fields) - set(cfg_cls.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{cls.__name__}.runtime_fields names unknown config fields {sorted(unknown)}")
    if not hasattr(cls, "examples"):
        cls.examples = {name: Example({})}
    if not cls.examples or not all(isinstance(e, Example) for e in cls.examples.values()):
        raise TypeError(f"{cls.__name__}.examples must be a non-empty {{name: Example}}")
    if getattr(cls, "bench", None) is not None and not isinstance(cls.bench, BenchSetting):
        raise TypeError(f"{cls.__name__}.bench must be a BenchSetting")
    cls.bench = _bench_defaults(cls)
    if cls.identity_at_init == bool(cls.neutral):
        raise ValueError(f"{cls.__name__}: `neutral` names the tensors to zero exactly when identity_at_init is False")
    if cls.uses_rank and "r" not in cfg_cls.__dataclass_fields__:
        raise TypeError(f"{cls.__name__}: uses_rank needs a config with r (subclass RankConfig)")
    if cls.scale_outside and not hasattr(cfg_cls, "scale"):
        raise TypeError(f"{cls.__name__}: scale_outside needs a config with alpha (subclass ScaledConfig)")
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    undocumented = sorted(n for n in fields if not field_doc(cfg_cls, n))
    if undocumented:
        raise TypeError(f"{cfg_cls.__name__}: fields {undocumented} have no doc; declare them with "
                        f"lora_lite.config.knob(default, doc)")
    REGISTRY[name] = cls
    CONFIGS[name] = cfg_cls
    for c in (*SHARED, *CONFIGS.values()):  # "read by" lines name every registered variant
        document(c)
    return cls
