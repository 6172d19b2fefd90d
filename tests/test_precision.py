"""Low-precision bases and the compute policy (SPEC amendment 2), and the numerical traps of the
float64 audit: each test here failed on the runtime that rewrote W and computed in the adapter
dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll
from lora_lite.runtime import state_of

from cases import CASES, HOOK_KINDS, IDENTITY_TOL, PRIMARY, QWEN_ONLY, variant
from conftest import rel_err
from test_variants import attach_case, neutralize, perturb

PROJECTIONS = r"(q|k|v|o|gate|up|down)_proj$"


def _saved_storages(model, **batch) -> dict[int, tuple[int, torch.dtype]]:
    """{storage pointer: (bytes, dtype)} of the unique storages autograd keeps for backward
    during one forward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = (s.nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    return storages


@pytest.mark.slow  # a Qwen3-0.6B-shaped block in bf16
def test_activation_memory_beyond_the_base_is_a_bf16_lora_floor():
    """bf16 decoder with Qwen3-0.6B layer shapes, LoRA r=16 on all seven projections, fp32
    adapter tensors. PEFT casts each target's input to fp32 and keeps that copy per target; ours
    computes in bf16 and keeps what any bf16 LoRA must: each distinct layer input once (for
    grad A; q/k/v and gate/up share theirs) and the (…, r) intermediates. Like for like (the
    frozen base and both adapted models back-propagate to the embeddings, so the graphs agree
    upstream), that floor is 14 KiB vs 40 KiB per token and layer: 0.35 of PEFT's. Against the
    frozen-base step of `bench cost` (2 layers × 4×512 tokens) it reads 42.1 vs 148.3 MiB."""
    peft = pytest.importorskip("peft")
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=512, hidden_size=1024, intermediate_size=3072, num_hidden_layers=1,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, attn_implementation="eager")
    base = Qwen3ForCausalLM(cfg).to(torch.bfloat16).train()
    base.requires_grad_(False)
    batch = {"input_ids": torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(0))}
    ours = copy.deepcopy(base)
    ll.attach(ours, ll.LoRAConfig(r=16, alpha=32, target_names=(PROJECTIONS,)))
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=names))
    embeddings = [m.get_input_embeddings().weight for m in (base, ours, theirs)]
    for w in embeddings:
        w.requires_grad_(True)
    b0, b1, b2 = (_saved_storages(m, **batch) for m in (base, ours, theirs))
    total = {k: sum(n for n, _ in d.values()) for k, d in (("base", b0), ("ours", b1), ("peft", b2))}
    ours_extra, peft_extra = total["ours"] - total["base"], total["peft"] - total["base"]
    tokens = 2 * 256
    assert ours_extra <= 0.37 * peft_extra, (ours_extra / 2**20, peft_extra / 2**20)
    casts = sum(p.numel() * 2 for n, p in ours.named_parameters() if ".lora_" in n)  # bf16 copies of A, B
    assert ours_extra <= tokens * (14 * 1024 + 7 * 16 * 2 * 2) + casts  # x once per input + (…, r) pairs
    fp32 = [sum(n for n, dt in d.values() if dt == torch.float32) for d in (b0, b1)]
    assert fp32[1] - fp32[0] < tokens * 1024 * 4, "an fp32 copy of an activation is kept for backward"


@pytest.mark.parametrize("to", ["bf16", "half"])
@pytest.mark.parametrize("case", [c for c in CASES if c not in QWEN_ONLY])
def test_casting_the_model_after_attach_keeps_working(qwen, case, to):
    """`.to(bfloat16)` / `.half()` after an fp32 attach casts the adapter tensors too; the hooks
    follow them, and the result is the fp32 adapted model up to low-precision rounding."""
    model = qwen.fresh()
    attach_case(qwen, case, model)
    perturb(model, scale=0.02)
    y32 = qwen.out(model)
    model = model.to(torch.bfloat16) if to == "bf16" else model.half()
    dtype = torch.bfloat16 if to == "bf16" else torch.float16
    assert all(p.dtype == dtype for p in model.parameters())
    y = qwen.out(model)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel_err(y, y32) <= 0.05  # a 2-layer forward in bf16: a few % of max |y|


