"""Layer kinds beyond nn.Linear (kinds.py): GPT-2's Conv1D and nn.Embedding.

Conv1D runs through the generic per-variant suites (test_variants, test_merge, test_interop,
test_peft_parity, test_compile are parametrized over the tiny GPT-2); here: importing adapters
PEFT saved for Conv1D layers (fan_in_fan_out=True). Embeddings: LoRA and DoRA (the variants PEFT
has there) on an untied embedding (tiny Qwen3) and a tied one (GPT-2's wte, shared with lm_head):
identity, closed form, save/load, detach, merge, PEFT parity / export / import; every other
variant refuses an embedding by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lora_lite as ll
from lora_lite.kinds import dims
from lora_lite.runtime import state_of
from lora_lite.variant import REGISTRY, Variant, register

from conftest import assert_untouched, rel_err, snapshot
from test_interop import saved_peft
from test_readme import python_sections
from test_variants import perturb

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_thread")

EMBEDDING = {"qwen": r"embed_tokens$", "gpt2": r"wte$"}
EMBEDDING_VARIANTS = [n for n, v in REGISTRY.items() if "embedding" in v.kinds]  # (a LoRA pair there)


@pytest.fixture(params=["qwen", "gpt2"])
def lm(request):
    return request.getfixturevalue(request.param)


def embedding_cfg(lm, variant):
    return REGISTRY[variant].config(r=4, alpha=8, target_names=(EMBEDDING[lm.kind],))


def assert_exports_load_in_peft(bench, model, y, tmp_path, tol):
    """Export from the attached model and from its saved file; PEFT loads both onto a pristine
    base with our outputs `y`."""
    ll.export_peft(model, tmp_path / "out")
    ll.save(model, tmp_path / "a.safetensors")
    ll.export_peft(str(tmp_path / "a.safetensors"), tmp_path / "out_file")
    for d in ("out", "out_file"):
        pm = peft.PeftModel.from_pretrained(bench.fresh(), tmp_path / d).eval()
        assert rel_err(bench.out(pm), y) <= tol, d


# ---- Conv1D: PEFT adapters saved with fan_in_fan_out=True ---------------------------------------

GPT2_T = ["c_attn", "c_fc", "mlp.c_proj"]
GPT2_IMPORTS = {  # each imports as the variant whose PeftMap has its method and options
    "peft_lora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_T, fan_in_fan_out=True),
    "peft_dora": lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_T, fan_in_fan_out=True,
                                         use_dora=True),
    "peft_ia3": lambda: peft.IA3Config(target_modules=["c_attn"], feedforward_modules=[], fan_in_fan_out=True),
    # a PEFT IA3 adapter imports as one variant, its feedforward_modules as input gates
    "peft_ia3_ff": lambda: peft.IA3Config(target_modules=["mlp.c_proj"], feedforward_modules=["mlp.c_proj"],
                                          fan_in_fan_out=True),
}


@pytest.mark.parametrize("name", GPT2_IMPORTS)
def test_import_of_peft_conv1d_adapters(gpt2, name, tmp_path):
    pcfg = GPT2_IMPORTS[name]()
    y_peft = saved_peft(gpt2, pcfg, tmp_path / "peft")
    assert rel_err(y_peft, gpt2.out(gpt2.model)) > 1e-3, "adapter is a no-op; the check is vacuous"
    model = gpt2.fresh()
    cfg = ll.import_peft(model, tmp_path / "peft")
    assert REGISTRY[cfg.variant].peft.method == str(pcfg.peft_type.value)
    assert rel_err(gpt2.out(model), y_peft) <= 1e-5
    ll.export_peft(model, tmp_path / "back")  # and back, the same tensors
    pm = peft.PeftModel.from_pretrained(gpt2.fresh(), tmp_path / "back").eval()
    assert rel_err(gpt2.out(pm), y_peft) <= 1e-5


# ---- nn.Embedding -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", EMBEDDING_VARIANTS)
def test_embedding_identity_closed_form_reload_detach(lm, variant, tmp_path):
    model = lm.fresh()
    before = snapshot(model)
    y0 = lm.out(model)
    cfg = embedding_cfg(lm, variant)
    ll.attach(model, cfg)
    (name, layer), = state_of(model).targets.items()
    assert dims(layer) == (layer.num_embeddings, layer.embedding_dim)
    assert layer.lora_A.shape == (4, layer.num_embeddings) and layer.lora_B.shape == (layer.embedding_dim, 4)
    assert torch.equal(lm.out(model), y0)  # identity at init, bit for bit
    perturb(model)
    y1 = lm.out(model)
    assert rel_err(y1, y0) > 1e-3

    # the hooked lookup is the lookup in W_effᵀ (W = weightᵀ, (dim, V))
    ids = lm.batch["input_ids"]
    with torch.no_grad():
        W_eff, b_eff = REGISTRY[cfg.variant].effective_weight(layer, cfg)
        assert b_eff is None
        assert rel_err(layer(ids), F.embedding(ids, W_eff.T)) <= 1e-6

    ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    assert_untouched(model, before)  # bit for bit, the tied head included
    fresh = lm.fresh()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(lm.out(fresh), y1)


def test_tied_embedding_changes_the_lookup_only(gpt2):
    """GPT-2's lm_head shares wte's weight: the adapter changes the input lookup, the output head
    keeps W (the weight is never written), so the logits are the base head on adapted states."""
    model = gpt2.fresh()
    ll.attach(model, embedding_cfg(gpt2, "lora"))
    perturb(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, gpt2.model.lm_head.weight)
    with torch.no_grad():
        out = model(**gpt2.batch, output_hidden_states=True)
        head = out.hidden_states[-1] @ gpt2.model.lm_head.weight.T
    assert rel_err(out.logits, head) <= 1e-6


def test_merge_of_an_untied_embedding_is_the_same_function(qwen):
    model = qwen.fresh()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    ll.attach(model, embedding_cfg(qwen, "dora"))
    perturb(model)
    y = qwen.out(model)
    ll.merge(model)
    assert not [k for k in model.state_dict() if "lora_" in k]
    assert rel_err(qwen.out(model), y) <= 1e-5


def test_merge_refuses_a_tied_embedding_untouched(gpt2):
    model = gpt2.fresh()
    ll.attach(model, embedding_cfg(gpt2, "lora"))
    perturb(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"transformer\.wte: its weight is also lm_head\.weight \(tied"):
        ll.merge(model)
    assert_untouched(model, before)


@pytest.mark.parametrize("variant", EMBEDDING_VARIANTS)
def test_embedding_peft_parity_export_import(lm, variant, tmp_path):
    from lora_lite.interop.peft import copy_to_peft, peft_config

    model = lm.fresh()
    cfg = embedding_cfg(lm, variant)
    ll.attach(model, cfg)
    perturb(model)
    y = lm.out(model)
    targets = list(state_of(model).targets)

    theirs = peft.get_peft_model(lm.fresh(), peft_config(cfg, targets, {t: "embedding" for t in targets})).eval()
    copy_to_peft(model, theirs)
    assert rel_err(lm.out(theirs), y) <= 1e-5  # parity: the same tensors in PEFT's slots

    assert_exports_load_in_peft(lm, model, y, tmp_path, tol=1e-5)

    # a PEFT-trained embedding adapter imports with PEFT's outputs
    pcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[EMBEDDING[lm.kind].rstrip("$")],
                           use_dora=variant == "dora")
    y_peft = saved_peft(lm, pcfg, tmp_path / "peft")
    imported = lm.fresh()
    assert ll.import_peft(imported, tmp_path / "peft").variant == variant
    assert rel_err(lm.out(imported), y_peft) <= 1e-5


def test_import_refuses_an_embedding_adapter_on_a_linear(qwen, tmp_path):
    saved_peft(qwen, peft.LoraConfig(r=4, target_modules=["embed_tokens"]), tmp_path / "peft")
    st = tmp_path / "peft" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = {k.replace("model.embed_tokens", "model.layers.0.mlp.down_proj"): v for k, v in load_file(st).items()
               if "base_layer" not in k}
    save_file(tensors, st)
    model = qwen.fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match="down_proj is a linear layer here, the adapter was made for an embedding one"):
        ll.import_peft(model, tmp_path / "peft")
    assert_untouched(model, before)


def test_import_refuses_a_different_saved_base_embedding(qwen, tmp_path):
    """PEFT saves the base embedding beside the adapter and loads it over the base: a different
    one would change the model, so it must be this model's own."""
    saved_peft(qwen, peft.LoraConfig(r=4, target_modules=["embed_tokens"]), tmp_path / "peft")
    other = qwen.fresh()
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(1.5)
    before = snapshot(other)
    with pytest.raises(ValueError, match="embed_tokens.base_layer.weight is a base weight that differs"):
        ll.import_peft(other, tmp_path / "peft")
    assert_untouched(other, before)


