"""Gradient checkpointing (HF's, both torch.utils.checkpoint modes) with attached adapters.

Checkpointing recomputes each decoder block in the backward pass, hooks included, so adapter
gradients must equal the non-checkpointed ones: tested for every variant's primary case (output
hooks, input pre-hooks, gates; calibrated ones with their data). With `use_reentrant=True` the reentrant checkpoint
only back-propagates into a block whose inputs require grad; with every base parameter frozen
they do not unless the embedding output is made to (`model.enable_input_require_grads()`).
"""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll

from cases import PRIMARY
from conftest import make_qwen, rel_err
from test_variants import attach_case

pytestmark = pytest.mark.slow  # training steps with recomputation


@pytest.fixture(scope="module")
def bench():
    return make_qwen()


def attached(bench, case):
    model = bench.fresh().train()
    torch.manual_seed(0)  # the same random init in both models compared
    attach_case(bench, case, model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move off init so every trainable (LoRA's A too) gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def enable_checkpointing(model, reentrant: bool) -> None:
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def adapter_grads(model, batch) -> dict[str, torch.Tensor | None]:
    ids = batch["input_ids"]
    model(**batch, labels=ids).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("case", PRIMARY)
def test_checkpointed_adapter_gradients_equal_plain_ones(bench, case, reentrant):
    plain = adapter_grads(attached(bench, case), bench.batch)
    model = attached(bench, case)
    model.enable_input_require_grads()  # transformers >= 5 does this in the call below, 4.x not
    enable_checkpointing(model, reentrant)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ckpt = adapter_grads(model, bench.batch)
    assert plain.keys() == ckpt.keys()
    for name, g in plain.items():
        assert g is not None and g.abs().max() > 0, name
        assert rel_err(ckpt[name], g) <= 1e-6, name


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpointing_without_input_grads_cannot_reach_the_adapter(bench):
    model = attached(bench, PRIMARY[0])
    enable_checkpointing(model, reentrant=True)
    model.disable_input_require_grads()  # undo what transformers >= 5 enables on its own
    with pytest.raises(RuntimeError, match="does not require grad"):
        adapter_grads(model, bench.batch)


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_reentrant_checkpointing_without_input_grads_silently_skips_inner_adapters(bench):
    """With an adapter outside the checkpointed blocks (lm_head) the loss requires grad, so
    nothing raises, yet the adapters inside the blocks get no gradient."""
    model = bench.fresh().train()
    ll.attach(model, ll.LoRAConfig(r=4, target_names=(r"q_proj$", r"^lm_head$"), exclude_names=()))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    enable_checkpointing(model, reentrant=True)
    model.disable_input_require_grads()
    grads = adapter_grads(model, bench.batch)
    assert all(g is not None for n, g in grads.items() if n.startswith("lm_head."))
    assert all(g is None for n, g in grads.items() if ".q_proj." in n)
