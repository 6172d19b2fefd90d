"""Target discovery: name, layer and role filters (SPEC A5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.targets import find_targets, layer_index

from conftest import make_qwen


def names(model, **kw):
    return [n for n, _ in find_targets(model, ll.LoRAConfig(r=1, **kw))]


def test_default_targets_every_linear_but_the_lm_head():
    model = make_qwen().model
    got = names(model)
    assert "lm_head" not in got
    assert len(got) == 2 * 7 and all(n.startswith("model.layers.") for n in got)


def test_name_and_layer_filters():
    model = make_qwen().model
    assert names(model, target_names=(r"\.(q|v)_proj$",), layers=(1,)) == [
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert names(model, target_names=(r"mlp",), exclude_names=(r"gate",), layers=(0,)) == [
        "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_roles_on_a_decoder():
    model = make_qwen().model  # hidden 64: q 64->64 and o 64->64 are square
    assert [n.split(".")[-1] for n in names(model, target_roles=("reader",), layers=(0,))] == [
        "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    assert [n.split(".")[-1] for n in names(model, target_roles=("writer",), layers=(0,))] == [
        "o_proj", "down_proj"]


def test_roles_on_bert(minilm):
    got = names(minilm.model, target_roles=("writer",), target_names=(r"^encoder\.layer\.0\.",))
    assert got == ["encoder.layer.0.attention.output.dense", "encoder.layer.0.output.dense"]


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mystery = nn.Linear(8, 8)  # square and unnamed: role unknown
        self.up = nn.Linear(8, 16)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"hidden_size": 8})()
        self.blocks = nn.ModuleList([Block()])


def test_ambiguous_square_layer_raises_only_if_selected():
    model = Tiny()
    with pytest.raises(ValueError, match=r"cannot tell the role of square layer 'blocks\.0\.mystery'"):
        names(model, target_roles=("reader",))
    assert names(model, target_roles=("reader",), exclude_names=(r"mystery",)) == ["blocks.0.up"]
    assert names(model, target_roles=("reader",), target_names=(r"up$",)) == ["blocks.0.up"]


def test_roles_need_the_model_width():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no config.hidden_size"):
        names(model, target_roles=("reader",))


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("encoder.layer.3.attention.self.query") == 3
    assert layer_index("lm_head") is None
    assert layer_index("proj2.weight") is None


def test_layers_filter_drops_modules_without_an_index():
    model = make_qwen().model
    assert names(model, layers=(0,), exclude_names=()) == [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers.0." in n]


# --- every target_names pattern must select a layer; the error says why it does not ----------

@pytest.mark.parametrize("kw,match", [
    ({"target_names": (r"qproj$",)},
     r"pattern 'qproj\$' matches no module of this model.*adaptable layers are: "
     r"model\.embed_tokens, model\.layers\.0\.self_attn\.q_proj"),
    ({"target_names": (r"q_proj$", r"attention.self.query$")},  # one dead pattern among live ones
     r"pattern 'attention.self.query\$' matches no module"),
    ({"target_names": (r"post_attention_layernorm$",)},
     r"matches only modules lora-lite cannot adapt: model\.layers\.0\.post_attention_layernorm "
     r"\(Qwen3RMSNorm\).*supported: torch\.nn\.Linear"),
    ({"target_names": (r"self_attn$",)},
     r"matches only blocks, not layers: model\.layers\.0\.self_attn \(Qwen3Attention\)"),
    ({"target_names": (r"lm_head$",)},
     r"matches 1 layer\(s\), but the other filters remove all of them: lm_head \(by exclude_names="
     r".*pass exclude_names=\(\)"),
    ({"target_names": (r"layers\.1\.mlp\.up_proj$",), "layers": (0,)},
     r"model\.layers\.1\.mlp\.up_proj \(block 1, not in layers=\(0,\)\)"),
])
def test_a_pattern_that_selects_nothing_says_why(kw, match):
    with pytest.raises(ValueError, match=match):
        names(make_qwen().model, **kw)


def test_alternatives_in_one_pattern_select_wherever_one_exists():
    """The documented way to share a config across architectures."""
    assert len(names(make_qwen().model, target_names=(r"\.(q_proj|query)$",))) == 2


def test_roles_know_gpt2_and_gpt_neox_names():
    """Square layers (intermediate size = width, as in small configs) resolved by name."""
    from lora_lite.targets import role

    square = nn.Linear(8, 8)
    expected = {
        "transformer.h.0.attn.c_attn": "reader", "transformer.h.0.attn.c_proj": "writer",
        "transformer.h.0.mlp.c_fc": "reader", "transformer.h.0.mlp.c_proj": "writer",
        "gpt_neox.layers.0.attention.query_key_value": "reader",
        "gpt_neox.layers.0.attention.dense": "writer",
        "gpt_neox.layers.0.mlp.dense_h_to_4h": "reader", "gpt_neox.layers.0.mlp.dense_4h_to_h": "writer",
        "model.layers.0.mlp.down_proj": "writer", "model.layers.0.self_attn.qkv_proj": "reader",
        "model.decoder.layers.0.fc1": "reader", "model.decoder.layers.0.fc2": "writer",
        "bert.encoder.layer.0.intermediate.dense": "reader", "bert.encoder.layer.0.output.dense": "writer",
    }
    assert {n: role(n, square, 8) for n in expected} == expected


def test_roles_on_a_square_gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                             num_hidden_layers=1, num_attention_heads=2))
    assert [n.split(".", 3)[-1] for n in names(model, target_roles=("reader",))] == [
        "attention.query_key_value", "mlp.dense_h_to_4h"]
    assert [n.split(".", 3)[-1] for n in names(model, target_roles=("writer",))] == [
        "attention.dense", "mlp.dense_4h_to_h"]


class _Mixed(nn.Module):
    """A linear beside a transposed conv (no kind lora-lite adapts), a conv and an attention block."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(4, 4)
        self.deconv = nn.ConvTranspose2d(4, 4, 3)
        self.conv2d = nn.Conv2d(4, 4, 3)
        self.mha = nn.MultiheadAttention(4, 2)