def test_a_checkpoint_records_the_dtype_its_tensors_are_stored_in(qwen, tmp_path):
    model = qwen.fresh()
    ll.attach(model, CASES["dora"](qwen.targets))
    perturb(model)
    model = model.to(torch.bfloat16)
    ll.save(model, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(qwen.model).to(torch.bfloat16)
    ll.load(fresh, tmp_path / "a.safetensors")
    assert state_of(fresh).cfg.dtype is torch.bfloat16
    assert torch.equal(qwen.out(fresh), qwen.out(model))


def _lora_layer(dtype, compute):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(32, 24)).to(dtype)
    ll.attach(layer, ll.LoRAConfig(r=4, alpha=8, compute=compute))
    with torch.no_grad():
        layer[0].lora_B.normal_()
    return layer


def test_default_compute_runs_in_the_activation_dtype():
    """bf16 base, fp32 adapter: Δy = s·(x A_bf16ᵀ) B_bf16ᵀ in bf16, added to the bf16 y."""
    layer = _lora_layer(torch.bfloat16, "input")
    lin = layer[0]
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    A, B = lin.lora_A.to(torch.bfloat16), lin.lora_B.to(torch.bfloat16)
    expected = F.linear(x, lin.weight, lin.bias) + F.linear(F.linear(x, A) * 2.0, B)
    assert torch.equal(layer(x), expected)


def test_adapter_compute_casts_the_activation_to_the_adapter_dtype():
    """compute="adapter": x is cast to fp32 for the adapter math and Δy back to bf16."""
    layer = _lora_layer(torch.bfloat16, "adapter")
    lin = layer[0]
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    delta = F.linear(F.linear(x.float(), lin.lora_A) * 2.0, lin.lora_B)
    expected = F.linear(x, lin.weight, lin.bias) + delta.to(torch.bfloat16)
    assert torch.equal(layer(x), expected)


def test_dora_is_the_identity_on_a_bf16_base_with_a_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 40), nn.GELU(), nn.Linear(40, 24)).to(torch.bfloat16)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.normal_(0.0, 3.0)  # a bias large against y: y − b rounds in bf16
    x = torch.randn(16, 48, dtype=torch.bfloat16)
    y0 = model(x)
    ll.attach(model, ll.DoRAConfig(r=4))
    assert torch.equal(model(x), y0)


def _gain_layer(cfg):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    ll.attach(model, cfg)
    return model, model[0]


def test_suppress_only_gain_pushed_above_zero_still_learns():
    """A straight-through clamp: g > 0 gives the clamped forward (gain 1) but a live gradient,
    so the optimiser can bring g back below 0 (a plain clamp froze it there for good)."""
    model, layer = _gain_layer(ll.AntiPaSTOConfig(r=8, suppress_only=True))
    with torch.no_grad():
        layer.lora_g.fill_(0.5)
    x = torch.randn(10, 16)
    y = model(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))  # the forward is clamped: gain 1
    (y * torch.randn_like(y)).sum().backward()
    assert (layer.lora_g.grad != 0).all()


def test_ablation_strength_below_zero_still_learns():
    model, layer = _gain_layer(ll.AntiPaSTOAblateConfig(r=8, k=1))
    with torch.no_grad():
        layer.lora_strength.fill_(-0.1)
    x = torch.randn(10, 16)
    y = model(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))  # α̂ = 0: no ablation
    (y * torch.randn_like(y)).sum().backward()
    assert layer.lora_strength.grad.abs().sum() > 0