@pytest.mark.parametrize("variant", sorted(set(REGISTRY) - set(EMBEDDING_VARIANTS)))
def test_other_variants_refuse_an_embedding_by_name(qwen, variant):
    cfg = ll.AdapterConfig.from_dict({"variant": variant, "target_names": [r"embed_tokens$"]})
    model = qwen.fresh()
    before = snapshot(model)
    with pytest.raises(TypeError) as err:
        ll.attach(model, cfg, calibration_data=qwen.calibration if REGISTRY[variant].requires_calibration else None)
    msg = str(err.value)
    assert f"model.embed_tokens: variant {variant!r} does not adapt Embedding (torch.nn.Embedding)" in msg
    assert "it adapts torch.nn.Linear" in msg and "variants that adapt it: dora, lora" in msg
    assert_untouched(model, before)


def test_embeddings_are_adapted_only_when_named(gpt2):
    model = gpt2.fresh()
    ll.attach(model, ll.LoRAConfig(r=2))  # no target_names: every linear-like layer, no embedding
    kinds = {type(m).__name__ for m in state_of(model).targets.values()}
    assert kinds == {"Conv1D"}


def test_a_variant_declares_embedding_with_its_delta():
    @dataclass(frozen=True, kw_only=True)
    class BrokenConfig(ll.AdapterConfig):
        variant: str = field(default="broken_embedding", init=False)

    with pytest.raises(TypeError, match="an 'embedding' in kinds goes with a delta_embedding"):
        @register
        class Broken(Variant):
            name = "broken_embedding"
            config = BrokenConfig
            kinds = ("linear", "embedding")
            delta = staticmethod(lambda layer, cfg, x, y: y)
    assert "broken_embedding" not in REGISTRY


