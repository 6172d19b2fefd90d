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


# ---- the gate form: t ⊙ (1 + c·(g − 1)) as one product ------------------------------------------


def _gated_layer(variant: str, dtype: torch.dtype, g: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8)).to(dtype)
    cfg = ll.IA3Config(target_names=("0",)) if variant == "ia3" else ll.IA3FFConfig(target_names=("0",))
    ll.attach(layer, cfg)
    with torch.no_grad():
        layer[0].lora_g.copy_(g)
    return layer


@pytest.mark.parametrize("variant", ["ia3", "ia3_ff"])
@pytest.mark.parametrize("c", [1.0, 0.5, -1.0, 0.0])
def test_the_gate_hook_is_the_additive_change(variant, c):
    """The hook's one product equals base + c·Δ from the variant's own delta in float64, and is
    the base to the bit at c = 0."""
    g = torch.linspace(0.2, 1.8, 8)
    layer = _gated_layer(variant, torch.float32, g)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    W, b = layer[0].weight.double(), layer[0].bias.double()
    gd = g.double()
    ref = (x.double() @ W.T + b) * (1 + c * (gd - 1)) if variant == "ia3" else (
        (x.double() * (1 + c * (gd - 1))) @ W.T + b)
    with torch.no_grad(), ll.scaled(layer, c):
        y = layer(x)
        with ll.disabled(layer):
            y0 = layer(x)
    assert rel_err(y.double(), ref) <= 1e-6
    if c == 0:
        assert torch.equal(y, y0)


@pytest.mark.parametrize("variant", ["ia3", "ia3_ff"])
def test_a_bf16_activation_is_gated_by_the_fp32_gate_and_rounded_once(variant):
    """g = 1 + 3·2⁻⁹ is 1 + 2⁻⁷ in bf16. The product runs in fp32 (the gate's dtype) and is
    rounded to bf16 once, as PEFT's IA3 does: the output is the fp32-product reference to the
    bit, and differs from what a gate cast to bf16 first would give."""
    g = torch.full((8,), 1 + 3 * 2.0 ** -9)
    assert g.bfloat16().float().eq(1 + 2.0 ** -7).all()
    layer = _gated_layer(variant, torch.bfloat16, g)
    x = (torch.randn(64, 8, generator=torch.Generator().manual_seed(2)) * 4).bfloat16()
    lin = layer[0]
    with torch.no_grad():
        y = layer(x)
        with ll.disabled(layer):
            y0 = layer(x)

        def out(gate):
            if variant == "ia3":
                return (y0.float() * gate).bfloat16() if gate.dtype == torch.float32 else y0 * gate
            xg = (x.float() * gate).bfloat16() if gate.dtype == torch.float32 else x * gate
            return torch.nn.functional.linear(xg, lin.weight, lin.bias)

        assert torch.equal(y, out(g))
        assert not torch.equal(y, out(g.bfloat16()))


def test_a_gate_with_scale_outside_is_refused():
    from dataclasses import dataclass, field

    from lora_lite.config import CONFIGS, AdapterConfig
    from lora_lite.variant import REGISTRY, register
    from lora_lite.variants.ia3 import IA3

    @dataclass(frozen=True, kw_only=True)
    class BadCfg(AdapterConfig):
        variant: str = field(default="bad_gate", init=False)

    class Bad(IA3):
        name, config, scale_outside = "bad_gate", BadCfg, True

    with pytest.raises(TypeError, match="a gate is applied as .*scale_outside does not apply"):
        register(Bad)
    assert "bad_gate" not in REGISTRY and "bad_gate" not in CONFIGS


def test_compute_adapter_runs_the_gate_product_in_the_adapter_dtype():
    """compute="adapter" with bf16 gates on an fp32 layer: the activation is cast to bf16, gated
    there and cast back, as the additive form did."""
    torch.manual_seed(0)
    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    ll.attach(layer, ll.IA3Config(target_names=("0",), dtype=torch.bfloat16, compute="adapter"))
    with torch.no_grad():
        layer[0].lora_g.copy_(torch.linspace(0.5, 1.5, 8))
        x = torch.randn(4, 8)
        y = layer(x)
        with ll.disabled(layer):
            y0 = layer(x)
    g = layer[0].lora_g
    assert g.dtype == torch.bfloat16
    assert torch.equal(y, (y0.bfloat16() * g).float())
