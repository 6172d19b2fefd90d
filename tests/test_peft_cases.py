"""A port of HF PEFT's custom-model cases (its tests/test_custom_models.py TEST_CASES) for the
layer kinds and options this library shares with PEFT: convolutions, nn.MultiheadAttention,
wide ranks, dropout, lora_bias, target_parameters. The models are small stand-ins written here
with the module names PEFT's cases target. Each case builds the PEFT adapter with PEFT's config
(non-trivial init), saves it, imports it with `ll.import_peft` into the pristine model, and
compares outputs; a case lora-lite refuses must raise, before the model changes, the reason
given in the table."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_lite as ll

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.slow  # 40 PEFT models saved and imported: about a minute


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


class ConvNet(nn.Module):
    """conv<dim>d -> flatten -> lin0, as PEFT's Conv1d/Conv2d/Conv3d models."""

    def __init__(self, conv: nn.Module, name: str, flat: int):
        super().__init__()
        self.name = name
        self.add_module(name, conv)
        self.lin0 = nn.Linear(flat, 2)

    def forward(self, x):
        return self.lin0(torch.relu(getattr(self, self.name)(x)).flatten(1))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha, self.lin0 = nn.MultiheadAttention(10, 2), nn.Linear(10, 2)

    def forward(self, x):
        return self.lin0(self.mha(x, x, x)[0])


MODELS = {  # name: (model, input)
    "MLP": (MLP, lambda: torch.randn(4, 10)),
    "Conv1d": (lambda: ConvNet(nn.Conv1d(3, 4, 3, padding=1), "conv1d", 4 * 6), lambda: torch.randn(2, 3, 6)),
    "Conv2d": (lambda: ConvNet(nn.Conv2d(5, 10, 3), "conv2d", 10 * 3 * 3), lambda: torch.randn(2, 5, 5, 5)),
    "Conv2dGroups": (lambda: ConvNet(nn.Conv2d(4, 8, 3, groups=2), "conv2d", 8 * 2 * 2), lambda: torch.randn(2, 4, 4, 4)),
    "Conv2dGroups2": (lambda: ConvNet(nn.Conv2d(8, 8, 3, groups=4), "conv2d", 8 * 2 * 2), lambda: torch.randn(2, 8, 4, 4)),
    "Conv3d": (lambda: ConvNet(nn.Conv3d(3, 6, 3), "conv3d", 6 * 2 * 2 * 2), lambda: torch.randn(2, 3, 4, 4, 4)),
    "Conv3d1x1": (lambda: ConvNet(nn.Conv3d(3, 6, 1), "conv3d", 6 * 2 * 2 * 2), lambda: torch.randn(2, 3, 2, 2, 2)),
    "MHA": (MHA, lambda: torch.randn(3, 2, 10)),
}

