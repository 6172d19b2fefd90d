"""r above min(d_in, d_out) where the variant's math allows it (`Variant.wide_ranks`), as PEFT
allows LoRA's default r = 8 on a 2-wide head; the others refuse."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.interop.peft import copy_to_peft, peft_config

WIDE = [n for n, v in ll.REGISTRY.items() if v.wide_ranks]
NARROW = [n for n, v in ll.REGISTRY.items() if v.uses_rank and not v.wide_ranks and v.examples]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))


def _cfg(variant, r=None):
    fields = {k: v for k, v in next(iter(ll.REGISTRY[variant].examples.values())).fields.items() if k != "layers"}
    return ll.REGISTRY[variant].config(target_names=(r"^(0|2)$",), **{**fields, "r": r or fields.get("r", 8)})


@pytest.mark.parametrize("variant", WIDE)
def test_wide_rank_trains_merges_and_matches_peft(variant):
    model, x = _model(), torch.randn(4, 6)
    pristine = copy.deepcopy(model)
    ll.attach(model, _cfg(variant, 8))  # 8 > min(6, 5) and > min(5, 2)
    assert model[2].lora_A.shape == (8, 5)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    y = model(x)
    merged = copy.deepcopy(model)
    ll.merge(merged)
    assert torch.allclose(merged(x), y, atol=1e-5)
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(copy.deepcopy(pristine), peft_config(model._lora_lite.cfg, ["0", "2"]))
    copy_to_peft(model, peft_model)
    assert torch.allclose(peft_model(x), y, atol=1e-5)


@pytest.mark.parametrize("variant", NARROW)
def test_other_ranked_variants_refuse_a_wide_rank(variant):
    model, cfg = _model(), _cfg(variant)  # the example's r (> 2) on the 5 -> 2 head
    with pytest.raises(ValueError, match=rf"r={cfg.r} exceeds min\(d_in, d_out\)=min\(.*\), which variant {variant!r} needs"):
        ll.attach(model, cfg)
    assert not hasattr(model, "_lora_lite")
