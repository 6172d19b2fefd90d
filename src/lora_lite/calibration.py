"""One pass over calibration batches -> per-target input second moments.

Every data-driven init in lora-lite needs only second moments of a layer's input x (rows of
the flattened (tokens, d_in) activation): "gram" = sum_t x_t x_tᵀ (d_in x d_in) or "diag" =
sum_t x_t ⊙ x_t (d_in), plus the token count. EVA's top-r right singular vectors of X are the
top eigenvectors of XᵀX, CorDA whitens by C = XᵀX / n, ASVD scales by diag(C), and a Wanda
score S_i·sqrt(v_iᵀ C v_i) reads C. So the pass stores no activations.

The pass runs on the untouched model (before any adapter tensor or weight change), in eval
mode under no_grad, with temporary pre-hooks that are always removed. Padding positions are
dropped (below). Layers fed the very same input tensor (q/k/v) share one accumulator.
Statistics are fp32 on each layer's device.

Which mask drops a layer's padding rows: the mask of the token stream the layer reads.
    decoder-only / encoder-only model   the batch's `attention_mask` (if any), every layer
    encoder-decoder model (config.is_encoder_decoder, with get_encoder() / get_decoder()):
      a layer running inside the encoder stack            `attention_mask`
      inside the decoder stack, input IS the encoder's    `attention_mask` (cross-attention k/v)
        output tensor (the decoder's encoder_hidden_states
        argument, or what the encoder stack returned)
      any other layer inside the decoder stack            `decoder_attention_mask`, or no mask
                                                          when the batch has none
      a layer outside both stacks (e.g. lm_head)          refused when the batch has a mask:
                                                          its stream cannot be told
The stream is told at run time by hooks on the two stacks, never from tensor sizes: with equal
encoder and decoder lengths the sizes agree and say nothing. A mask whose size does not match
a layer's input rows (a pooler reads one row per sequence) is refused.
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
    current: dict = {"seen": []}  # per batch: [(input tensor, acc)]
    streams = _Streams(model)

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
            key, mask = streams.mask_for(name, x)
            if mask is not None:
                if mask.numel() != rows.shape[0]:
                    raise ValueError(
                        f"{key} has {mask.numel()} positions but the input of {name} "
                        f"has {rows.shape[0]} rows {tuple(x.shape)}; exclude this layer from the "
                        f"targets or pass batches without {key}"
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
    handles += streams.hooks()
    try:
        model.eval()
        for m, mode in modes.items():
            if repacks_in_eval(m):  # keep bitsandbytes' 4-bit CPU weights as they are
                m.train(mode)
        with torch.no_grad():
            for batch in _progress(batches, progress):
                streams.start(batch)
                current["seen"] = []
                _run(model, batch)
        current["seen"] = []
        streams.start(None)
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
                f"(the rank r: an SVD or eigenbasis of rank r needs r tokens' activations): pass more "
                f"or longer calibration batches, or a smaller r (at most {n})"
            )
    return stats


class _Streams:
    """Which padding mask applies to a layer's input rows (the rule in the module docstring).

    On an encoder-decoder model, hooks on the encoder and decoder stacks record which stack is
    running and the encoder output tensors the decoder reads; `mask_for` answers from those."""

    def __init__(self, model: nn.Module):
        self.stacks: dict[str, nn.Module] = {}
        self.unknown: str | None = None  # an encoder-decoder model whose stacks were not found
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            get_enc, get_dec = getattr(model, "get_encoder", None), getattr(model, "get_decoder", None)
            enc, dec = (get_enc() if callable(get_enc) else None), (get_dec() if callable(get_dec) else None)
            if isinstance(enc, nn.Module) and isinstance(dec, nn.Module) and enc is not dec:
                self.stacks = {"encoder": enc, "decoder": dec}
            else:
                self.unknown = type(model).__name__
        self.start(None)

    def start(self, batch) -> None:
        """Reset for a new batch (None: after the pass, drop every reference to activations)."""
        get = batch.get if isinstance(batch, dict) else (lambda key: None)
        self.masks = {"attention_mask": get("attention_mask"),
                      "decoder_attention_mask": get("decoder_attention_mask")}
        self.running: list[str] = []      # stacks entered and not yet left (innermost last)
        self.encoder_out: list[torch.Tensor] = []

    def hooks(self) -> list:
        handles = []
        for stack, module in self.stacks.items():
            handles.append(module.register_forward_pre_hook(self._enter(stack), with_kwargs=True))
            handles.append(module.register_forward_hook(self._leave(stack)))
        return handles

    def _enter(self, stack: str):
        def pre_hook(module, args, kwargs):
            self.running.append(stack)
            if stack == "decoder" and isinstance(kwargs.get("encoder_hidden_states"), torch.Tensor):
                self.encoder_out.append(kwargs["encoder_hidden_states"])
        return pre_hook

    def _leave(self, stack: str):
        def hook(module, args, out):
            self.running.pop()
            if stack == "encoder":
                last = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
                if isinstance(last, torch.Tensor):
                    self.encoder_out.append(last)
        return hook

    def mask_for(self, name: str, x: torch.Tensor) -> tuple[str, torch.Tensor | None]:
        """(mask key, mask or None) for the rows of `x`, the input of target `name`."""
        given = [k for k, m in self.masks.items() if m is not None]
        if not self.stacks:
            if self.unknown and given:
                raise ValueError(
                    f"{self.unknown} is an encoder-decoder model without get_encoder()/get_decoder(), "
                    f"so which of {given} applies to {name} cannot be told; pass calibration "
                    f"batches without masks"
                )
            return "attention_mask", self.masks["attention_mask"]
        stack = self.running[-1] if self.running else None
        if stack == "encoder" or (stack == "decoder" and any(x is e for e in self.encoder_out)):
            return "attention_mask", self.masks["attention_mask"]
        if stack == "decoder":
            return "decoder_attention_mask", self.masks["decoder_attention_mask"]
        if given:
            raise ValueError(
                f"{name} runs outside the encoder and decoder stacks, so which token stream it "
                f"reads (and which of {given} drops its padding) cannot be told; exclude it from "
                f"the targets or pass batches without masks"
            )
        return "attention_mask", None


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
    # leave=True: the finished bar ends with a newline, so what is printed next starts a line
    return tqdm(batches, desc="lora-lite calibration", unit="batch", leave=True)
