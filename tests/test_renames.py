"""Names mean one thing: tensors and config fields renamed since lora-lite 0.1 still load from
checkpoints written with the old names (HRA's reflectors were `lora_U`, the AntiPaSTO family's
name for singular vectors; ablate's strength was `lora_alpha`, the name of PEFT's LoRA scale;
dplr's core rank was `lora_rank` beside `r`)."""

from __future__ import annotations

import json

import pytest
import torch

import lora_lite as ll

from ckpt_files import rewrite
from test_variants import attach_case, perturb

OLD = {  # case -> (old tensor names -> new, old config fields -> new)
    "hra": ({"lora_U": "lora_reflectors"}, {}),
    "antipasto_ablate": ({"lora_alpha": "lora_strength"}, {}),
    "antipasto_dplr": ({}, {"lora_rank": "core_rank"}),
}


@pytest.mark.parametrize("case", OLD)
def test_checkpoints_with_the_old_names_load_exactly(qwen, case, tmp_path):
    tensors_renamed, fields_renamed = OLD[case]
    model = qwen.fresh()
    attach_case(qwen, case, model)
    perturb(model)
    y = qwen.out(model)
    ll.save(model, tmp_path / "new.safetensors")

    def old_tensors(ts):
        for key in list(ts):
            for old, new in tensors_renamed.items():
                if key.endswith("." + new):
                    ts[key[: -len(new)] + old] = ts.pop(key)

    def old_meta(meta):
        cfg = json.loads(meta["config"])
        for old, new in fields_renamed.items():
            cfg[old] = cfg.pop(new)
        meta["config"] = json.dumps(cfg)

    old = rewrite(tmp_path / "new.safetensors", tmp_path / "old.safetensors", old_tensors, old_meta)
    adapter = ll.read(old)
    assert all(set(per) == set(ll.read(tmp_path / "new.safetensors").tensors[n]) for n, per in adapter.tensors.items())
    fresh = qwen.fresh()
    ll.load(fresh, old)
    assert torch.equal(qwen.out(fresh), y)
