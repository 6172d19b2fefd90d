"""Dropout of the low-rank branch's input (PEFT's lora_dropout) on the variants whose config
has it: in training mode the change reads dropout(x) and matches PEFT drawing from the same
random state; in eval mode it is the dropout-free adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.interop.peft import copy_to_peft, peft_config, read_peft
from lora_lite.variants.lora import DropoutConfig

DROPOUT = [n for n, v in ll.REGISTRY.items() if issubclass(v.config, DropoutConfig) and v.peft is not None
           and not v.requires_calibration]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 6)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, img):
        return self.lin(x), self.conv(img)


def _setup(variant, p):
    torch.manual_seed(0)
    model = Net()
    pristine = copy.deepcopy(model)
    cfg = ll.REGISTRY[variant].config(r=2, alpha=4.0, dropout=p, target_names=(r"^(lin|conv)$",))
    ll.attach(model, cfg)
    with torch.no_grad():
        for q in model.parameters():
            if q.requires_grad:
                q.add_(0.3 * torch.randn_like(q))
    peft_model = __import__("peft").get_peft_model(pristine, peft_config(cfg, ["lin", "conv"], {"conv": "conv"}))
    copy_to_peft(model, peft_model)
    return model, peft_model, (torch.randn(5, 8), torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("variant", DROPOUT)
def test_training_mode_matches_peft_with_the_same_masks(variant):
    model, peft_model, inputs = _setup(variant, 0.5)
    model.train(), peft_model.train()
    torch.manual_seed(1)
    ours = model(*inputs)
    torch.manual_seed(1)
    theirs = peft_model(*inputs)
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, atol=1e-5)
    torch.manual_seed(2)
    assert not torch.allclose(model(*inputs)[0], ours[0])  # another draw, another mask


@pytest.mark.parametrize("variant", DROPOUT)
def test_eval_mode_is_the_adapter_without_dropout(variant):
    model, peft_model, inputs = _setup(variant, 0.5)
    model.eval(), peft_model.eval()
    undropped, _, _ = _setup(variant, 0.0)
    undropped.eval()
    for a, b, c in zip(model(*inputs), undropped(*inputs), peft_model(*inputs)):
        assert torch.equal(a, b)
        assert torch.allclose(a, c, atol=1e-5)


def test_dropout_round_trips_through_peft(tmp_path):
    model, _, _ = _setup("lora", 0.25)
    ll.export_peft(model, tmp_path)
    assert read_peft(tmp_path).config.dropout == 0.25


def test_dropout_out_of_range_is_refused():
    with pytest.raises(ValueError, match=r"LoRAConfig.dropout must be in \[0, 1\), got 1.0"):
        ll.LoRAConfig(dropout=1.0)


def test_dropout_is_refused_on_a_fused_parameter():
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2, 4, 3))

        def forward(self, x):
            return torch.einsum("eoi,...i->...eo", self.w, x)

    model = nn.Sequential(Experts())
    with pytest.raises(ValueError, match="0.w: dropout=0.1 has no input to act on at a fused parameter"):
        ll.attach(model, ll.LoRAConfig(r=2, dropout=0.1, target_parameters=(r"w$",)))
    assert not hasattr(model, "_lora_lite")
