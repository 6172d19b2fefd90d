"""Every refusal in SPEC A4.1 / A4.7 / A7: a specific message, and the model bit-for-bit untouched."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lora_lite as ll
from lora_lite.config import CONFIGS, AdapterConfig, RankConfig
from lora_lite.variant import DEFAULT_LRS, REGISTRY, Example, ParamSpec, Variant, register

from ckpt_files import rewrite
from conftest import assert_untouched, make_qwen, snapshot


# ----------------------------------------------------------------------------- configs
def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match=r"LoRAConfig\.r: expected int"):
        ll.LoRAConfig(r="8")
    with pytest.raises(ValueError, match=r"LoRAConfig\.r: expected int"):
        ll.LoRAConfig(r=True)
    with pytest.raises(ValueError, match=r"LoRAConfig\.r: must be >= 1"):
        ll.LoRAConfig(r=0)
    with pytest.raises(ValueError, match=r"target_names: expected"):
        ll.LoRAConfig(target_names="q_proj")  # a bare string would be iterated char by char
    with pytest.raises(ValueError, match=r"target_names: invalid regex"):
        ll.LoRAConfig(target_names=("(",))
    with pytest.raises(ValueError, match=r"target_roles: expected"):
        ll.LoRAConfig(target_roles=("head",))
    with pytest.raises(ValueError, match=r"dtype: unknown dtype 'float8'"):
        ll.LoRAConfig(dtype="float8")
    with pytest.raises(ValueError, match=r"dtype: unknown dtype"):
        ll.LoRAConfig(dtype=3)
    assert ll.LoRAConfig(dtype="bfloat16").dtype is torch.bfloat16  # names as to_dict writes them
    with pytest.raises(ValueError, match=r"compute: expected"):
        ll.LoRAConfig(compute="fp32")
    with pytest.raises(ValueError, match=r"HRAConfig\.r must be even"):
        ll.HRAConfig(r=3)
    with pytest.raises(ValueError, match=r"group_size must be even"):
        ll.RoadConfig(group_size=7)
    with pytest.raises(ValueError, match=r"road_variant: expected"):
        ll.RoadConfig(road_variant="road_3")
    with pytest.raises(ValueError, match=r"lambda0 must be > 0"):
        ll.DeLoRAConfig(lambda0=0.0)
    with pytest.raises(TypeError, match="not a registered variant config"):
        AdapterConfig()


def test_from_dict_validates_untrusted_input():
    good = ll.LoRAConfig(r=4).to_dict()
    with pytest.raises(ValueError, match=r"unknown field 'rank'"):
        AdapterConfig.from_dict({**good, "rank": 4})
    with pytest.raises(ValueError, match=r"LoRAConfig\.r: expected int"):
        AdapterConfig.from_dict({**good, "r": 4.0})
    for bad in ("Tensor", "float32; import os", "int64", 32, ["float32"], {"float32": 1}):
        with pytest.raises(ValueError, match=r"dtype: unknown dtype"):
            AdapterConfig.from_dict({**good, "dtype": bad})
    with pytest.raises(KeyError, match="unknown variant 'nope'"):
        AdapterConfig.from_dict({**good, "variant": "nope"})
    with pytest.raises(ValueError, match=r"unknown field 'variant_extra'"):
        AdapterConfig.from_dict({**good, "variant_extra": 1})


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_constructor_names_an_unknown_field(name):
    cls = CONFIGS[name]
    with pytest.raises(ValueError, match=rf"{cls.__name__}: unknown field 'rank'; valid fields: \[.*'dtype'"):
        cls(rank=16)
    # a PEFT field name also says what to use here (config.PEFT_NAMES; tests/test_from_peft.py)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: unknown field 'lora_alpha'; PEFT's 'lora_alpha' is "
                                         rf"'alpha' here .*; valid fields: \[.*'dtype'"):
        cls(lora_alpha=16)
    with pytest.raises(ValueError, match=rf"{cls.__name__}: unknown field 'variant'"):
        cls(variant="lora")  # set by the class, not a knob
    with pytest.raises(ValueError, match=rf"{cls.__name__} takes keyword arguments only"):
        cls(8)


def test_dtype_accepts_a_torch_dtype_or_its_name():
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        assert ll.LoRAConfig(dtype=name) == ll.LoRAConfig(dtype=dtype)


def test_describe_reports_what_is_attached(tmp_path):
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert str(ll.describe(net)) == "no lora-lite adapter is attached to this model"
    ll.attach(net, ll.DoRAConfig(r=2, alpha=4, dtype="bfloat16", target_names=(r"^0$",), trainable_modules=(r"^2$",)))
    d = ll.describe(net)
    assert (d.variant, d.targets, d.adapter_params, d.base_params) == ("dora", ["0"], 2 * 16 + 8, {"2.weight": 32, "2.bias": 4})
    assert d.adapter_dtypes == ["bfloat16"] and d.hook == "output" and d.enabled and d.scale == 1.0
    text = str(d)
    for part in ("lora-lite adapter: dora (DoRAConfig)", "r=2, alpha=4.0, dtype='bfloat16'", "targets: 1 layers (0)",
                 "40 adapter parameters + 36 in trainable_modules (2.weight, 2.bias)",
                 "compute in the activation's dtype", "hooks: output, enabled, scale 1"):
        assert part in text, part
    net.float()  # the adapter dtype follows .to()
    assert ll.describe(net).adapter_dtypes == ["float32"]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_config_roundtrip_every_variant(name):
    cfg = CONFIGS[name](dtype=torch.bfloat16, target_names=("a", "b"), layers=(0, 2))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert AdapterConfig.from_dict(d) == cfg


# ----------------------------------------------------------------------------- attach
@pytest.fixture()
def model():
    return make_qwen().model


def _refused(model, exc, match, call):
    before = snapshot(model)
    with pytest.raises(exc, match=match):
        call()
    assert_untouched(model, before)


def test_no_matching_targets(model):
    _refused(model, ValueError, r"target_names pattern 'nothing_here\$' matches no module.*"
             r"model\.layers\.0\.self_attn\.q_proj",
             lambda: ll.attach(model, ll.LoRAConfig(target_names=(r"nothing_here$",))))
    _refused(model, ValueError, r"no target layers match.*target_roles=\('inner',\)",
             lambda: ll.attach(model, ll.LoRAConfig(target_roles=("inner",))))


def test_rank_larger_than_layer(model):
    # k_proj is 64 -> 32 in the test model
    _refused(model, ValueError, r"k_proj: r=48 exceeds min\(d_in, d_out\)=min\(64, 32\)",
             lambda: ll.attach(model, ll.PiSSAConfig(r=48)))


def test_hra_rank_larger_than_d_in(model):
    _refused(model, ValueError, r"down_proj|q_proj.*reflections exceed d_in",
             lambda: ll.attach(model, ll.HRAConfig(r=66, target_names=(r"q_proj$",))))


def test_road_group_size_must_divide_d_out(model):
    _refused(model, ValueError, r"k_proj: group_size=64 does not divide d_out=32",
             lambda: ll.attach(model, ll.RoadConfig(group_size=64)))


def test_calibration_data_for_a_variant_without_calibration(model):
    _refused(model, ValueError, r"'lora' does not use calibration data",
             lambda: ll.attach(model, ll.LoRAConfig(), calibration_data=[torch.zeros(1, 4, dtype=torch.long)]))


def test_not_a_config(model):
    _refused(model, TypeError, "expected an AdapterConfig",
             lambda: ll.attach(model, {"variant": "lora"}))


class FakeQuantLinear(nn.Module):
    """Linear-like but not nn.Linear (like a bitsandbytes layer): hook-only variants only."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.randn(d_out, d_in))

    def forward(self, x):
        return x @ self.weight.T


