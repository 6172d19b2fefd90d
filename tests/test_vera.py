"""VeRA and the shared tensors it is built on (ParamSpec shared=True).

Checked against HF PEFT 0.21's VeRA (the same random projections from the same key, the same
outputs, the same 50-step AdamW trajectory) and against closed forms written here: one tensor in
memory across targets and copies, stored once in a checkpoint, exact rollback and detach.
"""

from __future__ import annotations

import copy
import io
import json
import math

import pytest
import torch
from safetensors import safe_open

import lora_lite as ll
from lora_lite.cli import describe
from lora_lite.runtime import state_of

from conftest import assert_untouched, rel_err, snapshot
from test_variants import perturb

peft = pytest.importorskip("peft")

from lora_lite.interop.peft import copy_to_peft, peft_config  # noqa: E402

R = 16


def attached(bench, **fields):
    model = bench.fresh()
    ll.attach(model, ll.VeRAConfig(r=R, target_names=bench.targets, **fields))
    return model


def test_projections_are_drawn_as_peft_draws_them_and_shared_by_every_target(qwen):
    model = attached(qwen, projection_prng_key=7)
    state = state_of(model)
    A, B = state.shared["lora_A"], state.shared["lora_B"]
    d_in = max(layer.in_features for layer in state.targets.values())
    d_out = max(layer.out_features for layer in state.targets.values())
    assert A.shape == (R, d_in) and B.shape == (d_out, R)
    g = torch.Generator().manual_seed(7)  # A then B, each U(±√(6 / fan_in)), as PEFT's _kaiming_init
    assert torch.equal(A, torch.empty(R, d_in).uniform_(-math.sqrt(6 / d_in), math.sqrt(6 / d_in), generator=g))
    assert torch.equal(B, torch.empty(d_out, R).uniform_(-math.sqrt(6 / R), math.sqrt(6 / R), generator=g))
    theirs = peft.get_peft_model(qwen.fresh(), peft_config(state.cfg, list(state.targets))).base_model
    assert torch.equal(theirs.vera_A["default"], A) and torch.equal(theirs.vera_B["default"], B)
    for layer in state.targets.values():  # one tensor, not copies
        assert layer.lora_A is A and layer.lora_B is B
        assert torch.equal(layer.lora_lambda_d, torch.full((R,), 0.1)) and not layer.lora_lambda_b.any()
    assert not A.requires_grad and not B.requires_grad


def test_delta_is_the_papers_formula(qwen):
    model = attached(qwen)
    perturb(model)
    for layer in state_of(model).targets.values():
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        A, B = layer.lora_A[:, : layer.in_features], layer.lora_B[: layer.out_features]
        expected = x @ layer.weight.T + (x @ A.T * layer.lora_lambda_d) @ B.T * layer.lora_lambda_b
        with torch.no_grad():
            assert rel_err(layer(x), expected) <= 1e-6


def test_checkpoint_holds_the_projections_once(qwen, tmp_path):
    model = attached(qwen)
    perturb(model)
    ll.save(model, tmp_path / "a.safetensors")
    state = state_of(model)
    trainable = sum(R + layer.out_features for layer in state.targets.values())  # d and b per target
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        stored = {k: f.get_tensor(k).numel() for k in f.keys()}
        assert json.loads(f.metadata()["shared"]) == ["lora_A", "lora_B"]
    shared = stored.pop("shared.lora_A") + stored.pop("shared.lora_B")
    assert shared == state.shared["lora_A"].numel() + state.shared["lora_B"].numel()
    assert sum(stored.values()) == trainable  # every other value is a trained one
    seen = describe(str(tmp_path / "a.safetensors"))  # `lora-lite inspect`
    assert (seen["trainable_parameters"], seen["stored_parameters"]) == (trainable, trainable + shared)
    assert seen["tensors"]["shared.lora_A"]["count"] == 1 and not seen["tensors"]["shared.lora_A"]["trainable"]


