"""IA3 as the paper and PEFT place it: one adapter gating the k/v outputs and the input of the FFN
down-projection (`feedforward_modules`), checked against HF PEFT's IA3 and closed forms."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from lora_lite.runtime import state_of

from conftest import assert_untouched, rel_err, snapshot

peft = pytest.importorskip("peft")
from lora_lite.interop.peft import copy_to_peft  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TARGETS = (r"\.(k|v|down)_proj$",)
FF = (r"down_proj$",)


def mixed(**kw):
    return ll.IA3Config(target_names=TARGETS, feedforward_modules=FF, **kw)


@torch.no_grad()
def perturbed(qwen, cfg=None):
    model = qwen.fresh()
    ll.attach(model, cfg or mixed())
    g = torch.Generator().manual_seed(0)
    for layer in state_of(model).targets.values():
        layer.lora_g.add_(0.3 * torch.randn(layer.lora_g.shape, generator=g))
    return model


def test_gates_sit_on_outputs_of_k_v_and_the_input_of_down_proj(qwen):
    model = perturbed(qwen)
    state = state_of(model)
    shapes = {n.rsplit(".", 1)[1]: tuple(layer.lora_g.shape) for n, layer in state.targets.items()}
    assert shapes == {"k_proj": (32,), "v_proj": (32,), "down_proj": (128,)}  # d_out, d_out, d_in
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * (32 + 32 + 128)
    assert "output on 4" in ll.describe(model).hook and "input (pre-hook) on 2" in ll.describe(model).hook


def test_mixed_ia3_matches_peft(qwen):
    """Same gates in PEFT's IA3 (its default Llama placement) -> same outputs, fp32."""
    model = perturbed(qwen)
    pm = peft.get_peft_model(qwen.fresh(), peft.IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])).eval()
    copy_to_peft(model, pm)
    shapes = {n: tuple(p.shape) for n, p in pm.named_parameters() if "ia3_l" in n and ".0." in n}
    assert shapes["base_model.model.model.layers.0.mlp.down_proj.ia3_l.default"] == (1, 128)
    assert shapes["base_model.model.model.layers.0.self_attn.k_proj.ia3_l.default"] == (32, 1)
    y = qwen.out(model)
    assert rel_err(y, qwen.out(qwen.model)) > 1e-2, "gates are a no-op; the check is vacuous"
    assert rel_err(qwen.out(pm), y) <= 1e-6


def test_export_and_import_of_the_mixed_form(qwen, tmp_path):
    model = perturbed(qwen)
    y = qwen.out(model)
    conf = ll.export_peft(model, tmp_path / "peft")
    assert conf["feedforward_modules"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    pm = peft.PeftModel.from_pretrained(qwen.fresh(), tmp_path / "peft").eval()
    assert rel_err(qwen.out(pm), y) <= 1e-6
    back = qwen.fresh()
    cfg = ll.import_peft(back, tmp_path / "peft")
    assert cfg.variant == "ia3" and cfg.feedforward_modules == (
        r"^model\.layers\.0\.mlp\.down_proj$", r"^model\.layers\.1\.mlp\.down_proj$")
    assert torch.equal(qwen.out(back), y)


@torch.no_grad()
def test_merge_is_the_closed_form(qwen):
    """W_eff = diag(g) W on output-gated targets, W diag(g) on feed-forward ones."""
    model = perturbed(qwen)
    y = qwen.out(model)
    gates = {n: layer.lora_g.clone() for n, layer in state_of(model).targets.items()}
    ll.merge(model)
    base = dict(qwen.model.named_modules())
    for n, g in gates.items():
        W = base[n].weight
        expected = W * g[None, :] if n.endswith("down_proj") else g[:, None] * W
        assert torch.equal(dict(model.named_modules())[n].weight, expected), n
    assert rel_err(qwen.out(model), y) <= 1e-5


def test_save_load_detach(qwen, tmp_path):
    model = perturbed(qwen)
    ll.save(model, tmp_path / "a.safetensors")
    again = qwen.fresh()
    ll.load(again, tmp_path / "a.safetensors")
    assert state_of(again).cfg == state_of(model).cfg
    assert torch.equal(qwen.out(again), qwen.out(model))
    ll.detach(again)
    assert torch.equal(qwen.out(again), qwen.out(qwen.model))


def test_ia3_ff_is_ia3_with_every_target_feed_forward(qwen):
    a = perturbed(qwen, ll.IA3FFConfig(target_names=(r"down_proj$",)))
    b = perturbed(qwen, ll.IA3Config(target_names=(r"down_proj$",), feedforward_modules=(r".",)))
    assert torch.equal(qwen.out(a), qwen.out(b))


def test_a_feedforward_pattern_that_matches_no_target_is_refused(qwen):
    model = qwen.fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"feedforward_modules pattern 'mlp\.down\$' matches none of the 4 targets"):
        ll.attach(model, ll.IA3Config(target_names=(r"\.(k|v)_proj$",), feedforward_modules=(r"mlp.down$",)))
    assert_untouched(model, before)
    with pytest.raises(ValueError, match="IA3Config.feedforward_modules: invalid regex"):
        ll.IA3Config(feedforward_modules=("(",))
