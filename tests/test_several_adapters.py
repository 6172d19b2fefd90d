"""Several named adapters on one model (SPEC amendment 8): every target gives
y_base + Σ_k c_k·Δ_k, each Δ_k what that adapter alone adds on a fresh copy of the base."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.runtime import AdapterHook, SharedHook, adapters
from tests.cases import CASES, PRIMARY, variant

TARGET = ("^0$",)


def _base(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32)).to(dtype)


def _alone(base: nn.Module, cfg, seed: int) -> nn.Module:
    """`cfg` alone on a copy of `base`, its tensors moved off their init (seeded)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    ll.attach(model, cfg)
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if ".lora_" in n and t.dtype.is_floating_point:
                t.add_(torch.randn_like(t), alpha=0.05)
    return model


def _several(base: nn.Module, alone: dict[str, nn.Module]) -> nn.Module:
    """Every adapter of `alone` attached to one copy of `base` under its name, same tensors."""
    model = copy.deepcopy(base)
    values = {}
    for name, one in alone.items():
        ll.attach(model, adapters(one)["default"].cfg, name=name)
        values.update({f"{k}_{name}": v for k, v in one.state_dict().items() if ".lora_" in k})
    missing, unexpected = model.load_state_dict(values, strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k]
    return model


def _summed(base: nn.Module, alone: dict[str, nn.Module], x: torch.Tensor, c: dict | None = None) -> torch.Tensor:
    """y_base + Σ_k c_k·(y_k − y_base) at the first layer, each y_k from adapter k alone."""
    y = base[0](x)
    out = y.clone()
    for name, one in alone.items():
        k = 1.0 if c is None else c.get(name, 1.0)
        k = k[:, None] if isinstance(k, torch.Tensor) else k
        out = out + k * (one[0](x) - y)
    return out


def _output_cases() -> list[str]:
    """Each variant's first example with an output hook that attaches without data."""
    cases = []
    for case in PRIMARY:
        v, cfg = variant(case), CASES[case](TARGET)
        if v.delta_input is None and not v.calibration_needs(cfg)[1]:
            cases.append(case)
    return cases


@pytest.mark.filterwarnings("ignore:DeLoRA")  # its advice on a 32-wide layer
@pytest.mark.parametrize("case", _output_cases())
def test_each_variant_beside_lora_adds_its_own_change(case):
    base = _base()
    alone = {"task": _alone(base, ll.LoRAConfig(r=4, target_names=TARGET), 1),
             "other": _alone(base, CASES[case](TARGET), 2)}
    model = _several(base, alone)
    assert isinstance(next(iter(model[0]._forward_hooks.values())), SharedHook)
    x = torch.randn(5, 32)
    torch.testing.assert_close(model[0](x), _summed(base, alone, x), rtol=1e-5, atol=1e-5)


def _three(base):
    return {"a": _alone(base, ll.LoRAConfig(r=4, target_names=(r"^[02]$",)), 1),
            "b": _alone(base, ll.AntiPaSTOConfig(r=4, target_names=TARGET), 2),
            "c": _alone(base, ll.IA3Config(target_names=(r"^[02]$",)), 3)}


def test_three_adapters_coefficients_and_detach():
    base = _base()
    alone = _three(base)
    model = _several(base, alone)
    x = torch.randn(4, 32)
    torch.testing.assert_close(model[0](x), _summed(base, alone, x), rtol=1e-5, atol=1e-5)
    c = {"a": -0.5, "c": torch.tensor([1.0, 0.0, -1.0, 2.0])}
    with ll.scaled(model, c):
        torch.testing.assert_close(model[0](x), _summed(base, alone, x, c), rtol=1e-5, atol=1e-5)
    with ll.scaled(model, {"a": 0.0, "b": 0.0, "c": 0.0}):
        assert torch.equal(model(x), base(x))
    with ll.disabled(model, "b"):
        rest = {k: v for k, v in alone.items() if k != "b"}
        torch.testing.assert_close(model[0](x), _summed(base, rest, x), rtol=1e-5, atol=1e-5)
    assert adapters(model)["b"].enabled and adapters(model)["a"].scale == 1.0  # restored
    ll.detach(model, "b")
    torch.testing.assert_close(model[0](x), _summed(base, {k: alone[k] for k in "ac"}, x), rtol=1e-5, atol=1e-5)
    ll.detach(model, "a")  # one adapter left: its own hook again, the one-adapter path bit for bit
    assert isinstance(next(iter(model[0]._forward_hooks.values())), AdapterHook)
    assert torch.equal(model(x), alone["c"](x))
    ll.detach(model, "c")
    assert torch.equal(model(x), base(x))
    assert list(model.state_dict()) == list(base.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert not model[0]._forward_hooks and not model[2]._forward_hooks


def test_default_adapter_keeps_its_names_and_hook():
    base = _base()
    model = copy.deepcopy(base)
    ll.attach(model, ll.LoRAConfig(r=4, target_names=TARGET))
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"^[02]$",)), name="steer")
    keys = [k for k in model.state_dict() if "lora_" in k]
    assert keys == ["0.lora_A", "0.lora_B", "0.lora_A_steer", "0.lora_B_steer", "2.lora_A_steer", "2.lora_B_steer"]
    assert type(model[2]._forward_hooks[next(iter(model[2]._forward_hooks))]) is AdapterHook  # alone on layer 2
    # the adapter attached last trains; the earlier one is frozen until it detaches
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "0.lora_A_steer", "0.lora_B_steer", "2.lora_A_steer", "2.lora_B_steer"]
    ll.detach(model, "steer")
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.lora_A", "0.lora_B"]
    print(ll.describe(model))
    ll.detach(model)
    assert all(p.requires_grad for p in model.parameters())