# ---- fused expert parameters (target_parameters) ------------------------------------------------

EXPERTS = r"mlp\.experts\.(gate_up_proj|down_proj)$"


def experts_cfg(**kw):
    return ll.LoRAConfig(r=2, alpha=4, target_parameters=(EXPERTS,), **kw)


def expected_W(model, name, s):
    """W_e + s·B_e A_e for every expert, written out per expert (independent of the runtime)."""
    owner_name, _, pname = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    slot = getattr(owner, "lora_" + pname)
    W = getattr(owner, pname).detach()
    return torch.stack([W[e] + s * slot.lora_B[e] @ slot.lora_A[e] for e in range(W.shape[0])])


def test_experts_identity_training_reload_detach(qwen_moe, tmp_path):
    model = qwen_moe.fresh()
    before = snapshot(model)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    y0 = qwen_moe.out(model)
    ll.attach(model, experts_cfg())
    targets = state_of(model).targets
    assert list(targets) == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]
    layer = targets["model.layers.0.mlp.experts.gate_up_proj"]
    assert layer.lora_A.shape == (4, 2, 64) and layer.lora_B.shape == (4, 64, 2)
    assert torch.equal(qwen_moe.out(model), y0)  # identity at init, bit for bit
    assert type(model) is type(qwen_moe.model)

    perturb(model)
    out = qwen_moe.output(model(**qwen_moe.batch))
    out.square().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:  # every expert's A and B is live (top-2 of 4 on 20 tokens hits all)
            assert all(p.grad[e].abs().sum() > 0 for e in range(4)), n
    y1 = qwen_moe.out(model)
    assert rel_err(y1, y0) > 1e-3
    state = model.state_dict()  # base entries untouched, bit for bit, after a forward/backward
    assert {k for k in state if ".lora_" not in k} == set(base_state)
    assert all(torch.equal(state[k], v) for k, v in base_state.items())
    experts = model.model.layers[0].mlp.experts
    assert type(experts.gate_up_proj) is torch.nn.Parameter  # the Parameter is back after forward

    ll.save(model, tmp_path / "a.safetensors")
    ll.detach(model)
    assert_untouched(model, before)
    fresh = qwen_moe.fresh()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert torch.equal(qwen_moe.out(fresh), y1)


