"""Coming from PEFT: `ll.from_peft_config` selects the modules PEFT's own config selects and
computes PEFT's function with the same tensors; PEFT's field names in a config get their
translation (`PEFT_NAMES`), and docs/from-peft.md shows that same table."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lora_lite as ll
from lora_lite.config import PEFT_NAMES
from lora_lite.interop.peft import copy_to_peft
from lora_lite.interop.peft_config import names_table
from lora_lite.runtime import state_of

from conftest import rel_err
from test_variants import perturb

peft = pytest.importorskip("peft")
DOC = Path(__file__).resolve().parents[1] / "docs" / "from-peft.md"

CONFIGS = {
    "list": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "regex": lambda: peft.LoraConfig(r=2, lora_alpha=6, target_modules=r".*\.mlp\.(up|down)_proj"),
    "all-linear": lambda: peft.LoraConfig(r=2, lora_alpha=2, target_modules="all-linear"),
    "exclude+layers": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"],
                                              exclude_modules=["o_proj"], layers_to_transform=[1]),
    "rslora": lambda: peft.LoraConfig(r=4, lora_alpha=4, use_rslora=True, target_modules=["k_proj"]),
    "dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "down_proj"]),
    "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
}


def _peft_targets(pm) -> set[str]:
    inner = pm.base_model.model
    return {n for n, m in inner.named_modules()
            if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) and not n.endswith(".base_layer")}


@pytest.mark.parametrize("case", list(CONFIGS))
def test_the_same_targets_and_function_as_peft(qwen, case):
    pcfg = CONFIGS[case]()
    cfg = ll.from_peft_config(pcfg)
    assert ll.from_peft_config(pcfg.to_dict()) == cfg  # the object and its dict
    model = qwen.fresh()
    ll.attach(model, cfg)
    theirs = peft.get_peft_model(qwen.fresh(), CONFIGS[case]()).eval()
    assert set(state_of(model).targets) == _peft_targets(theirs)
    perturb(model)
    copy_to_peft(model, theirs)  # our tensors in PEFT's layers, under PEFT's own scale and placement
    assert rel_err(qwen.out(theirs), qwen.out(model)) <= 1e-5


def test_modules_to_save_trains_the_same_modules(qwen):
    # "lm_head": no other module name ends with it (PEFT 0.21 matched modules_to_save by a plain
    # endswith, "norm" taking every "*_layernorm"; 0.22 by dotted suffix, as from_peft_config does)
    pcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = qwen.fresh()
    ll.attach(model, ll.from_peft_config(pcfg))
    ours = {n.rpartition(".")[0] for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n}
    theirs = peft.get_peft_model(qwen.fresh(), pcfg)
    wrapped = {n for n, m in theirs.base_model.model.named_modules()
               if isinstance(m, peft.utils.other.ModulesToSaveWrapper)}
    assert ours == wrapped and ours


@pytest.mark.parametrize("pcfg, match", [
    (lambda: peft.LoraConfig(r=4, init_lora_weights="pissa", target_modules=["q_proj"]),
     r"init_lora_weights='pissa' is not supported: .*variant of its own"),
    (lambda: peft.LoraConfig(r=4, rank_pattern={"q_proj": 2}, target_modules=["q_proj"]),
     r"rank_pattern=\{'q_proj': 2\} is not supported: one config has one rank"),
    (lambda: peft.LoraConfig(r=4, lora_bias=True, target_modules=["q_proj"]),
     r"PEFT option lora_bias=True is not supported: PEFT adds a trainable bias"),  # import_peft's message
    (lambda: peft.LoraConfig(r=4, bias="all", target_modules=["q_proj"]), r"PEFT option bias='all' is not supported"),
    (lambda: peft.LoraConfig(r=4), r"target_modules=None"),
    (lambda: peft.LoHaConfig(r=4, target_modules=["q_proj"]), r"peft_type='LOHA' has no lora-lite counterpart"),
    (lambda: "r=4", r"expected a PEFT config or its dict, got str"),
])
def test_what_cannot_be_reproduced_is_refused(pcfg, match):
    with pytest.raises(ValueError, match=match):
        ll.from_peft_config(pcfg())


def test_dropout_is_carried_over():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = ll.from_peft_config(peft.LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    assert cfg.r == 4 and cfg.dropout == 0.1
    assert ll.from_peft_config(peft.LoraConfig(r=4, use_dora=True, lora_dropout=0.2, target_modules=["q_proj"])).dropout == 0.2


# a name that is the same here (r, feedforward_modules) has nothing to translate: the plain field list
@pytest.mark.parametrize("key", [k for k, (ours, _) in PEFT_NAMES.items() if ours != k])
def test_a_peft_field_name_gets_its_translation(key):
    ours, why = PEFT_NAMES[key]
    with pytest.raises(ValueError) as e:
        ll.LoRAConfig(**{key: 1})
    msg = str(e.value)
    assert f"unknown field {key!r}" in msg and why in msg
    assert (f"is {ours!r} here" in msg) if ours else ("no counterpart here" in msg)


def test_an_unknown_field_that_is_not_peft_lists_the_fields():
    with pytest.raises(ValueError, match=r"unknown field 'rank'; valid fields: \["):
        ll.LoRAConfig(rank=4)


def test_the_doc_shows_the_table_of_the_code():
    assert names_table() in DOC.read_text()