def test_a_pattern_never_narrows_to_its_adaptable_part():
    model = _Mixed()
    with pytest.raises(ValueError, match=r"selects deconv \(ConvTranspose2d\), which lora-lite cannot adapt"):
        ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"(deconv|lin0)$",)))
    # a conv the chosen variant does not adapt is refused by name, not dropped from the pattern
    no_conv = next(n for n, v in ll.REGISTRY.items() if "conv" not in v.kinds and v.examples)
    cfg = ll.REGISTRY[no_conv].config(target_names=(r"(conv2d|lin0)$",), **next(iter(ll.REGISTRY[no_conv].examples.values())).fields)
    with pytest.raises(TypeError, match=rf"conv2d: variant {no_conv!r} does not adapt Conv2d"):
        ll.attach(model, cfg)
    assert not hasattr(model, "_lora_lite")


@pytest.mark.parametrize("pattern", [r"mha", r"mha\.out_proj$", r"(mha|lin0)"])
def test_multihead_attention_parts_are_never_a_silent_no_op(pattern):
    """nn.MultiheadAttention reads out_proj.weight in F.multi_head_attention_forward and never
    calls out_proj, so a hook there would do nothing."""
    model = _Mixed()
    with pytest.raises(ValueError, match=r"MultiheadAttention"):
        ll.attach(model, ll.LoRAConfig(r=2, target_names=(pattern,)))
    assert not hasattr(model, "_lora_lite")


def test_a_block_prefix_is_a_scope_not_a_layer_list():
    """Norms (1-D weights) inside a block a pattern scopes are not layers the pattern selects."""
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"^0\.",)))
    assert ll.describe(model).targets == ["0.0"]
