"""ll.combine: Σ w_k·Δ_k as one adapter, checked against the terms' own hooks.

The reference for a combination is never the combined adapter's code: a single term with weight
w must give what the term's own hooks give inside `ll.scaled(model, w)` (every change is affine
in the layer input, so y_base + w·Δy at every target is W + w·ΔW); two terms must give the merged
weight W + w_a·ΔW_a + w_b·ΔW_b, where each ΔW comes from merging that term alone (`ll.merge`).
"""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from lora_lite.runtime import state_of

from cases import CASE_PARAMS
from conftest import assert_untouched, rel_err, snapshot
from test_variants import attach_case, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


def trained(bench, case, seed=0):
    """A pristine copy of the bench model with the case attached and its trainables moved."""
    model = bench.fresh()
    attach_case(bench, case, model)
    with torch.no_grad():
        perturb(model, seed=seed)
    return model


@pytest.mark.parametrize("w", [-1.0, pytest.param(1.0, marks=pytest.mark.slow), pytest.param(0.5, marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", CASE_PARAMS)
def test_one_term_is_the_scaled_adapter(qwen, case, w):
    model = trained(qwen, case)
    with ll.scaled(model, w):
        want = qwen.out(model)
    base = qwen.fresh()
    combined = ll.combine([(ll.adapter_of(model), w)], model=qwen.fresh())
    ll.load(base, combined)
    assert rel_err(qwen.out(base), want) <= 2e-5


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_two_terms_merge_to_the_sum_of_changes(qwen, case):
    a, b = trained(qwen, case, seed=1), trained(qwen, "lora", seed=2)
    combined = ll.combine([(ll.adapter_of(a), 0.75), (ll.adapter_of(b), -1.5)], model=qwen.fresh())
    W0 = weights(qwen.model)
    ll.merge(a)
    ll.merge(b)
    Wa, Wb = weights(a), weights(b)
    c = qwen.fresh()
    ll.load(c, combined)
    ll.merge(c)
    for n, W in weights(c).items():
        want = W0[n] + 0.75 * (Wa[n] - W0[n]) - 1.5 * (Wb[n] - W0[n])
        assert rel_err(W, want) <= 1e-5, n


def test_a_minus_a_is_the_base(qwen, tmp_path):
    model = trained(qwen, "lora")
    ll.save(model, tmp_path / "a.safetensors")
    combined = ll.combine([(tmp_path / "a.safetensors", 1.0), (ll.read(tmp_path / "a.safetensors"), -1.0)])
    base = qwen.fresh()
    ll.load(base, combined)
    assert combined.config.r == 2 * state_of(model).cfg.r
    assert rel_err(qwen.out(base), qwen.out(qwen.model)) <= 1e-6


def test_the_result_saves_exports_and_reimports(qwen, tmp_path):
    a, b = trained(qwen, "lora", seed=3), trained(qwen, "pissa", seed=4)
    ll.save(a, tmp_path / "a.safetensors")
    ll.save(b, tmp_path / "b.safetensors")
    combined = ll.combine({tmp_path / "a.safetensors": 0.5, tmp_path / "b.safetensors": 0.5})
    first = qwen.fresh()
    ll.load(first, combined)
    want = qwen.out(first)
    ll.save(first, tmp_path / "c.safetensors")
    ll.export_peft(tmp_path / "c.safetensors", tmp_path / "peft")
    again = qwen.fresh()
    ll.import_peft(again, tmp_path / "peft")
    assert torch.equal(qwen.out(again), want)


def test_dense_change_reads_the_model_and_leaves_it_as_it_was(qwen):
    gated = trained(qwen, "ia3")
    base = qwen.fresh()
    before = snapshot(base)
    with pytest.raises(ValueError, match="not low-rank.*pass model="):
        ll.combine([(ll.adapter_of(gated), 1.0)])
    ll.combine([(ll.adapter_of(gated), 1.0)], model=base)
    assert_untouched(base, before)


def test_refuses_bad_terms_before_loading_anything(qwen, gpt2):
    a = ll.adapter_of(trained(qwen, "lora"))
    with pytest.raises(ValueError, match="no terms"):
        ll.combine({})
    for bad in (float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="finite number"):
            ll.combine([(a, bad)])
    other = qwen.fresh()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    ll.attach(other, ll.LoRAConfig(r=4, alpha=8.0))
    with pytest.raises(ValueError, match="different models"):
        ll.combine([(a, 1.0), (ll.adapter_of(other), 1.0)])
    wide = qwen.fresh()
    ll.attach(wide, ll.LoRAConfig(r=4, target_names=(r"q_proj$",)))
    renamed = ll.Adapter(config=ll.adapter_of(wide).config,
                         tensors={"model.layers.0.self_attn.k_proj": ll.adapter_of(wide).tensors["model.layers.0.self_attn.q_proj"]})
    with pytest.raises(ValueError, match="different models"):
        ll.combine([(a, 1.0), (renamed, 1.0)])
    trains_head = qwen.fresh()
    ll.attach(trains_head, ll.LoRAConfig(r=4, trainable_modules=(r"^lm_head$",), exclude_names=(r"lm_head$",)))
    with pytest.raises(ValueError, match="trainable_modules"):
        ll.combine([(ll.adapter_of(trains_head), 1.0)])


def test_refuses_a_bias_change(toy_linear):
    model = toy_linear()
    ll.attach(model, ll.IA3Config(target_names=(r"^0$",)))
    with torch.no_grad():
        model[0].lora_g.add_(0.5)
    with pytest.raises(ValueError, match="changes the bias"):
        ll.combine([(ll.adapter_of(model), 1.0)], model=toy_linear())


@pytest.fixture
def toy_linear():
    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    return make
