"""ll.swap: another saved adapter's values into the attached one, in place, without recompiling.

The reference is `ll.load` of the same file onto a pristine base; the compile test counts the
frames dynamo compiles across swaps (`CompileCounter`)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import lora_lite as ll
from lora_lite.runtime import state_of

from cases import CASE_PARAMS
from test_variants import attach_case, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def saved(bench, case, path, seed):
    model = bench.fresh()
    attach_case(bench, case, model)
    with torch.no_grad():
        perturb(model, seed=seed)
    ll.save(model, path)
    return bench.out(model)


def adapter_values(model):
    state = state_of(model)
    return {(n, p): getattr(layer, p).detach().clone() for n, layer in state.targets.items() for p in state.specs[n]}


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_swap_gives_what_load_gives(qwen, case, tmp_path):
    want_a = saved(qwen, case, tmp_path / "a.safetensors", seed=1)
    want_b = saved(qwen, case, tmp_path / "b.safetensors", seed=2)
    model = qwen.fresh()
    ll.load(model, tmp_path / "a.safetensors")
    params = {id(p) for p in model.parameters()}
    ll.swap(model, tmp_path / "b.safetensors")
    assert torch.equal(qwen.out(model), want_b)
    ll.swap(model, ll.read(tmp_path / "a.safetensors"))
    assert torch.equal(qwen.out(model), want_a)
    assert {id(p) for p in model.parameters()} == params  # the same objects: optimizers and graphs see them


def test_swap_does_not_recompile(qwen, tmp_path):
    torch._dynamo.reset()
    outs = [saved(qwen, "lora", tmp_path / f"{i}.safetensors", seed=i) for i in range(3)]
    model = qwen.fresh()
    ll.load(model, tmp_path / "0.safetensors")
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    for i in (0, 1, 2, 0):
        ll.swap(model, tmp_path / f"{i}.safetensors")
        assert torch.allclose(qwen.out(compiled), outs[i], rtol=0, atol=1e-5)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_swap_carries_trainable_modules(qwen, tmp_path):
    cfg = ll.LoRAConfig(r=4, trainable_modules=(r"^lm_head$",), exclude_names=(r"lm_head$",))
    outs = []
    for seed in (1, 2):
        model = qwen.fresh()
        ll.attach(model, cfg)
        with torch.no_grad():
            perturb(model, seed=seed)
        ll.save(model, tmp_path / f"{seed}.safetensors")
        outs.append(qwen.out(model))
    model = qwen.fresh()
    ll.load(model, tmp_path / "1.safetensors")
    ll.swap(model, tmp_path / "2.safetensors")
    assert torch.equal(qwen.out(model), outs[1])
    ll.detach(model)  # detach puts the attach-time head back: the pristine base
    assert torch.equal(qwen.out(model), qwen.out(qwen.model))


def test_swap_refuses_a_file_that_does_not_fit_and_changes_nothing(qwen, tmp_path):
    saved(qwen, "lora", tmp_path / "a.safetensors", seed=1)
    model = qwen.fresh()
    ll.load(model, tmp_path / "a.safetensors")
    before = adapter_values(model)
    others = {
        "alpha is 4.0 in the file, 8.0 here": ll.LoRAConfig(r=4, alpha=4.0),
        "same targets": ll.LoRAConfig(r=4, alpha=8.0, target_names=(r"q_proj$",)),
        "torch.bfloat16 in the file": ll.LoRAConfig(r=4, alpha=8.0, dtype=torch.bfloat16),
    }
    for i, (message, cfg) in enumerate(others.items()):
        other = qwen.fresh()
        ll.attach(other, cfg)
        ll.save(other, tmp_path / f"o{i}.safetensors")
        with pytest.raises(ll.CheckpointError, match=message):
            ll.swap(model, tmp_path / f"o{i}.safetensors")
    other = qwen.fresh()
    ll.attach(other, ll.DoRAConfig(r=4, alpha=8.0))
    with pytest.raises(ll.CheckpointError, match="variant is 'dora' in the file, 'lora' here"):
        ll.swap(model, ll.adapter_of(other))
    after = adapter_values(model)
    assert all(torch.equal(after[k], v) for k, v in before.items())
