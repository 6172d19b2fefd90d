"""Trainable base modules (`trainable_modules`, PEFT's modules_to_save): base parameters that
train with the adapter. attach unfreezes exactly them, save stores them as "base.<name>", load
restores them (checked before the model is touched), detach puts the attach-time values back
bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

import lora_lite as ll

from conftest import assert_untouched, snapshot


class Net(nn.Module):
    """Embedding -> two linears (the adapter's targets) -> mean pool -> classifier head."""

    def __init__(self, d_head: int = 3):
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.body = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
        self.head = nn.Linear(16, d_head)

    def forward(self, ids):
        return self.head(self.body(self.embed(ids)).mean(1))


IDS = torch.randint(0, 32, (4, 5), generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 1])


def make_net(**kw) -> Net:
    torch.manual_seed(0)
    return Net(**kw)


def cfg(**kw):
    return ll.LoRAConfig(r=2, target_names=(r"^body\.",), trainable_modules=(r"^head$", r"^embed$"), **kw)


def train(model, steps=5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(IDS), LABELS)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_attach_unfreezes_exactly_adapter_and_trainable_modules():
    net = make_net()
    net.head.bias.requires_grad_(False)  # a flag attach changes and detach must restore
    before = snapshot(net)
    ll.attach(net, cfg())
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"embed.weight", "head.weight", "head.bias",
                         "body.0.lora_A", "body.0.lora_B", "body.2.lora_A", "body.2.lora_B"}
    nn.functional.cross_entropy(net(IDS), LABELS).backward()
    for n in ("embed.weight", "head.weight", "head.bias"):
        g = net.get_parameter(n).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
    for p in net.parameters():
        p.grad = None
    ll.detach(net)
    assert_untouched(net, before)  # flags too: head.bias frozen again


def test_trained_head_is_saved_and_reloaded(tmp_path):
    net = make_net()
    pristine = copy.deepcopy(net)
    ll.attach(net, cfg())
    train(net)
    assert not torch.equal(net.head.weight, pristine.head.weight)
    y = net(IDS).detach()
    ll.save(net, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["trainable"] == '["head.weight", "head.bias", "embed.weight"]'
        assert torch.equal(f.get_tensor("base.head.weight"), net.head.weight.detach())
    assert {k for k in keys if k.startswith("base.")} == {"base.head.weight", "base.head.bias", "base.embed.weight"}

    fresh = copy.deepcopy(pristine)
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(fresh(IDS), y)
    assert torch.equal(fresh.head.weight, net.head.weight) and torch.equal(fresh.embed.weight, net.embed.weight)
    assert fresh.head.weight.requires_grad and not fresh.body[0].weight.requires_grad
    ll.detach(fresh)  # back to the pristine head it was loaded onto
    assert torch.equal(fresh.head.weight, pristine.head.weight) and torch.equal(fresh(IDS), pristine(IDS))


def test_detach_restores_the_original_head_bit_for_bit():
    net = make_net()
    before = snapshot(net)
    y0 = net(IDS).detach()
    ll.attach(net, cfg())
    train(net)
    ll.detach(net)
    assert_untouched(net, before)
    assert torch.equal(net(IDS), y0)
    ll.attach(net, cfg())  # attach -> detach -> attach
    assert torch.equal(net(IDS), y0)


def test_embedding_of_an_hf_decoder_trains_and_reloads(qwen, tmp_path):
    model = qwen.fresh()
    c = ll.LoRAConfig(r=2, target_names=(r"q_proj$",), trainable_modules=(r"embed_tokens$",))
    ll.attach(model, c)
    assert model.model.embed_tokens.weight.requires_grad
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**qwen.batch).logits.square().mean().backward()
    opt.step()
    y = qwen.out(model)
    ll.save(model, tmp_path / "a.safetensors")
    fresh = qwen.fresh()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(qwen.out(fresh), y)
    ll.detach(model)
    assert torch.equal(model.model.embed_tokens.weight, qwen.model.model.embed_tokens.weight)