# (PEFT's case name, model, PEFT config class, kwargs, None = passes | regex of our refusal)
CASES = [
    ("Vanilla MLP 6 LoRA (dropout)", "MLP", "LoraConfig", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}, None),
    ("Vanilla MLP 3 LoRA (r=8 on a 20->2 layer)", "MLP", "LoraConfig", {"target_modules": ["lin1"]}, None),
    ("Vanilla MLP 9 LoRA with DoRA (r=8 on 20->2)", "MLP", "LoraConfig", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}, None),
    ("Conv1d LoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"]}, None),
    ("Conv1d LoRA with DoRA", "Conv1d", "LoraConfig", {"target_modules": ["conv1d"], "use_dora": True}, None),
    ("Conv2d 1 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"]}, None),
    ("Conv2d 2 LoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"]}, None),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}, None),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", "LoraConfig", {"target_modules": ["conv2d", "lin0"], "use_dora": True}, None),
    ("Conv2d Groups LoRA", "Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"]}, "PEFT's LoRA on a grouped conv"),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", "LoraConfig", {"target_modules": ["conv2d"]}, "PEFT's LoRA on a grouped conv"),
    ("Conv2d Groups LoRA with DoRA", "Conv2dGroups", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}, "PEFT's LoRA on a grouped conv"),
    ("Conv2d Groups2 LoRA with DoRA", "Conv2dGroups2", "LoraConfig", {"target_modules": ["conv2d"], "use_dora": True}, "PEFT's LoRA on a grouped conv"),
    ("Conv3d 1 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"]}, None),
    ("Conv3d 2 LoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"]}, None),
    ("Conv3d 1 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"], "use_dora": True}, None),
    ("Conv3d 2 LoRA with DoRA", "Conv3d", "LoraConfig", {"target_modules": ["conv3d", "lin0"], "use_dora": True}, None),
    ("Conv3d 1x1 LoRA", "Conv3d1x1", "LoraConfig", {"target_modules": ["conv3d"]}, None),
    ("Conv3d 1x1 LoRA with DoRA", "Conv3d1x1", "LoraConfig", {"target_modules": ["conv3d"], "use_dora": True}, None),
    ("Vanilla MLP 1 LoRA with lora_b bias", "MLP", "LoraConfig", {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32}, "lora_bias"),
    ("Conv2d 1 LoRA with lora_b bias", "Conv2d", "LoraConfig", {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32}, "lora_bias"),
    ("Conv3d 1 LoRA with lora_b bias", "Conv3d", "LoraConfig", {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32}, "lora_bias"),
    ("MHA 1 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha"]}, "PEFT's LoRA on nn.MultiheadAttention is not supported"),
    ("MHA 2 LoRA", "MHA", "LoraConfig", {"target_modules": ["mha", "lin0"]}, "PEFT's LoRA on nn.MultiheadAttention is not supported"),
    ("MLP 2 using nn.Parameter LoRA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "target_parameters": ["lin1.weight"]}, "target_parameters"),
    ("Vanilla MLP 1 LoRA with MiCA", "MLP", "LoraConfig", {"target_modules": ["lin0"], "init_lora_weights": "mica", "r": 4}, None),
    ("Vanilla MLP 10 LoRA with VeLoRA random", "MLP", "LoraConfig",
     {"target_modules": ["lin0"], "velora_config": {"num_groups": 2, "init_type": "random"}}, None),
    ("Conv2d 1 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": []}, None),
    ("Conv2d 2 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d"], "feedforward_modules": ["conv2d"]}, "ia3_ff' does not adapt Conv2d"),
    ("Conv2d 3 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": []}, None),
    ("Conv2d 4 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d"]}, "ia3_ff' does not adapt Conv2d"),
    ("Conv2d 5 IA3", "Conv2d", "IA3Config", {"target_modules": ["conv2d", "lin0"], "feedforward_modules": ["conv2d", "lin0"]}, "ia3_ff' does not adapt Conv2d"),
    ("Conv3d 1 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": []}, None),
    ("Conv3d 2 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d"], "feedforward_modules": ["conv3d"]}, "ia3_ff' does not adapt Conv3d"),
    ("Conv3d 3 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": []}, None),
    ("Conv3d 4 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d"]}, "ia3_ff' does not adapt Conv3d"),
    ("Conv3d 5 IA3", "Conv3d", "IA3Config", {"target_modules": ["conv3d", "lin0"], "feedforward_modules": ["conv3d", "lin0"]}, "ia3_ff' does not adapt Conv3d"),
]


def _peft_model(model_name, cls, kwargs):
    build, make_input = MODELS[model_name]
    torch.manual_seed(0)
    model, x = build().eval(), make_input()
    init = {"init_lora_weights": False} if cls == "LoraConfig" else {"init_ia3_weights": False}
    if "velora_config" in kwargs:
        kwargs = {**kwargs, "velora_config": peft.VeloraConfig(**kwargs["velora_config"])}
    peft_model = peft.get_peft_model(copy.deepcopy(model), getattr(peft, cls)(**{**init, **kwargs})).eval()
    if kwargs.get("init_lora_weights") == "mica":  # A = 0 at MiCA's init: give it a trained value
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_A" in n:
                    p.normal_()
    return model, peft_model, x


@pytest.mark.parametrize("name,model_name,cls,kwargs,refusal", CASES, ids=[c[0] for c in CASES])
def test_peft_case(name, model_name, cls, kwargs, refusal, tmp_path):
    model, peft_model, x = _peft_model(model_name, cls, kwargs)
    peft_model.save_pretrained(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if refusal is not None:
        with pytest.raises((ValueError, TypeError), match=refusal):
            ll.import_peft(model, tmp_path)
        assert not hasattr(model, "_lora_lite")
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    ll.import_peft(model, tmp_path)
    with torch.no_grad():
        y = peft_model(x)
        assert (model(x) - y).abs().max() <= 1e-5 * max(1.0, y.abs().max().item())


def test_modules_to_save_is_trainable_modules_both_ways(tmp_path):
    """PEFT's 'Vanilla MLP 5 LoRA' (modules_to_save=["lin1"]) imports with lin1 as a trained
    base module, and our trainable_modules export back as modules_to_save."""
    model, peft_model, x = _peft_model("MLP", "LoraConfig", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]})
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    peft_model.save_pretrained(tmp_path / "theirs")
    ours = copy.deepcopy(model)
    cfg = ll.import_peft(ours, tmp_path / "theirs")
    assert cfg.trainable_modules == ("^lin1$",)
    with torch.no_grad():
        assert torch.allclose(ours(x), peft_model(x), atol=1e-6)
    fields = ll.export_peft(ours, tmp_path / "ours")
    assert fields["modules_to_save"] == ["lin1"]
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "ours").eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x), peft_model(x), atol=1e-6)
