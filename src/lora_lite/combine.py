"""combine: several adapters as one adapter, exactly.

    W_c = W + Σ_k w_k (W_eff,k − W)          at every target any term adapts

Each term's change is read in closed form from its tensors. A low-rank change (`low_rank_delta`:
W_eff − W = B A, the bias unchanged) enters as its factors, and the sum is their concatenation,

    B_c = [w_1 B_1, …, w_n B_n],   A_c = [A_1; …; A_n],   B_c A_c = Σ_k w_k B_k A_k,

with nothing refactorised: no SVD, no truncation. A change that is not low-rank (a gate, a
rotation, a magnitude: only `effective_weight`), or a closed form that reads the layer itself,
needs the base model, so it is read on the model the adapters were made for (`model=`: the adapter is loaded, read and detached, which
leaves the model bit for bit as it was) and enters as the pair (ΔW, I) or (I, ΔW), of rank
min(d_in, d_out). A change that moves the bias has no (B, A) form and is refused.

The result is an `Adapter` of the registered variant that holds any change W + B A (its
`hold`), in fp32: `ll.load` it, `ll.merge` it, `ll.save` it, `ll.export_peft` it. The terms
may be any mix of variants and may adapt different targets; they must come from one model
(same target shapes and, where the files record them, the same base fingerprints).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .checkpoint import Adapter, CheckpointError, load, read
from .fingerprint import same_base
from .kinds import bias
from .quant import dense_weight
from .runtime import detach, state_of, unwrap, variant_of
from .variant import REGISTRY

Term = tuple[Adapter | str | os.PathLike, float]


def combine(terms: Mapping[str | os.PathLike, float] | Iterable[Term], *, model: nn.Module | None = None
            ) -> Adapter:
    """One adapter whose change is Σ_k w_k·Δ_k, exactly (see the module docstring).

    terms: {path: weight}, or (source, weight) pairs where a source is a checkpoint path or an
    `Adapter` (`ll.read`, `ll.adapter_of`, an importer). model: the pristine base model, needed
    only when a term's change is not low-rank (it is loaded onto the model, read, detached).

        both = ll.combine({"task.safetensors": 1.0, "style.safetensors": -0.5})
        ll.load(base, both)                                   # or ll.export_peft(both, "dir/")

    Raises ValueError (nothing is loaded) for: no terms; a weight that is not a finite number;
    terms made on different models (a target's shape or recorded base differs); a term that
    trains base modules (`trainable_modules`: not a change that can be weighted); a change that
    moves a bias; a change that is not low-rank without `model`. CheckpointError for an
    unreadable file.
    """
    pairs = list(terms.items()) if isinstance(terms, Mapping) else list(terms)
    if not pairs:
        raise ValueError("combine: no terms; pass {path: weight} or (adapter, weight) pairs")
    adapters = []
    for source, w in pairs:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ValueError(f"combine: the weight of {_label(source)} must be a finite number, got {w!r}")
        adapter = source if isinstance(source, Adapter) else read(source)
        if adapter.trainable:
            raise ValueError(
                f"combine: {adapter.source} also trains base modules ({', '.join(list(adapter.trainable)[:3])}, "
                f"trainable_modules); their values are weights, not changes, so they cannot be summed: "
                f"merge them into the base first"
            )
        adapters.append((adapter, float(w)))
    _same_model(adapters)
    factors: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for adapter, w in adapters:
        for name, (B, A) in _factors(adapter, model).items():
            if name in factors:
                _check_shapes(name, factors[name][0], (B, A), adapter.source)
            factors.setdefault(name, []).append((w * B, A))
    holder = _holder()
    fields, tensors = holder.hold({n: (torch.cat([B for B, _ in fs], -1), torch.cat([A for _, A in fs], -2))
                                   for n, fs in factors.items()})
    names = list(factors)
    cfg = holder.config(**fields, dtype=torch.float32, exclude_names=(),
                        target_names=tuple(f"^{re.escape(n)}$" for n in names))
    kinds, prints = {}, {}
    for adapter, _ in adapters:
        kinds.update(adapter.kinds)
        prints.update(adapter.fingerprints or {})
    return Adapter(config=cfg, tensors=tensors, kinds={n: kinds[n] for n in names if n in kinds},
                   fingerprints={n: prints[n] for n in names if n in prints} or None,
                   source=f"combine({', '.join(f'{w:g}·{a.source}' for a, w in adapters)})")


def _label(source) -> str:
    return source.source if isinstance(source, Adapter) else repr(os.fspath(source))


def _holder():
    """The registered variant that holds any change W + B A (it declares `hold`)."""
    holders = [v for v in REGISTRY.values() if v.hold is not None]
    if len(holders) != 1:
        raise RuntimeError(f"combine needs exactly one registered variant with `hold`, found {[v.name for v in holders]}")
    return holders[0]


def _same_model(adapters: list[tuple[Adapter, float]]) -> None:
    """Terms made on one model: at every shared target the same tensor-free facts (kind, recorded
    base fingerprint); shapes are compared when the factors meet (`_check_shapes`)."""
    seen: dict[str, tuple[str, dict | None, str]] = {}
    for adapter, _ in adapters:
        for name in adapter.targets:
            kind = adapter.kinds.get(name, "linear")
            sketch = (adapter.fingerprints or {}).get(name)
            if name not in seen:
                seen[name] = (kind, sketch, adapter.source)
                continue
            kind0, sketch0, source0 = seen[name]
            if kind != kind0 or (sketch is not None and sketch0 is not None and not same_base(sketch0, sketch)):
                raise ValueError(
                    f"combine: {adapter.source} and {source0} were made on different models: at {name} "
                    + (f"one adapts a {kind0} layer, the other a {kind} one" if kind != kind0 else
                       "the recorded base weights differ")
                    + "; combine adapters of one base model"
                )
            if sketch0 is None and sketch is not None:
                seen[name] = (kind, sketch, adapter.source)


def _factors(adapter: Adapter, model: nn.Module | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{target: (B, A)} in fp32 with W_eff − W = B A at strength 1: from the tensors alone
    where the variant's `low_rank_delta` reads only them, else on the model (`_on_model`)."""
    cfg = adapter.config
    variant = variant_of(cfg)
    out, rest = {}, []
    for name, tensors in adapter.tensors.items():
        try:
            pair = variant.at_target(name, cfg).low_rank_delta(_View({**adapter.shared, **tensors}), cfg)
        except AttributeError:  # the closed form also reads the layer (its weight, its dims)
            pair = None
        if pair is None:
            rest.append(name)
        else:
            out[name] = (pair[0].float(), pair[1].float())
    if rest:
        out.update(_on_model(adapter, rest, model))
    return {n: out[n] for n in adapter.targets}


class _View:
    """A target's tensors as the attributes a variant's closed form reads (`layer.lora_A`)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.__dict__.update(tensors)


def _on_model(adapter: Adapter, names: list[str], model: nn.Module | None):
    """The change at `names`, read on `model` with the adapter loaded (then detached): its
    low-rank factors, or the dense ΔW = W_eff − W as (ΔW, I) or (I, ΔW)."""
    if model is None:
        raise ValueError(
            f"combine: the change of {adapter.source} ({adapter.variant!r}) at {names[0]} is not low-rank in "
            f"its tensors alone, so it is read on the base model: pass model=<the pristine base>"
        )
    model = unwrap(model)
    load(model, adapter)
    try:
        state = state_of(model)
        out = {}
        with torch.no_grad():
            for name in names:
                layer = state.targets[name]
                placed = state.variant.at_target(name, state.cfg)
                pair = placed.low_rank_delta(layer, state.cfg)
                if pair is not None:
                    out[name] = (pair[0].float(), pair[1].float())
                    continue
                W_eff, b_eff = placed.effective_weight(layer, state.cfg)
                b = bias(layer)
                if b_eff is not None and b_eff is not b and (b is None or not torch.equal(b_eff.float(), b.float())):
                    raise ValueError(
                        f"combine: {adapter.source} ({adapter.variant!r}) changes the bias of {name}, which no "
                        f"low-rank pair B A holds; merge it instead (ll.merge)"
                    )
                delta = W_eff.float() - dense_weight(layer)
                d_out, d_in = delta.shape[-2:]
                eye = torch.eye(min(d_in, d_out), dtype=delta.dtype, device=delta.device).expand(
                    *delta.shape[:-2], -1, -1)
                out[name] = (delta.clone(), eye.clone()) if d_in <= d_out else (eye.clone(), delta.clone())
        return {n: (B.cpu(), A.cpu()) for n, (B, A) in out.items()}
    finally:
        detach(model)


def _check_shapes(name: str, first: tuple[torch.Tensor, torch.Tensor], pair: tuple[torch.Tensor, torch.Tensor],
                  source: str) -> None:
    """Two terms' changes at one target have one shape: (…, d_out, ·) and (…, ·, d_in)."""
    (B0, A0), (B, A) = first, pair
    if B.shape[:-1] != B0.shape[:-1] or A.shape[-1] != A0.shape[-1] or A.shape[:-2] != A0.shape[:-2]:
        shape = lambda B, A: (*B.shape[:-1], A.shape[-1])  # noqa: E731
        raise ValueError(
            f"combine: {source} and an earlier term were made on different models: at {name} its change "
            f"has shape {shape(B, A)}, the earlier one {shape(B0, A0)}; combine adapters of one base model"
        )