def test_gain_forward_scales_each_singular_value_by_1_plus_elu():
    """What the hook computes: u_iᵀ W_eff v_i = S_i·(1 + ELU(g_i)), i.e. S_i·e^{g_i} below 0 (a
    direction is suppressed, never flipped) and S_i·(1 + g_i) above, with W_eff probed from the
    forward on identity inputs and compared with float64 closed forms from an independent SVD."""
    model, layer = _gain_layer(ll.AntiPaSTOConfig(r=8))
    g = torch.tensor([-4.0, -1.0, -0.25, 0.0, 0.5, 1.0, 3.0, -2.0])
    with torch.no_grad():
        layer.lora_g.copy_(g)
        W = layer.weight.double()
        W_eff = (model(torch.eye(16)) - layer.bias).double().T  # (d_out, d_in) as the hook applies it
    U, S, Vh = torch.linalg.svd(W)
    got = torch.einsum("oi,oj,ji->i", U[:, :8], W_eff, Vh[:8].T)  # u_iᵀ W_eff v_i
    factor = torch.where(g < 0, g.double().exp(), 1.0 + g.double())
    assert torch.allclose(got, S[:8] * factor, rtol=1e-4, atol=1e-5 * float(S[0]))
    assert (got > 0).all()


@pytest.mark.parametrize("block_size", [2, 4, 8])
def test_rotation_angle_cap_holds_for_every_block_size(block_size):
    """Every rotation angle of every block stays ≤ max_rotation_angle, however large rot_T."""
    from lora_lite.variants.antipasto_rot import _rotations_minus_identity

    t = 50.0 * torch.randn(64, block_size * (block_size - 1) // 2, generator=torch.Generator().manual_seed(0))
    R = _rotations_minus_identity(t, block_size, 0.5).double() + torch.eye(block_size, dtype=torch.float64)
    assert torch.allclose(R @ R.transpose(1, 2), torch.eye(block_size, dtype=torch.float64).expand_as(R), atol=1e-5)
    angles = torch.linalg.eigvals(R).angle().abs()
    assert angles.max() <= 0.5 + 1e-5, angles.max()
    if block_size == 2:  # one angle per block: the cap is reached as |t| grows
        assert angles.max() >= 0.49


@pytest.mark.parametrize("case", [c for c in PRIMARY if variant(c).needs_dense_weight])
def test_weight_reading_attach_keeps_the_base_bf16_model(qwen_bf16, case):
    """The weight-reading variants on a bf16 base: no W_res is rounded, so the attached model at
    init (with the deliberate offsets zeroed) is the base, bit for bit unless the variant
    declares an identity tolerance on bf16 (its init math itself rounds)."""
    model = qwen_bf16.fresh()
    y0 = qwen_bf16.out(model)
    attach_case(qwen_bf16, case, model)
    neutralize(model)
    tol = IDENTITY_TOL.get(variant(case).name, {}).get(torch.bfloat16, 0.0)
    assert rel_err(qwen_bf16.out(model), y0) <= tol


@pytest.mark.parametrize("case", HOOK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_save_pretrained_of_an_attached_model_reloads_the_pristine_base(qwen, case, dtype, tmp_path):
    """transformers' own save of an attached model writes the untouched base weights (plus the
    extra `lora_*` entries, which from_pretrained reports as unexpected and drops)."""
    from transformers import Qwen3ForCausalLM

    model = copy.deepcopy(qwen.model).to(dtype)
    model.save_pretrained(tmp_path / "pristine")
    attach_case(qwen, case, model)
    perturb(model)
    model.save_pretrained(tmp_path / "attached")

    def reload(folder):  # (from_pretrained keeps rotary buffers fp32: compare like with like)
        return Qwen3ForCausalLM.from_pretrained(tmp_path / folder, torch_dtype=dtype, attn_implementation="eager").eval()

    reloaded, pristine = reload("attached"), reload("pristine")
    state, expected = reloaded.state_dict(), pristine.state_dict()
    assert state.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(qwen.out(reloaded), qwen.out(pristine))