def test_experts_merge_is_exact_per_expert(qwen_moe):
    model = qwen_moe.fresh()
    cfg = experts_cfg()
    ll.attach(model, cfg)
    perturb(model)
    y = qwen_moe.out(model)
    expected = {n: expected_W(model, n, cfg.scale) for n in state_of(model).targets}
    ll.merge(model)
    for name, W in expected.items():
        assert rel_err(model.get_parameter(name), W) <= 1e-6, name
    assert not [k for k in model.state_dict() if "lora_" in k]
    assert rel_err(qwen_moe.out(model), y) <= 1e-5


def test_experts_disabled_scaled_and_a_raising_forward(qwen_moe, monkeypatch):
    model = qwen_moe.fresh()
    ll.attach(model, experts_cfg())
    perturb(model)
    y0, y1 = qwen_moe.out(qwen_moe.model), qwen_moe.out(model)
    with ll.disabled(model):
        assert torch.equal(qwen_moe.out(model), y0)
    with ll.scaled(model, 0.0):
        assert torch.equal(qwen_moe.out(model), y0)
    with ll.scaled(model, 0.5):
        y_half = qwen_moe.out(model)
    half = qwen_moe.fresh()
    ll.attach(half, experts_cfg())
    for (n, p), (_, q) in zip(model.named_parameters(), half.named_parameters()):
        if p.requires_grad:
            with torch.no_grad():
                q.copy_(p)
    with ll.scaled(half, 0.5):
        ll.merge(half)  # W + 0.5·ΔW written per expert
    assert rel_err(y_half, qwen_moe.out(half)) <= 1e-5
    assert rel_err(qwen_moe.out(model), y1) == 0

    experts = model.model.layers[0].mlp.experts
    original = experts.gate_up_proj
    class Boom(torch.nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    monkeypatch.setattr(experts, "act_fn", Boom())
    with pytest.raises(RuntimeError, match="boom"):
        qwen_moe.out(model)
    assert experts._parameters["gate_up_proj"] is original  # restored although the forward raised


def test_experts_peft_parity_export_import(qwen_moe, tmp_path):
    from lora_lite.interop.peft import copy_to_peft, peft_config
    from lora_lite.kinds import kind_of

    model = qwen_moe.fresh()
    cfg = experts_cfg()
    ll.attach(model, cfg)
    perturb(model)
    y = qwen_moe.out(model)
    targets = state_of(model).targets
    pcfg = peft_config(cfg, list(targets), {n: kind_of(m) for n, m in targets.items()})
    assert pcfg.target_parameters == list(targets) and not pcfg.target_modules
    theirs = peft.get_peft_model(qwen_moe.fresh(), pcfg).eval()
    copy_to_peft(model, theirs)
    assert rel_err(qwen_moe.out(theirs), y) <= 1e-6
    for name in targets:  # PEFT's own ΔW per expert equals ours
        owner, _, pname = name.rpartition(".")
        wrapper = theirs.base_model.model.get_submodule(owner)
        while wrapper.parameter_name != pname:
            wrapper = wrapper.base_layer
        delta = wrapper.get_delta_weight("default")
        ours = expected_W(model, name, cfg.scale) - model.get_parameter(name)
        assert rel_err(delta, ours) <= 1e-6, name

    assert_exports_load_in_peft(qwen_moe, model, y, tmp_path, tol=1e-6)

    # a PEFT-trained target_parameters LoRA imports with PEFT's outputs, and goes back tensor-equal
    pcfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=[],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    y_peft = saved_peft(qwen_moe, pcfg, tmp_path / "peft")
    imported = qwen_moe.fresh()
    got = ll.import_peft(imported, tmp_path / "peft")
    assert got.target_parameters and not got.target_names
    assert rel_err(qwen_moe.out(imported), y_peft) <= 1e-6
    ll.export_peft(imported, tmp_path / "back")
    from safetensors.torch import load_file

    t0, t1 = load_file(tmp_path / "peft" / "adapter_model.safetensors"), load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert t0.keys() == t1.keys() and all(torch.equal(t0[k], t1[k]) for k in t0)


def test_experts_refusals(qwen_moe):
    model = qwen_moe.fresh()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: variant 'dora' does not "
                                        r"adapt FusedParameter \(fused 3-D parameters"):
        ll.attach(model, ll.DoRAConfig(r=2, target_parameters=(EXPERTS,)))
    with pytest.raises(ValueError, match=r"target_parameters: 'experts\\\\.nothing' matches no fused parameter"):
        ll.attach(model, ll.LoRAConfig(r=2, target_parameters=(r"experts\.nothing",)))
    with pytest.raises(ValueError, match=r"matches model\.layers\.0\.mlp\.gate\.weight of shape \(4, 64\), not a 3-D"):
        ll.attach(model, ll.LoRAConfig(r=2, target_parameters=(r"mlp\.gate\.weight$",)))
    assert_untouched(model, before)


