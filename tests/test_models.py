"""Architectures users train (docs/models.md): tiny random configs of each, with a representative
set of variants on every linear layer the default targeting selects (LoRA: output hook, HRA:
input pre-hook, PiSSA: reads W through an SVD, IA3 in the paper's mixed placement where the
model has a feed-forward down-projection). For each: identity at init, a training step changes
the output, save -> load reproduces it bit for bit, detach restores the base bit for bit, and
merge gives the same function. Configs are 1-2 blocks of width 16-32, so a model costs seconds.
"""

from __future__ import annotations

import copy

import pytest
import torch

import lora_lite as ll
from lora_lite.runtime import state_of
from lora_lite.targets import find_targets, is_linear_like

from cases import CASES, HOOK_KINDS, IDENTITY_TOL, variant
from conftest import rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

DEC = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8)


def _ids(b=2, t=7, vocab=64, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _lm(cls_name, cfg_name, **fields):
    def build():
        import transformers

        cfg = getattr(transformers, cfg_name)(**fields)
        cfg._attn_implementation = "eager"
        return getattr(transformers, cls_name)(cfg), {"input_ids": _ids()}
    return build


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
                   num_decoder_layers=1, dropout_rate=0.0, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg), {"input_ids": _ids(), "decoder_input_ids": _ids(t=5, seed=2)}


def _vit():
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return ViTModel(cfg, add_pooling_layer=False), {"pixel_values": x}


MODELS = {
    "llama": _lm("LlamaForCausalLM", "LlamaConfig", **DEC),
    "mistral": _lm("MistralForCausalLM", "MistralConfig", **DEC),
    "qwen2": _lm("Qwen2ForCausalLM", "Qwen2Config", **DEC),
    "qwen3": _lm("Qwen3ForCausalLM", "Qwen3Config", **DEC),
    "gemma": _lm("GemmaForCausalLM", "GemmaConfig", **DEC),
    "phi3": _lm("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, bos_token_id=1, eos_token_id=1,
                **{k: v for k, v in DEC.items() if k != "head_dim"}),
    "gpt_neox": _lm("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=64, hidden_size=32,
                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    "opt": _lm("OPTForCausalLM", "OPTConfig", vocab_size=64, hidden_size=32, ffn_dim=64,
               num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, dropout=0.0),
    "gpt2": _lm("GPT2LMHeadModel", "GPT2Config", vocab_size=64, n_embd=32, n_layer=2, n_head=4,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    "bert": _lm("BertModel", "BertConfig", vocab_size=64, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64),
    "t5": _t5,
    "vit": _vit,
    "qwen3_moe": _lm("Qwen3MoeForCausalLM", "Qwen3MoeConfig", num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16, **DEC),
}

# IA3's paper placement per architecture: gate k/v outputs and the FFN down-projection input.
IA3 = {
    "llama": (r"\.(k|v|down)_proj$", r"down_proj$"), "mistral": (r"\.(k|v|down)_proj$", r"down_proj$"),
    "qwen2": (r"\.(k|v|down)_proj$", r"down_proj$"), "qwen3": (r"\.(k|v|down)_proj$", r"down_proj$"),
    "gemma": (r"\.(k|v|down)_proj$", r"down_proj$"), "opt": (r"\.(k_proj|v_proj|fc2)$", r"fc2$"),
    "bert": (r"\.(key|value|\d\.output\.dense)$", r"\d\.output\.dense$"),
    "t5": (r"\.(k|v|wo)$", r"wo$"), "vit": (r"\.(k_proj|v_proj|fc2)$", r"fc2$"),
    "gpt_neox": (r"(query_key_value|dense_4h_to_h)$", r"dense_4h_to_h$"),
    "gpt2": (r"\.(c_attn|mlp\.c_proj)$", r"mlp\.c_proj$"),
    "phi3": (r"(qkv_proj|down_proj)$", r"down_proj$"),
    "qwen3_moe": (r"\.(k|v)_proj$", None),  # fused experts: no linear down-projection
}

# one data-free case per hook kind on the default targets, then IA3 in its paper placement
VARIANTS = {c: (lambda m, c=c: CASES[c](())) for c in HOOK_KINDS
            if not variant(c).calibration_needs(CASES[c](()))[1]}
VARIANTS["ia3_paper"] = lambda m: ll.IA3Config(target_names=(IA3[m][0],),
                                               feedforward_modules=(IA3[m][1],) if IA3[m][1] else ())


def output(res) -> torch.Tensor:
    return res.logits if hasattr(res, "logits") else res.last_hidden_state


@pytest.fixture(scope="module", params=MODELS)
def arch(request):
    torch.manual_seed(0)
    model, batch = MODELS[request.param]()
    model = model.eval()
    with torch.no_grad():
        y0 = output(model(**batch))
    return request.param, model, batch, y0


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_on_architecture(arch, variant, tmp_path):
    name, base, batch, y0 = arch
    if name == "gpt2":  # transformers Conv1D layers (W stored transposed), adapted like nn.Linear
        assert is_linear_like(base.transformer.h[0].attn.c_attn)
    cfg = VARIANTS[variant](name)
    model = copy.deepcopy(base)

    def out(m):
        with torch.no_grad():
            return output(m(**batch))

    ll.attach(model, cfg)
    assert len(state_of(model).targets) == len(find_targets(base, cfg)) > 0
    tol = IDENTITY_TOL.get(cfg.variant, {}).get(torch.float32, 0.0)
    assert rel_err(out(model), y0) <= tol, "not the identity at init"

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # two steps: LoRA's A moves only once B has
        y = output(model(**batch))
        (y * torch.randn(y.shape, generator=g)).sum().backward()
        opt.step()
        opt.zero_grad()
    y1 = out(model)
    assert rel_err(y1, y0) > 1e-5, "a training step did not change the output"

    ll.save(model, tmp_path / "a.safetensors")
    loaded = copy.deepcopy(base)
    ll.load(loaded, tmp_path / "a.safetensors")
    assert torch.equal(out(loaded), y1), "save -> load does not reproduce the outputs"

    ll.merge(loaded)
    assert rel_err(out(loaded), y1) <= 1e-5, "merge changes the function"

    ll.detach(model)
    assert torch.equal(out(model), y0), "detach does not restore the base outputs"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), base.state_dict().values()))