@pytest.mark.parametrize("cfg", [ll.PiSSAConfig(r=2), ll.DoRAConfig(r=2), ll.LoRAXSConfig(r=2), ll.DeLoRAConfig(r=2)])
def test_dense_weight_variants_refuse_other_layers(cfg):
    net = nn.Sequential(FakeQuantLinear(8, 8))
    _refused(net, TypeError, r"0: variant .* needs torch\.nn\.Linear, got FakeQuantLinear",
             lambda: ll.attach(net, cfg))


def test_hook_only_variants_run_on_linear_like_layers():
    net = nn.Sequential(FakeQuantLinear(8, 8))
    x = torch.randn(3, 8)
    y0 = net(x)
    ll.attach(net, ll.LoRAConfig(r=2, alpha=4))
    assert torch.equal(net(x), y0)  # B = 0
    layer = net[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        expected = y0 + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T  # s = alpha / r = 2
        assert torch.allclose(net(x), expected, rtol=1e-5, atol=1e-6)


def test_detach_and_save_need_an_adapter(model, tmp_path):
    with pytest.raises(RuntimeError, match="no lora-lite adapter is attached"):
        ll.detach(model)
    with pytest.raises(RuntimeError, match="no lora-lite adapter is attached"):
        ll.save(model, tmp_path / "x.safetensors")
    with pytest.raises(RuntimeError, match="no lora-lite adapter is attached"):
        ll.reconfigure(model, r=2)


def test_reconfigure_refuses_fields_that_are_not_runtime(model):
    ll.attach(model, ll.LoRAConfig(r=2))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['alpha'\] cannot change while attached"):
        ll.reconfigure(model, alpha=1.0)
    assert_untouched(model, before)


def test_reconfigure_names_a_field_that_does_not_exist(model):
    """A typo (`coef`) is not a field at all: the message lists the fields, not 'detach and attach'."""
    ll.attach(model, ll.AntiPaSTOConfig(r=2, layers=(0,)))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"\['coef'\] is not a field of AntiPaSTOConfig; its fields: \[.*'coeff'.*\] "
                                         r"\(changeable while attached: \['coeff'\]\)") as e:
        ll.reconfigure(model, coef=1.0)
    assert "detach" not in str(e.value)
    assert_untouched(model, before)


