"""Reading a base weight W as a dense fp32 matrix, whatever the layer stores.

Variants that read W (SVD inits, DoRA/DeLoRA norms, closed forms) call `dense_weight(layer)`
instead of `layer.weight.float()`, so they run on quantized bases too. The weight is
dequantized into a new fp32 tensor and never re-quantized or written back: the stored
quantized weight stays bit for bit what it was. Supported storages:

    torch.nn.Linear with a floating-point weight     W itself, as fp32 (no copy when it is fp32)
    transformers Conv1D, nn.Embedding (kinds.py)     the stored weight transposed (a view)
    nn.Conv1d / Conv2d / Conv3d (kinds.py)           the weight flattened to (C_out, C_in/groups·kernel)
    bitsandbytes Linear4bit (nf4/fp4), Params4bit     dequantize_4bit(packed, quant_state)
    bitsandbytes Linear8bitLt, Int8Params (int8)      CB · SCB / 127 (row-wise absmax scales)
    torchao quantize_ weights (TorchAOBaseTensor)     weight.dequantize()

Anything else raises TypeError naming the layer and weight types. Detection reads the weight's
class (bitsandbytes and torchao are imported only if the model already uses them), so a model
of plain nn.Linear layers never imports either library.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .kinds import dims, is_transposed, kind_of


def weight_storage(layer: nn.Module) -> str | None:
    """How the layer stores W: "dense", "bnb_4bit", "bnb_int8", "torchao", or None when
    `dense_weight` cannot read it."""
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor):
        return None
    kind = type(w)
    module = kind.__module__ or ""
    if module.startswith("bitsandbytes"):
        if kind.__name__ == "Params4bit":  # packed storage may be any dtype (quant_storage)
            quantized = getattr(w, "bnb_quantized", False) and getattr(w, "quant_state", None) is not None
            return "bnb_4bit" if quantized else _float_or_none(layer, w)
        if kind.__name__ == "Int8Params":
            return "bnb_int8" if w.dtype == torch.int8 else _float_or_none(layer, w)
        return None
    if module.startswith("torchao"):
        base = getattr(sys.modules.get("torchao.utils"), "TorchAOBaseTensor", None)
        return "torchao" if base is not None and isinstance(w, base) and hasattr(w, "dequantize") else None
    return _float_or_none(layer, w)


def repacks_in_eval(module: nn.Module) -> bool:
    """bitsandbytes Linear4bit on CPU: its first forward in eval mode without grad rewrites its
    weight in place into a bf16 inference layout whose kernel has no backward (bitsandbytes
    0.50, AVX512-BF16 CPUs). Its mode selects nothing else (it has no dropout), so the
    calibration pass leaves such layers in the mode they are in."""
    return weight_storage(module) == "bnb_4bit" and module.weight.device.type == "cpu"


def is_quantized(layer: nn.Module) -> bool:
    return weight_storage(layer) not in (None, "dense")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """W (d_out, d_in) as an fp32 tensor, dequantized when stored quantized; read-only use.
    (For a fused parameter, kinds.py: (E, d_out, d_in), one W per expert.)

    For a dense fp32 nn.Linear this is `layer.weight` itself (autograd sees it as usual); a
    quantized weight gives a fresh tensor on the weight's device, outside autograd."""
    w = getattr(layer, "weight", None)
    if type(w) is nn.Parameter and w.dtype.is_floating_point:  # the common cases first: DoRA reads W every call
        if isinstance(layer, nn.Linear):
            return w.float()
        if is_transposed(layer):
            return w.mT.float()
        kind = kind_of(layer)
        if kind == "fused":
            return w.float()
        if kind == "conv":
            return w.flatten(1).float()
    kind = weight_storage(layer)
    if kind == "dense":
        return (w.flatten(1) if kind_of(layer) == "conv" else w.mT if is_transposed(layer) else w).float()
    with torch.no_grad():
        if kind == "bnb_4bit" and getattr(w.quant_state, "packing_format_for_cpu", False):
            W = _bnb4_cpu_packed(w.data, w.quant_state)
        elif kind == "bnb_4bit":
            import bitsandbytes.functional as bnbf

            W = bnbf.dequantize_4bit(w.data, w.quant_state)
        elif kind == "bnb_int8":
            import bitsandbytes.functional as bnbf

            # Linear8bitLt keeps the row scales on the weight until its first forward, then
            # moves them to layer.state (and CB with them); either place holds the same SCB.
            scb = w.SCB if getattr(w, "SCB", None) is not None else getattr(getattr(layer, "state", None), "SCB", None)
            if scb is None:
                raise TypeError(f"{type(layer).__name__}: int8 weight without row scales (SCB); cannot dequantize")
            W = bnbf.int8_vectorwise_dequant(w.data, scb)
        elif kind == "torchao":
            W = w.dequantize()
        else:
            raise TypeError(
                f"cannot read the weight of {type(layer).__name__} (weight type "
                f"{type(w).__name__}, dtype {getattr(w, 'dtype', None)}) as a dense matrix: supported are "
                f"torch.nn.Linear, bitsandbytes Linear4bit / Linear8bitLt and torchao-quantized "
                f"linears; variants that do not read W (needs_dense_weight = False) need no dense weight"
            )
    d_in, d_out = dims(layer)
    expected = (d_out, d_in)
    if tuple(W.shape) != expected:
        raise TypeError(
            f"{type(layer).__name__}: dequantized weight has shape {tuple(W.shape)}, expected "
            f"(out_features, in_features) = {expected}"
        )
    return W.float()


def _bnb4_cpu_packed(packed: torch.Tensor, qs) -> torch.Tensor:
    """W from bitsandbytes' CPU inference layout, without touching the layer.

    On a CPU with AVX512-BF16, Linear4bit's first eval-mode forward without grad repacks its
    weight in place (bitsandbytes 0.50 `_convert_weight_packed_for_cpu`): the 4-bit codes of
    W (N, K) are re-tiled in blocks of 32 rows, and the block scales become a bf16 (K/bs, N)
    matrix. This reads that layout as the layer's kernel does: W[n, k] = code[q[n, k]] ·
    absmax[k // bs, n]. bitsandbytes' own inverse would re-quantize the scales, so it is
    not used."""
    N, K = qs.shape
    tiles = packed.reshape(-1, 32)
    q = torch.cat([tiles & 0xF, tiles >> 4], dim=-1)                      # (N/32 · K/2, 64)
    q = q.reshape(N // 32, K // 2, 32, 2).transpose(1, 2).reshape(N, K)   # 4-bit code of W[n, k]
    scale = qs.absmax.float().T.repeat_interleave(qs.blocksize, dim=1)   # (N, K)
    return qs.code.float().to(q.device)[q.long()] * scale


def _float_or_none(layer: nn.Module, w: torch.Tensor) -> str | None:
    """An nn.Linear with a floating-point weight (also a bitsandbytes weight not quantized yet)
    holds W itself; Conv1D and nn.Embedding hold it transposed (kinds.py); other layer classes
    may store it in ways this module does not know."""
    plain = isinstance(layer, nn.Linear) or kind_of(layer) in ("conv1d", "embedding", "fused", "conv")
    return "dense" if plain and w.dtype.is_floating_point else None