@pytest.mark.parametrize(
    "modules, exc, match",
    [
        ((r"^nothing$",), ValueError, r"trainable_modules: '\^nothing\$' matches no module of this model; top-level modules: embed, body, head"),
        ((r"^body$",), ValueError, r"'body' overlaps the adapter target 'body.0'; a layer is either adapted or trained in full"),
        ((r"^body\.0$",), ValueError, r"'body.0' overlaps the adapter target 'body.0'"),
        ((r"^body\.1$",), ValueError, r"'body.1' \(GELU\) has no parameters"),
    ],
)
def test_bad_trainable_modules_are_refused_untouched(modules, exc, match):
    net = make_net()
    before = snapshot(net)
    with pytest.raises(exc, match=match):
        ll.attach(net, ll.LoRAConfig(r=2, target_names=(r"^body\.",), trainable_modules=modules))
    assert_untouched(net, before)


def test_config_validates_trainable_modules():
    with pytest.raises(ValueError, match=r"trainable_modules: invalid regex"):
        ll.LoRAConfig(trainable_modules=("(",))
    with pytest.raises(ValueError, match=r"trainable_modules: expected"):
        ll.LoRAConfig(trainable_modules="head")


def test_load_refuses_a_base_whose_trainable_modules_do_not_fit(tmp_path):
    net = make_net()
    ll.attach(net, cfg())
    ll.save(net, tmp_path / "a.safetensors")
    for other, match in [
        (make_net(d_head=5), r"base\.head\.weight is torch\.float32 \(3, 16\), this model's head\.weight is torch\.float32 \(5, 16\)"),
        (make_net().double(), r"base\.head\.weight is torch\.float32 \(3, 16\), this model's head\.weight is torch\.float64"),
    ]:
        before = snapshot(other)
        with pytest.raises(ll.CheckpointError, match=match):
            ll.load(other, tmp_path / "a.safetensors")
        assert_untouched(other, before)
    no_head = make_net()
    del no_head.head
    no_head.classifier = nn.Linear(16, 3)
    before = snapshot(no_head)
    with pytest.raises(ValueError, match=r"'\^head\$' matches no module"):
        ll.load(no_head, tmp_path / "a.safetensors")
    assert_untouched(no_head, before)


@pytest.mark.slow  # a short demo run on the real MiniLM
def test_demo_trains_its_head_as_a_trainable_module(tmp_path, capsys, one_thread, monkeypatch):
    """`lora-lite demo` (a few steps, 200-sentence splits): the head is saved in the adapter
    file and reloaded. (`one_thread` restores the thread count the demo sets.)"""
    from lora_lite import tasks
    from lora_lite.demo import main

    make_split = tasks.make_split
    monkeypatch.setattr(tasks, "make_split", lambda task, split, n, seed: make_split(task, split, min(n, 200), seed))

    assert main(["--steps", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "+ 770 head params" in out and "-> OK" in out
    with safe_open(str(tmp_path / "adapter.safetensors"), framework="pt") as f:
        assert {"base.head.weight", "base.head.bias"} <= set(f.keys())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]


def test_a_tied_weight_of_a_target_is_refused():
    net = make_net(d_head=16)
    net.head.weight = net.body[0].weight  # tied, like an LM head and its embedding
    before = snapshot(net)
    with pytest.raises(ValueError, match=r"head\.weight is also a parameter of the adapter target 'body\.0' \(tied weights\)"):
        ll.attach(net, ll.LoRAConfig(r=2, target_names=(r"^body\.0$",), trainable_modules=(r"^head$",)))
    assert_untouched(net, before)


def test_merge_keeps_the_trained_modules():
    """merge bakes the adapter into W and keeps the trained head: the merged plain model
    computes what the attached one did (detach, by contrast, restores the original head)."""
    model = make_net()
    ll.attach(model, cfg())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    y = model(IDS)
    head = model.head.weight.clone()
    ll.merge(model)
    assert torch.equal(model.head.weight, head)
    assert torch.allclose(model(IDS), y, rtol=1e-5, atol=1e-6)


def test_peft_export_carries_trained_base_modules_as_modules_to_save(tmp_path):
    peft = pytest.importorskip("peft")
    model = make_net()
    ll.attach(model, cfg())
    train(model, steps=2)
    y = model(IDS)
    ll.save(model, tmp_path / "a.safetensors")
    for source, out in ((model, "from_model"), (tmp_path / "a.safetensors", "from_file")):
        fields = ll.export_peft(source, tmp_path / out)
        assert fields["modules_to_save"] == ["head", "embed"] or fields["modules_to_save"] == ["embed", "head"]
        loaded = peft.PeftModel.from_pretrained(make_net(), tmp_path / out).eval()
        with torch.no_grad():
            assert torch.allclose(loaded(IDS), y, atol=1e-6)
