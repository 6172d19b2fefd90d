"""A copy of an attached model, made as users make it, is an independent attached model.

`copy.deepcopy` (a DPO reference model, an EMA copy, an evaluation copy) and a whole-model
`torch.save` / `torch.load(weights_only=False)` carry the hooks and the attach state together:
`disabled`, `scaled`, `reconfigure`, `detach`, `save` and training on either model change that
model only. Every variant's primary case; in the fast tier the first of each hook kind
(`cases.HOOK_KINDS`: output hook, pre-hook, gate, a run-time field).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

import lora_lite as ll
from cases import CASES, HOOK_KINDS, primary_params
from lora_lite.variant import REGISTRY
from test_variants import attach_case, perturb

# a variant with a run-time field (a steering coefficient) for the reconfigure test
RUNTIME = next((c for c in HOOK_KINDS if REGISTRY[CASES[c](()).variant].runtime_fields), None)


def adapted(bench, case):
    model = bench.fresh()
    attach_case(bench, case, model)
    perturb(model)  # off init, so adapted != base
    return model


def assert_adapted(bench, model, y_adapted):
    assert torch.equal(bench.out(model), y_adapted)


@pytest.fixture(params=["deepcopy", "torch.save"])
def copier(request):
    def deepcopy(model):
        return copy.deepcopy(model)

    def whole_model_save(model):
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=False)

    return deepcopy if request.param == "deepcopy" else whole_model_save


@pytest.mark.parametrize("case", primary_params())
def test_switches_of_a_copy_are_its_own(qwen, copier, case):
    model = adapted(qwen, case)
    y_base, y_adapted = qwen.out(qwen.model), qwen.out(model)
    assert not torch.equal(y_adapted, y_base)
    twin = copier(model)
    assert_adapted(qwen, twin, y_adapted)

    with ll.disabled(model):  # the original is the base, the copy stays adapted
        assert torch.equal(qwen.out(model), y_base)
        assert_adapted(qwen, twin, y_adapted)
    with ll.disabled(twin):
        assert torch.equal(qwen.out(twin), y_base)
        assert_adapted(qwen, model, y_adapted)
    with ll.scaled(twin, 0.0):
        assert torch.equal(qwen.out(twin), y_base)
        assert_adapted(qwen, model, y_adapted)
    with ll.scaled(model, -1.0):
        assert not torch.equal(qwen.out(model), y_adapted)
        assert_adapted(qwen, twin, y_adapted)


@pytest.mark.skipif(RUNTIME is None, reason="no variant has a run-time field")
def test_reconfigure_of_a_copy_is_its_own(qwen, copier):
    model = adapted(qwen, RUNTIME)
    y_adapted = qwen.out(model)
    twin = copier(model)
    field = REGISTRY[ll.describe(model).variant].runtime_fields[0]
    before = getattr(ll.describe(model).config, field)
    ll.reconfigure(twin, **{field: 0.0 * before})
    assert not torch.equal(qwen.out(twin), y_adapted)
    assert_adapted(qwen, model, y_adapted)
    assert getattr(ll.describe(model).config, field) == before


@pytest.mark.parametrize("case", primary_params())
def test_detach_of_a_copy_leaves_the_original_attached(qwen, copier, case):
    model = adapted(qwen, case)
    y_adapted = qwen.out(model)
    twin = copier(model)
    ll.detach(twin)
    assert torch.equal(qwen.out(twin), qwen.out(qwen.model))
    assert not any(n.startswith("lora_") for n, _ in twin.named_parameters())
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in twin.modules()) == 0
    assert_adapted(qwen, model, y_adapted)
    ll.detach(model)  # and the original detaches on its own
    assert torch.equal(qwen.out(model), qwen.out(qwen.model))


@pytest.mark.parametrize("case", primary_params())
def test_training_and_saving_a_copy_leave_the_original(qwen, copier, tmp_path, case):
    model = adapted(qwen, case)
    y_adapted = qwen.out(model)
    twin = copier(model)
    perturb(twin, seed=7)  # "train" the copy
    y_twin = qwen.out(twin)
    assert not torch.equal(y_twin, y_adapted)
    assert_adapted(qwen, model, y_adapted)
    ll.save(twin, tmp_path / "twin.safetensors")
    ll.save(model, tmp_path / "orig.safetensors")
    for path, expected in (("twin", y_twin), ("orig", y_adapted)):
        fresh = qwen.fresh()
        ll.load(fresh, tmp_path / f"{path}.safetensors")
        assert torch.equal(qwen.out(fresh), expected), path
