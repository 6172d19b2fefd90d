"""Layer kinds: what a target is, and how its weight is read and written.

Every variant's math is written for one dense matrix W (d_out, d_in) — the torch `nn.Linear`
layout — and an input x with d_in features (y = x Wᵀ + b). A kind says how a layer stores that
W, so the runtime, `quant.dense_weight`, merge and PEFT interop ask here instead of assuming
nn.Linear:

    kind        layer                          d_in, d_out                W (d_out, d_in)
    linear      nn.Linear, quantized linears   in_features, out_features  weight (dequantized)
    conv1d      transformers' Conv1D (GPT-2)   nx, nf                     weightᵀ (stored (nx, nf))
    embedding   nn.Embedding                   num_embeddings, dim        weightᵀ (stored (V, dim))
    fused       a 3-D parameter (MoE experts)  its last two dims          one W per expert: (E, d_out, d_in)
    conv        nn.Conv1d / Conv2d / Conv3d    C_in/groups·kernel, C_out  weight flattened (stored (C_out, C_in/groups, *kernel))

A convolution is the linear map of each input patch: output channel o at one position is
W[o] · patch, the patch being the C_in/groups channels of o's group under the kernel window
(stride, padding, dilation and padding mode as the layer has them). So W (C_out,
C_in/groups·kernel) — the dense view — holds every variant's math as on nn.Linear, and merge
writes W_eff back in the layer's shape. What differs is the input: x is an image, and x Aᵀ
becomes a convolution with A as its kernel (LoRA: `conv_low_rank`); a per-output gate or norm
broadcasts over the channel dimension (`per_channel`). A variant that adapts convs declares
"conv" in `Variant.kinds` and a `delta_conv` (or a `gate`).

An embedding is the linear map of a one-hot token: y = onehot(ids) Wᵀ with W = weightᵀ, so the
low-rank variants keep their shapes (A (r, V), B (dim, r), PEFT's lora_embedding_A/B) and only
their delta changes: x Aᵀ becomes the lookup embed(ids, Aᵀ). A variant lists the kinds it
adapts in `Variant.kinds`; an embedding needs its `delta_embedding`.

A fused parameter — e.g. transformers 5's MoE experts, `experts.gate_up_proj` (E, 2I, H) read by
the experts module as F.linear(x, gate_up_proj[e]) — is no module of its own: `FusedParameter`
stands for it. It is registered beside the parameter on the owning module (as
`lora_<parameter name>`) and holds the adapter tensors with a leading expert dimension, one
variant slice per expert (LoRA: A (E, r, d_in), B (E, d_out, r)). The runtime swaps W + ΔW in for
the parameter for the duration of the owner's forward and puts the Parameter back afterwards
(also when the forward raises), so the model's class and its base state_dict stay what they
were and no base weight is written. Storage (E, d_out, d_in) is what Qwen3-MoE and Mixtral use;
an owner with `is_transposed = True` stores (E, d_in, d_out) (PEFT reads the same attribute).

A kind is detected from the module's class; transformers is never imported here (Conv1D is
recognised only if the model's code already imported it).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

KINDS = ("linear", "conv1d", "embedding", "fused", "conv")
# What each kind is called in messages: the layer types behind it.
DESCRIBED = {
    "linear": "torch.nn.Linear (and bitsandbytes / torchao quantized linears)",
    "conv1d": "transformers Conv1D (GPT-2)",
    "embedding": "torch.nn.Embedding",
    "fused": "fused 3-D parameters (MoE experts, target_parameters)",
    "conv": "torch.nn.Conv1d / Conv2d / Conv3d",
}


class FusedParameter(nn.Module):
    """The adapter target standing for the 3-D parameter `owner.<parameter_name>` (E experts)."""

    def __init__(self, owner: nn.Module, parameter_name: str):
        super().__init__()
        # a plain attribute, not a submodule: the owner holds this module, not the reverse
        object.__setattr__(self, "owner", owner)
        self.parameter_name = parameter_name
        self.transposed = bool(getattr(owner, "is_transposed", False))
        E, a, b = getattr(owner, parameter_name).shape
        self.num_experts = E
        self.in_features, self.out_features = (a, b) if self.transposed else (b, a)

    @property
    def slot(self) -> str:
        """Its name on the owner."""
        return "lora_" + self.parameter_name

    @property
    def weight(self) -> torch.Tensor:
        """The fused parameter as stored ((E, d_out, d_in), or (E, d_in, d_out) when transposed)."""
        return self.owner._parameters[self.parameter_name]

    def extra_repr(self) -> str:
        return (f"{self.parameter_name}: {self.num_experts} experts, d_in={self.in_features}, "
                f"d_out={self.out_features}{', stored transposed' if self.transposed else ''}")


def fused_parameters(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(full parameter name, owning module, parameter name) of every 3-D parameter, in model order."""
    return [(f"{m}.{p}" if m else p, module, p) for m, module in model.named_modules()
            for p, t in module.named_parameters(recurse=False) if t.dim() == 3]


def _conv1d_class() -> type | None:
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def kind_of(module: nn.Module) -> str | None:
    """The kind of `module`, or None when lora-lite cannot adapt it."""
    if isinstance(module, FusedParameter):
        return "fused"
    if getattr(module, "weight", None) is None or not callable(module):
        return None
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "conv"
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return "linear"
    return None


def dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of the layer's W in the nn.Linear sense."""
    kind = kind_of(module)
    if kind == "conv1d":
        return module.nx, module.nf
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    if kind == "conv":
        return module.weight[0].numel(), module.out_channels
    return module.in_features, module.out_features


def is_transposed(module: nn.Module) -> bool:
    """Whether the layer stores Wᵀ (d_in, d_out) rather than W (per expert for a fused one)."""
    kind = kind_of(module)
    return kind in ("conv1d", "embedding") or (kind == "fused" and module.transposed)


def bias(module: nn.Module) -> torch.Tensor | None:
    """The layer's bias (an embedding has none)."""
    return getattr(module, "bias", None)


def is_dense(module: nn.Module) -> bool:
    """A plain floating-point weight in the kind's own layout: what merge can write."""
    w = getattr(module, "weight", None)
    if type(w) not in (nn.Parameter, torch.Tensor) or not w.dtype.is_floating_point:
        return False
    kind = kind_of(module)
    if kind == "linear" and not isinstance(module, nn.Linear):
        return False
    if kind == "conv":
        return True
    d_in, d_out = dims(module)
    experts = (module.num_experts,) if kind == "fused" else ()
    return tuple(w.shape) == experts + ((d_in, d_out) if is_transposed(module) else (d_out, d_in))


def to_storage(module: nn.Module, W: torch.Tensor) -> torch.Tensor:
    """A dense (…, d_out, d_in) matrix in the layout the layer stores it in (merge writes this)."""
    if kind_of(module) == "conv":
        return W.reshape(module.weight.shape)
    return W.mT if is_transposed(module) else W


def per_channel(module: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """A per-output vector v (d_out,) shaped to broadcast over the layer's output: on a conv the
    channels are dimension 1 of (N, C_out, *spatial), elsewhere the last dimension."""
    if kind_of(module) == "conv":
        return v.reshape(-1, *(1,) * (module.weight.dim() - 2))
    return v


def label(kind: str | None, module: nn.Module) -> str:
    return f"{type(module).__name__} ({DESCRIBED[kind] if kind else 'not an adaptable layer'})"