def test_a_torch_compile_wrapper_is_the_model_it_wraps(tmp_path):
    """torch.compile returns an OptimizedModule that holds the model as `_orig_mod`: every
    public function reaches the adapter through it (before, save/describe said no adapter was
    attached, and save's trainable_modules keys got an `_orig_mod.` prefix)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    ll.attach(net, ll.LoRAConfig(r=2, target_names=(r"^0$",), trainable_modules=(r"^2$",)))
    compiled = torch.compile(net, backend="eager")
    assert ll.describe(compiled).targets == ["0"]
    ll.save(compiled, tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["0.lora_A", "0.lora_B", "base.2.bias", "base.2.weight"]
    with pytest.raises(ValueError, match="cannot change while attached"):  # found the adapter
        ll.reconfigure(compiled, r=4)
    with ll.scaled(compiled, 0.5), ll.disabled(compiled):
        pass
    ll.detach(compiled)
    assert ll.describe(net) == "no lora-lite adapter is attached to this model"
    fresh = torch.compile(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), backend="eager")
    ll.load(fresh, tmp_path / "a.safetensors")
    assert ll.describe(fresh._orig_mod).targets == ["0"]
    ll.merge(fresh)
    assert ll.describe(fresh) == "no lora-lite adapter is attached to this model"


def test_a_peft_folder_points_to_import_peft(model, tmp_path):
    """`ll.load` on a PEFT adapter folder (or the safetensors inside it) names ll.import_peft and
    the CLI's import-peft instead of 'no such file' / 'not a lora-lite checkpoint'."""
    folder = tmp_path / "peft_dir"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file({"w": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    for path in (folder, folder / "adapter_model.safetensors"):
        _load_refused(model, path, r"HF PEFT adapter folder.*ll\.import_peft\(model, folder\).*lora-lite import-peft")
    (tmp_path / "empty").mkdir()
    _load_refused(model, tmp_path / "empty", "a folder, not a file")


# ----------------------------------------------------------------------------- rollback
@pytest.fixture()
def temp_variant():
    """Register test-only variants and remove them afterwards."""
    added = []

    def add(cls):
        register(cls)
        added.append(cls.name)
        return cls

    yield add
    for name in added:
        REGISTRY.pop(name)
        CONFIGS.pop(name)


def _failing_config(name):
    @dataclass(frozen=True, kw_only=True)
    class Cfg(RankConfig):
        variant: str = field(default=name, init=False)

    return Cfg


def test_failure_in_init_rolls_back(model, temp_variant):
    calls = []

    @temp_variant
    class FailsLate(Variant):
        name, config = "fails_late", _failing_config("fails_late")

        @staticmethod
        def param_specs(d_in, d_out, cfg):
            return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming")}

        @staticmethod
        def init(layer, cfg, stats):
            calls.append(layer)
            if len(calls) == 5:
                raise RuntimeError("boom in init")

        @staticmethod
        def delta(layer, cfg, x, y):
            return torch.zeros_like(y)


    _refused(model, RuntimeError, "boom in init",
             lambda: ll.attach(model, FailsLate.config(r=2)))
    assert len(calls) == 5


def test_register_needs_only_what_the_library_uses(model, temp_variant):
    """Math, config and specs suffice: the suites' example and the benchmark setting default."""

    @temp_variant
    class Minimal(Variant):
        name, config = "minimal", _failing_config("minimal")

        @staticmethod
        def param_specs(d_in, d_out, cfg):
            return {"lora_A": ParamSpec((cfg.r, d_in), "kaiming"), "lora_B": ParamSpec((d_out, cfg.r))}

        @staticmethod
        def delta(layer, cfg, x, y):
            return (x @ layer.lora_A.T) @ layer.lora_B.T

    assert Minimal.examples == {"minimal": Example({})}
    assert Minimal.params_per_layer is None
    s = Minimal.bench
    assert s.lrs == DEFAULT_LRS and s.family == "minimal" and s.peft is None
    assert s.knobs(4, None) == {"r": 4}
    assert s.macs(10, 6, Minimal.config(r=2)) == (2 * 10 + 6 * 2, 0)  # one MAC per adapter value
    ll.attach(model, Minimal.config(r=2))  # attaches with nothing else declared
    layers = ll.describe(model).targets
    assert layers and ll.describe(model).adapter_params > 0


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture()
def saved(tmp_path):
    """A trained-looking LoRA and PiSSA checkpoint from the test Qwen3."""
    paths = {}
    for cfg in (ll.LoRAConfig(r=4), ll.PiSSAConfig(r=4)):
        m = make_qwen().model
        ll.attach(m, cfg)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        paths[cfg.variant] = tmp_path / f"{cfg.variant}.safetensors"
        ll.save(m, paths[cfg.variant])
    return paths


# Edited files are re-sealed (hashes recomputed), so the check under test is the one that refuses.
_rewrite = rewrite


def _load_refused(model, path, match):
    _refused(model, ll.CheckpointError, match, lambda: ll.load(model, path))


def test_load_refuses_unreadable_files(model, saved, tmp_path):
    _load_refused(model, tmp_path / "missing.safetensors", "no such file")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    _load_refused(model, empty, "not a readable safetensors file")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    _load_refused(model, junk, "not a readable safetensors file")
    data = saved["lora"].read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        truncated = tmp_path / f"truncated{cut}.safetensors"
        truncated.write_bytes(data[:cut])
        _load_refused(model, truncated, "not a readable safetensors file")


def test_load_refuses_foreign_safetensors(model, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"hello": "world"})
    _load_refused(model, path, "not a lora-lite checkpoint")
    save_file({"w": torch.zeros(2)}, str(path))
    _load_refused(model, path, "not a lora-lite checkpoint")


def test_load_refuses_bad_metadata(model, saved, tmp_path):
    p = tmp_path / "x.safetensors"

    def set_(key, value):
        return lambda m: m.__setitem__(key, value)

    _load_refused(model, _rewrite(saved["lora"], p, edit_meta=set_("format_version", "99")),
                  "format version '99' is not supported")
    _load_refused(model, _rewrite(saved["lora"], p, edit_meta=set_("variant", "pissa")),
                  "metadata variant 'pissa' disagrees")
    cfg = json.loads(_meta(saved["lora"])["config"])
    _load_refused(model, _rewrite(saved["lora"], p, edit_meta=set_("config", json.dumps({**cfg, "variant": "nope"}))),
                  "metadata variant 'lora' disagrees")
    _load_refused(model, _rewrite(saved["lora"], p, edit_meta=lambda m: m.update(
        variant="nope", config=json.dumps({**cfg, "variant": "nope"}))), "unknown variant 'nope'")
    _load_refused(model, _rewrite(saved["lora"], p, edit_meta=set_("config", json.dumps({**cfg, "dtype": "evil"}))),
                  "unknown dtype 'evil'")
    _load_refused(model, _rewrite(saved["lora"], p, edit_meta=set_("config", "{not json")),
                  "metadata 'config' is missing or not JSON")
    _load_refused(model, _rewrite(saved["lora"], p, edit_meta=set_("targets", '"q_proj"')),
                  "metadata 'targets' must be a JSON list")


def _meta(path):
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def test_load_refuses_tensor_mismatches(model, saved, tmp_path):
    p = tmp_path / "x.safetensors"
    key = "model.layers.0.self_attn.q_proj.lora_A"
    _load_refused(model, _rewrite(saved["lora"], p, edit_tensors=lambda t: t.pop(key)),
                  rf"missing \['{key}'\]")
    _load_refused(model, _rewrite(saved["lora"], p, edit_tensors=lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.lora_Z": torch.zeros(2)})), r"unexpected \['.*lora_Z'\]")
    _load_refused(model, _rewrite(saved["lora"], p, edit_tensors=lambda t: t.update({key: torch.zeros(5, 64)})),
                  rf"{key} has shape \(5, 64\), this model needs \(4, 64\)")
    _load_refused(model, _rewrite(saved["lora"], p, edit_tensors=lambda t: t.update({key: t[key].double()})),
                  rf"{key} is torch.float64, the config says torch.float32")


def test_load_refuses_another_architecture(saved, minilm):
    bert = minilm.fresh()
    _load_refused(bert, saved["lora"], "not adaptable layers of this model.*another architecture")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    wider = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=256, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    _load_refused(wider, saved["lora"], r"has shape \(4, 64\), this model needs \(4, 96\)")


@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_a_different_base_warns_and_loads_the_saved_change(saved, variant):
    """No variant writes W, so an adapter on another base is the same change added to that
    base: a warning, not a refusal (PiSSA included)."""
    other = make_qwen().model
    with torch.no_grad():
        other.model.layers[1].mlp.down_proj.weight.mul_(1.001)  # a slightly fine-tuned base
    W = other.model.layers[1].mlp.down_proj.weight.clone()
    with pytest.warns(UserWarning, match="down_proj.*differ from the base the adapter was saved from"):
        ll.load(other, saved[variant])
    assert torch.equal(other.model.layers[1].mlp.down_proj.weight, W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ll.load(make_qwen().model, saved[variant])  # the pristine base: no warning
