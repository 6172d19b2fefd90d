"""One pass over calibration batches -> per-target input second moments.

Every data-driven init in lora-lite needs only second moments of a layer's input x (rows of
the flattened (tokens, d_in) activation): "gram" = sum_t x_t x_tᵀ (d_in x d_in) or "diag" =
sum_t x_t ⊙ x_t (d_in), plus the token count. EVA's top-r right singular vectors of X are the
top eigenvectors of XᵀX, CorDA whitens by C = XᵀX / n, ASVD scales by diag(C), and a Wanda
score S_i·sqrt(v_iᵀ C v_i) reads C. So the pass stores no activations.

The pass runs on the untouched model (before any adapter tensor or weight change), in eval
mode under no_grad, with temporary pre-hooks that are always removed. Positions with
attention_mask == 0 are dropped. Layers fed the very same input tensor (q/k/v) share one
accumulator. Statistics are fp32 on each layer's device.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from .quant import repacks_in_eval


def collect_stats(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    kind: str,
    batches: Iterable,
    *,
    min_tokens: int = 1,
    progress: bool = True,
) -> dict[str, dict]:
    """Return {target name: {"gram" | "diag": tensor, "count": int}}.

    Layers that saw the same input tensor get the same dict object (shared accumulation).
    Raises ValueError for an unsupported batch type, a mask that does not line up with a
    layer's input rows, or fewer than `min_tokens` unmasked tokens.
    """
    if kind not in ("gram", "diag"):
        raise ValueError(f"calibration kind must be 'gram' or 'diag', got {kind!r}")
    stats: dict[str, dict] = {}
    current: dict = {"mask": None, "seen": []}  # per-batch: the mask, [(input tensor, acc)]

    def make_hook(name: str):
        def hook(module, args):
            x = args[0]
            for seen_x, acc in current["seen"]:
                if seen_x is x:  # same tensor already accumulated this batch (q/k/v)
                    stats.setdefault(name, acc)
                    if stats[name] is not acc:
                        raise ValueError(f"{name}: inconsistent input sharing across batches")
                    return
            acc = stats.setdefault(name, {"count": 0})
            rows = x.detach().reshape(-1, x.shape[-1])
            mask = current["mask"]
            if mask is not None:
                if mask.numel() != rows.shape[0]:
                    raise ValueError(
                        f"attention_mask has {mask.numel()} positions but the input of {name} "
                        f"has {rows.shape[0]} rows {tuple(x.shape)}; exclude this layer from the "
                        f"targets or pass batches without attention_mask"
                    )
                rows = rows[mask.reshape(-1).to(rows.device).bool()]
            rows = rows.to(torch.float32)
            if kind not in acc:
                d = rows.shape[1]
                acc[kind] = rows.new_zeros((d, d) if kind == "gram" else (d,))
            if kind == "gram":
                acc[kind].addmm_(rows.T, rows)
            else:
                acc[kind].add_((rows * rows).sum(0))
            acc["count"] += rows.shape[0]
            current["seen"].append((x, acc))

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [layer.register_forward_pre_hook(make_hook(name)) for name, layer in targets]
    try:
        model.eval()
        for m, mode in modes.items():
            if repacks_in_eval(m):  # keep bitsandbytes' 4-bit CPU weights as they are
                m.train(mode)
        with torch.no_grad():
            for batch in _progress(batches, progress):
                current["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
                current["seen"] = []
                _run(model, batch)
        current["seen"] = []
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    for name, _ in targets:
        n = stats.get(name, {}).get("count", 0)
        if n < min_tokens:
            raise ValueError(
                f"calibration saw {n} unmasked tokens at {name}; need at least {min_tokens} "
                f"(the rank r): pass more or longer calibration batches"
            )
    return stats


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    elif isinstance(batch, torch.Tensor):
        model(batch)
    else:
        raise ValueError(
            f"calibration batches must be dicts, tuples/lists or tensors, got {type(batch).__name__}"
        )


def _progress(batches: Iterable, enabled: bool) -> Iterable:
    if not enabled:
        return batches
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return batches
    return tqdm(batches, desc="lora-lite calibration", unit="batch", leave=False)