def test_save_load_by_name_round_trips(tmp_path):
    base = _base()
    alone = _three(base)
    model = _several(base, alone)
    x = torch.randn(3, 32)
    for name in "abc":
        ll.save(model, tmp_path / f"{name}.safetensors", name=name)
        assert ll.read(tmp_path / f"{name}.safetensors").name == name
    fresh = copy.deepcopy(base)
    for name in "cab":  # any order: the sum does not depend on it
        ll.load(fresh, tmp_path / f"{name}.safetensors")
    assert list(adapters(fresh)) == ["c", "a", "b"]
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-6)
    one = copy.deepcopy(base)
    ll.load(one, tmp_path / "b.safetensors", name="default")  # under another name: the default adapter
    assert torch.equal(one(x), alone["b"](x))
    assert "0.lora_S" in one.state_dict()


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values()) for n, m in model.named_modules()},
            dict(adapters(model)))


def _unchanged(model, before):
    sd, hooks, found = _snapshot(model)
    assert sd.keys() == before[0].keys() and all(torch.equal(sd[k], before[0][k]) for k in sd)
    assert hooks == before[1] and found == before[2]


def test_bad_input_leaves_the_model_unchanged(tmp_path):
    base = _base()
    model = _several(base, _three(base))
    ll.save(model, tmp_path / "a.safetensors", name="a")
    before = _snapshot(model)
    lora = ll.LoRAConfig(r=2, target_names=TARGET)
    with pytest.raises(RuntimeError, match="already has a lora-lite adapter named 'a'"):
        ll.attach(model, lora, name="a")
    for bad in ("my-adapter", "1st", "", None):
        with pytest.raises(ValueError, match="not a valid Python identifier"):
            ll.attach(model, lora, name=bad)
    with pytest.raises(KeyError, match=r"no adapter named 'd'.*'a', 'b', 'c'"):
        with ll.scaled(model, {"a": 0.5, "d": 1.0}):
            pass
    with pytest.raises(KeyError, match="no adapter named 'd'"):
        ll.detach(model, "d")
    with pytest.raises(RuntimeError, match="already has a lora-lite adapter named 'a'"):
        ll.load(model, tmp_path / "a.safetensors")
    pre = next(c for c in PRIMARY if variant(c).delta_input is not None and not variant(c).requires_calibration)
    with pytest.raises(ValueError, match="pre-hook variant"):
        ll.attach(model, CASES[pre](TARGET), name="pre")
    for call in (lambda: ll.detach(model), lambda: ll.save(model, tmp_path / "x.safetensors"),
                 lambda: ll.merge(model), lambda: ll.scaled(model, 0.5).__enter__()):
        with pytest.raises(RuntimeError, match="several adapters \\('a', 'b', 'c'\\); name the one"):
            call()
    _unchanged(model, before)
    assert adapters(model)["a"].scale == 1.0


def test_copies_compile_and_bf16():
    base = _base()
    alone = _three(base)
    model = _several(base, alone)
    x = torch.randn(4, 32)
    want = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    for other in (copy.deepcopy(model), torch.load(io.BytesIO(buf.getvalue()), weights_only=False)):
        torch.testing.assert_close(other(x), want, rtol=0, atol=0)
        with ll.scaled(other, {"a": 0.0}):  # the copy's knobs are its own
            assert not torch.equal(other(x), want)
            assert torch.equal(model(x), want)
        ll.detach(other, "a")
        assert torch.equal(model(x), want)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    compiled = torch.compile(model)
    with ll.scaled(model, {"b": torch.tensor([1.0, 0.0, -1.0, 0.5])}):
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    half = _several(base.to(torch.bfloat16), {k: v.to(torch.bfloat16) for k, v in alone.items()})
    xb = x.to(torch.bfloat16)
    out = half[0](xb)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _summed(base, alone, xb).float(), rtol=0.05, atol=0.05)


def test_two_loras_match_peft_multi_adapter_forward():
    peft = pytest.importorskip("peft")
    base = _base()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), adapter_name="task")
    pm.add_adapter("style", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["0", "2"]))
    pm.base_model.set_adapter(["task", "style"])
    torch.manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.LoRAConfig(r=4, alpha=8, target_names=TARGET), name="task")
    ll.attach(ours, ll.LoRAConfig(r=2, alpha=8, target_names=(r"^[02]$",)), name="style")
    theirs = dict(pm.named_parameters())
    with torch.no_grad():
        for n, t in ours.named_parameters():
            if ".lora_" in n:
                layer, rest = n.split(".", 1)
                pname, name = rest.rsplit("_", 1)
                t.copy_(theirs[f"base_model.model.{layer}.{pname}.{name}.weight"])
    x = torch.randn(6, 32)
    torch.testing.assert_close(ours(x), pm(x), rtol=1e-5, atol=1e-5)


def test_merge_of_the_only_named_adapter():
    base = _base()
    alone = _alone(base, ll.IA3Config(target_names=(r"^[02]$",)), 4)
    model = _several(base, {"g": alone})
    x = torch.randn(3, 32)
    ll.merge(model)
    torch.testing.assert_close(model(x), alone(x), rtol=1e-5, atol=1e-5)
    assert not adapters(model) and list(model.state_dict()) == list(base.state_dict())