def test_experts_with_modules_and_copies(qwen_moe):
    """target_names and target_parameters together; a deepcopy of the attached model is an
    independent attached model."""
    import copy

    model = qwen_moe.fresh()
    ll.attach(model, experts_cfg(target_names=(r"q_proj$",)))
    assert len(state_of(model).targets) == 6
    perturb(model)
    y = qwen_moe.out(model)
    twin = copy.deepcopy(model)
    assert torch.equal(qwen_moe.out(twin), y)
    with ll.disabled(twin):
        assert torch.equal(qwen_moe.out(twin), qwen_moe.out(qwen_moe.model))
        assert torch.equal(qwen_moe.out(model), y)
    ll.detach(twin)
    assert torch.equal(qwen_moe.out(model), y)


# ---- docs/layer-kinds.md runs as written --------------------------------------------------------

DOC = Path(__file__).resolve().parents[1] / "docs" / "layer-kinds.md"
DOC_SECTIONS = python_sections(DOC.read_text(encoding="utf-8"))


def test_the_doc_has_its_examples():
    assert {"GPT-2 and other Conv1D models", "Embeddings", "Fused expert parameters (MoE)"} <= set(DOC_SECTIONS)


@pytest.mark.slow  # a fresh interpreter per section (~7 s each); the full tier runs them
@pytest.mark.parametrize("title", list(DOC_SECTIONS))
def test_doc_section_runs(title, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DOC.parents[1] / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", DOC_SECTIONS[title]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"docs/layer-kinds.md section {title!r} failed:\n{res.stderr[-3000:]}"
