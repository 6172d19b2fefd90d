"""A real conv client: a tiny diffusers UNet2DConditionModel (random init from a config) with
LoRA on its ResNet convolutions and attention projections: a training step, merge, and the
export loaded by HF PEFT into the same UNet, all computing the same outputs. Marked slow:
importing diffusers alone takes 10-30 s on the CI machine; the tests take about 8 s."""

from __future__ import annotations

import copy

import pytest
import torch

import lora_lite as ll

pytestmark = pytest.mark.slow

TARGETS = (r"resnets\.\d+\.conv[12]$", r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")


def tiny_unet():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def _inputs():
    torch.manual_seed(1)
    return torch.randn(2, 4, 8, 8), torch.tensor([1, 10]), torch.randn(2, 5, 32)


@pytest.fixture(scope="module")
def trained():
    unet = tiny_unet()
    sample, t, text = _inputs()
    base = unet(sample, t, text).sample
    ll.attach(unet, ll.LoRAConfig(r=4, alpha=8.0, target_names=TARGETS))
    assert torch.equal(unet(sample, t, text).sample, base)
    kinds = {type(unet.get_submodule(n)).__name__ for n in ll.describe(unet).targets}
    assert kinds == {"Conv2d", "Linear"}
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    unet.train()
    loss = torch.nn.functional.mse_loss(unet(sample, t, text).sample, torch.randn_like(sample))
    loss.backward()
    opt.step()
    unet.eval()
    y = unet(sample, t, text).sample
    assert (y - base).abs().max() > 1e-4  # the step moved both kinds' B off zero
    return unet, y


def test_merge_is_the_adapted_unet(trained):
    unet, y = trained
    merged = copy.deepcopy(unet)
    ll.merge(merged)
    assert torch.allclose(merged(*_inputs()).sample, y, atol=1e-5)


def test_peft_loads_the_export_into_the_same_unet(trained, tmp_path):
    unet, y = trained
    peft = pytest.importorskip("peft")
    ll.export_peft(unet, tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_unet(), tmp_path).eval()
    sample, t, text = _inputs()
    assert torch.allclose(loaded(sample, t, text).sample, y, atol=1e-5)
    back = tiny_unet()
    ll.import_peft(back, tmp_path)
    assert torch.allclose(back(sample, t, text).sample, y, atol=1e-6)