def test_copies_moves_and_detach_keep_one_projection_each(qwen):
    model = attached(qwen)
    perturb(model)
    y = qwen.out(model)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    pickled = torch.load(buf, weights_only=False)
    for m in (twin, pickled):
        s = state_of(m)
        assert all(layer.lora_A is s.shared["lora_A"] for layer in s.targets.values())
        assert torch.equal(qwen.out(m), y)
    with torch.no_grad():  # the copy's projection is its own
        state_of(twin).shared["lora_B"].mul_(2.0)
    assert torch.equal(qwen.out(model), y) and not torch.equal(qwen.out(twin), y)
    half = copy.deepcopy(model).half()  # .to() converts the tied Parameter in place: still one
    s = state_of(half)
    assert s.shared["lora_A"].dtype == torch.float16
    assert all(layer.lora_A is s.shared["lora_A"] for layer in s.targets.values())
    ll.detach(model)
    assert torch.equal(qwen.out(model), qwen.out(qwen.model))
    assert not any("lora_" in n for n in model.state_dict())


def test_a_failure_after_the_projections_exist_rolls_back(qwen, monkeypatch):
    model = qwen.fresh()
    before = snapshot(model)
    calls = []

    def fail_on_third(layer, cfg, stats):
        calls.append(layer)
        if len(calls) == 3:
            raise RuntimeError("injected fault")

    monkeypatch.setattr(ll.REGISTRY["vera"], "init", staticmethod(fail_on_third))
    with pytest.raises(RuntimeError, match="injected fault"):
        ll.attach(model, ll.VeRAConfig(r=R))
    assert_untouched(model, before)


def test_load_refuses_projections_made_for_other_targets(qwen, tmp_path):
    model = attached(qwen)
    ll.save(model, tmp_path / "a.safetensors")
    narrower = qwen.fresh()  # the same target names and per-target tensors, a narrower widest input
    for layer in narrower.modules():
        if hasattr(layer, "down_proj"):
            layer.down_proj = torch.nn.Linear(96, 64, bias=False)
    before = snapshot(narrower)
    with pytest.raises(ll.CheckpointError, match=r"shared\.lora_A is torch.float32 \(16, 128\), these targets "
                                                 r"need torch.float32 \(16, 96\)"):
        ll.load(narrower, tmp_path / "a.safetensors")
    assert_untouched(narrower, before)


def test_import_refuses_an_adapter_saved_without_its_projections(qwen, tmp_path):
    pm = peft.get_peft_model(qwen.fresh(), peft.VeraConfig(r=R, target_modules=["q_proj"], save_projection=False))
    pm.save_pretrained(tmp_path / "p")
    with pytest.raises(ValueError, match="save_projection=False"):
        ll.import_peft(qwen.fresh(), tmp_path / "p")


def test_fifty_training_steps_follow_peft(qwen):
    """The same tensors and the same AdamW on the same batches: the same loss curve."""
    ours = attached(qwen)
    state = state_of(ours)
    theirs = peft.get_peft_model(qwen.fresh(), peft_config(state.cfg, list(state.targets)))
    copy_to_peft(ours, theirs)
    ids = qwen.batch["input_ids"]

    def losses(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        out = []
        for _ in range(50):
            loss = model(**qwen.batch, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    mine, peft_losses = losses(ours.train()), losses(theirs.train())
    assert peft_losses[-1] < peft_losses[0] - 0.1, "training moved nothing; the comparison is vacuous"
    assert max(abs(a - b) / abs(b) for a, b in zip(mine, peft_losses)) <= 1e-5
    inner = theirs.base_model.model
    for name, layer in state.targets.items():
        t = inner.get_submodule(name)
        assert rel_err(layer.lora_lambda_b, t.vera_lambda_b["default"]) <= 1e-4, name
        assert rel_err(layer.lora_lambda_d, t.vera_lambda_d["default"]) <= 1e-4, name
