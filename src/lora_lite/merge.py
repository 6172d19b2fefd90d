"""merge / disabled / scaled: deploy an attached adapter, switch it off, or dial its strength.

    merge(model)            W ← W_eff, b ← b_eff at every target (fp32 math, one rounding to the
                            weight's dtype), then the adapter is removed as by `detach`
    with disabled(model):   every hook returns the base output (y_base)
    with scaled(model, c):  every target gives y_base + c·(y_adapted − y_base)

The hooks read `enabled` and `scale` from the attach state on every call (runtime.py), so the
context managers only set and restore two attributes: no base-layer call is added. For an input
pre-hook the layer runs on x + c·Δx; the base layer is affine, so its output is exactly
y_base + c·(y_adapted − y_base). Nesting composes: the scale multiplies, `disabled` wins. c may
be a coefficient tensor, one value per example or per token (see `scaled`).

merge bakes in what the model computes at the moment of the call: inside `scaled(model, c)` it
writes W + c·(W_eff − W) (and the same for the bias), inside `disabled(model)` it writes W back
unchanged and drops the adapter. Every change of a variant is affine in the layer input, so this
is the same function as the scaled hook. A coefficient tensor has no single weight: merge
refuses it.

With several adapters (runtime.py), `disabled(model, name)` and `scaled(model, {name: c})` act
on the adapters they name; merge, like every function given no name, raises when the model
carries several.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .config import coefficient
from .kinds import bias, is_dense, to_storage
from .quant import dense_weight
from .runtime import detach, layer_of, state_of, unwrap


@contextmanager
def disabled(model: nn.Module, name: str | None = None) -> Iterator[nn.Module]:
    """Base-model outputs while the adapter stays attached (e.g. the reference model of a
    preference loss); with several adapters, `name` switches off that one. Restores the
    previous state on exit, also on an exception."""
    state = state_of(unwrap(model), name)
    before = state.enabled
    state.enabled = False
    try:
        yield model
    finally:
        state.enabled = before


@contextmanager
def scaled(model: nn.Module, c: float | torch.Tensor | dict[str, float | torch.Tensor]) -> Iterator[nn.Module]:
    """Every target gives y_base + c·(y_adapted − y_base) inside the block: c = 0 is the base
    model, 1 the adapter as trained, −1 the opposite edit, 0.5 half of it. Restores on exit.

    c is a float, or a coefficient tensor that gives each row of the batch its own strength:
    shape (batch,), one value per example, broadcast over every other dimension of each
    activation; or (batch, seq), one per token, broadcast over the hidden dimension of
    (batch, seq, ..., hidden) activations. A row with c = 0 is the base model's row bit for bit,
    and each row is the row its own float c gives in the same batch (and alone, where the model
    and adapter give a row the same bits at any batch size): bit for bit in an fp32 model; a
    tensor is used in the activation's dtype, so in bf16 bit for bit where its values are exact
    in bf16, e.g. 0, ±0.5, ±1, ±2, and within one bf16 rounding of c·Δ otherwise.
    Inside another `scaled(model, b)` the strength is b·c (two tensors multiply row by row:
    (batch,) times (batch, seq) is (batch, seq)). A changing tensor of the same shape
    does not recompile a `torch.compile`d model.

    Raises ValueError before anything changes for: a bool, NaN/Inf, a tensor that is not
    floating point, not 1-D or 2-D, on another device than the adapter, a nested tensor whose
    shape does not match the outer one, or non-equal entries when a target is a fused
    parameter (MoE experts: one weight serves the whole batch). Inside the block, a layer whose
    activation does not start with c's shape raises ValueError naming the layer and both
    shapes, before that layer's output is formed. `merge` and `export_peft` refuse a tensor.

        with ll.scaled(model, 0.5):                          # half strength
            ...
        c = torch.tensor([1.0, -1.0, 0.0])                   # per example: up, down, base
        with ll.scaled(model, c):
            out = model(input_ids)                           # input_ids: (3, seq)
        c = (attention_mask * is_prompt).float()             # per token: steer the prompt only
        with ll.scaled(model, c):
            out = model(input_ids, attention_mask=attention_mask)

    With several adapters c is a dict {name: strength} (each value as above; adapters it does
    not name keep theirs): `scaled(model, {"task": 1.0, "steer": -0.5})`. Every name and value
    is checked before any strength changes.
    """
    model = unwrap(model)
    per = c if isinstance(c, dict) else {None: c}
    states = {n: state_of(model, n) for n in per}  # an unknown name raises here
    new = {}
    for n, state in states.items():
        what = "scaled(model, c)" if n is None else f"scaled(model, {{{n!r}: ...}})"
        strength = _product(state.scale, coefficient(per[n], what, state.device))
        state.check_coefficient(strength, what)
        new[n] = strength
    before = {n: state.scale for n, state in states.items()}
    for n, state in states.items():
        state.set_coefficients(new[n], state.cfg)
    try:
        yield model
    finally:
        for n, state in states.items():
            state.set_coefficients(before[n], state.cfg)


def _product(b: float | torch.Tensor, c: float | torch.Tensor) -> float | torch.Tensor:
    """b·c for nested `scaled` blocks; two tensors multiply row by row (the shorter shape must
    be the leading part of the longer one)."""
    if not isinstance(b, torch.Tensor) and b == 1.0:
        return c
    if not (isinstance(b, torch.Tensor) and isinstance(c, torch.Tensor)):
        return b * c
    short, long = sorted((b, c), key=lambda t: t.ndim)
    if long.shape[:short.ndim] != short.shape or short.device != long.device:
        raise ValueError(
            f"scaled(model, c): nested coefficient tensors of shapes {tuple(b.shape)} (outer) and "
            f"{tuple(c.shape)} (inner) on {b.device} / {c.device} do not multiply row by row; "
            f"give both the batch's shape ((batch,) or (batch, seq)) and one device"
        )
    return long * short.view(*short.shape, *(1,) * (long.ndim - short.ndim))


def merge(model: nn.Module) -> None:
    """Write every target's effective weight (and bias) into the layer and remove the adapter.

    The model is then a plain model with no lora-lite state; a new adapter can be attached on
    top (stacking = merge, then attach). Parameters of `trainable_modules` keep their trained
    values (detach would put the attach-time ones back). Inside `scaled(model, c)` / `disabled(model)` the
    current strength is merged (c, or 0). Layers that are not dense (quantised linears, whose
    `weight` is not a floating-point (d_out, d_in) tensor) are refused before anything changes.
    """
    model = unwrap(model)
    state = state_of(model)
    state.refuse_per_row("merge")
    for name, layer in state.targets.items():
        W = layer.weight
        if not is_dense(layer):
            raise TypeError(
                f"{name}: merge writes a dense weight and needs torch.nn.Linear, Conv1D or nn.Embedding "
                f"with a floating-point weight, got {type(layer).__name__} with a {W.dtype} weight of shape "
                f"{tuple(W.shape)}; keep the adapter attached (hooks) on quantised layers, or merge "
                f"into a dequantised copy"
            )
        shared = [n for n, p in model.named_parameters(remove_duplicate=False)
                  if p is W and n != name and not n.startswith(name + ".")]
        if shared:
            raise RuntimeError(
                f"{name}: its weight is also {shared[0]} (tied weights), so merging would change that "
                f"layer too, while the adapter changes only {name}; untie first (e.g. "
                f"model.{shared[0]} = nn.Parameter(model.{shared[0]}.detach().clone())) or keep the "
                f"adapter attached / export it to PEFT"
            )
    c = state.scale if state.enabled else 0.0
    targets = list(state.targets.items())
    with torch.no_grad():
        for i, (name, layer) in enumerate(targets):
            try:  # one layer at a time: peak extra memory is one layer's fp32 temporaries
                placed = state.variant.at_target(name, state.cfg)
                W, b = _merged(layer, placed.effective_weight(layer, state.cfg), c)
                layer.weight.copy_(to_storage(layer, W))
                if b is not None and layer.bias is None:
                    flag = state.requires_grad.get(f"{name}.weight", False)
                    layer_of(layer).bias = nn.Parameter(b, requires_grad=flag)  # the layer, not a view
                elif b is not None:
                    layer.bias.copy_(b)
            except Exception as e:  # after the checks above only resource errors get here
                raise RuntimeError(
                    f"merge failed at {name} after writing {i} of {len(targets)} targets ({e}); "
                    f"the model is now partly merged: reload the base model"
                ) from e
    state.originals.clear()  # trained `trainable_modules` keep their values: they are merged too
    detach(model)


def _merged(layer: nn.Module, eff, c: float):
    """(W + c·(W_eff − W), b + c·(b_eff − b)) in fp32, rounded once to the layer's dtypes;
    the bias is None when it does not change."""
    W_eff, b_eff = eff
    W0 = dense_weight(layer)
    if c != 1.0:
        W_eff = W0 + c * (W_eff.float() - W0)
    dtype = layer.weight.dtype
    b0 = bias(layer)
    if b_eff is None or b_eff is b0:
        b = None
    else:
        base = torch.zeros_like(b_eff, dtype=torch.float32) if b0 is None else b0.float()
        b = b_eff.float() if c == 1.0 else base + c * (b_eff.float() - base)
        b = b.to(dtype if b0 is None else b0.dtype)
    return W_eff.to(dtype), b
