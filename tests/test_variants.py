"""The invariants every variant must hold, on a random Qwen3 decoder (fp32 and bf16 base) and
the real MiniLM.

SPEC A4.5 identity, A4.6 only adapters train and every trainable is live, A4.7 save/load,
A4.8 detach, the closed form W_eff of every variant, plus refusal of a second attach. No
variant writes a base weight (SPEC amendment 1), so detach and reload are bit-exact and the
base state_dict entries never change while attached.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import lora_lite as ll
from lora_lite.kinds import dims
from lora_lite.runtime import state_of
from lora_lite.variant import REGISTRY

from cases import CASE_PARAMS, CASES, IDENTITY_TOL, NO_DATA, PRIMARY, QWEN_ONLY, TRAINABLE, variant
from conftest import assert_untouched, rel_err, snapshot


@pytest.fixture(params=["qwen", pytest.param("minilm", marks=pytest.mark.slow),
                        pytest.param("qwen_bf16", marks=pytest.mark.slow), "gpt2"])
def bench(request):
    """Every invariant on the fp32 models, on the tiny Qwen3 with a bf16 base, and on a tiny
    GPT-2 whose targets are transformers' Conv1D (W stored transposed) (the fast tier: the fp32
    tiny Qwen3 and GPT-2)."""
    return request.getfixturevalue(request.param)


def attach_case(bench, case, model):
    if case in QWEN_ONLY and bench.kind != "qwen":
        pytest.skip(f"{case} runs on the tiny Qwen3 only")
    cfg = CASES[case](bench.targets)
    data = None if case in NO_DATA or not REGISTRY[cfg.variant].calibration_needs(cfg)[0] else bench.calibration
    ll.attach(model, cfg, calibration_data=data, progress=False)
    return cfg


@torch.no_grad()
def neutralize(model):
    """Zero the tensors the variant declares `neutral` (its deliberate offset at init), which
    makes a non-identity init the exact identity."""
    state = state_of(model)
    for layer in state.targets.values():
        for pname in state.variant.neutral:
            getattr(layer, pname).zero_()


def trainables(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def perturb(model, names=None, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n, p in trainables(model).items():
        if names is None or n.rsplit(".", 1)[1] in names:
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_every_variant_has_a_case():
    covered = {CASES[c](()).variant for c in CASES}
    assert set(REGISTRY) <= covered, f"variants without a test case: {set(REGISTRY) - covered}"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_identity_at_init(bench, case):
    model = bench.fresh()
    y0 = bench.out(model)
    cfg = attach_case(bench, case, model)
    neutralize(model)
    y = bench.out(model)
    assert rel_err(y, y0) <= IDENTITY_TOL.get(cfg.variant, {}).get(bench.dtype, 0.0)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_only_adapter_tensors_train(bench, case):
    model = bench.fresh()
    cfg = attach_case(bench, case, model)
    names = set(trainables(model))
    assert names and all(".lora_" in n for n in names)
    if cfg.variant not in TRAINABLE:
        return
    state = state_of(model)
    expected = sum(  # the count of the variant placed at each target (IA3: gate on input or output)
        REGISTRY[cfg.variant].at_target(name, cfg).params_per_layer(*dims(layer), cfg)
        for name, layer in state.targets.items()
    )
    assert sum(p.numel() for p in trainables(model).values()) == expected
    base = {n for n, _ in bench.model.named_parameters()}
    assert not names & base


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_every_trainable_gets_a_gradient(bench, case):
    model = bench.fresh()
    cfg = attach_case(bench, case, model)
    out = bench.output(model(**bench.batch))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    zero_by_design = REGISTRY[cfg.variant].zero_grad_at_init
    for name, p in trainables(model).items():
        g = p.grad
        if name.rsplit(".", 1)[1] in zero_by_design:
            assert g is None or not g.any(), f"{name} should have zero grad at step 0"
        else:
            assert g is not None and g.abs().sum() > 0 and torch.isfinite(g).all(), name
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_every_trainable_family_changes_the_output(bench, case):
    model = bench.fresh()
    attach_case(bench, case, model)
    perturb(model)  # move off init so that e.g. A matters once B != 0
    y = bench.out(model)
    families = {n.rsplit(".", 1)[1] for n in trainables(model)}
    for fam in sorted(families):
        perturb(model, names={fam}, seed=1)
        y_new = bench.out(model)
        assert rel_err(y_new, y) > 1e-4, f"perturbing {fam} did not change the output"
        y = y_new


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_save_detach_load_roundtrip(bench, case, tmp_path):
    model = bench.fresh()
    y0 = bench.out(model)
    attach_case(bench, case, model)
    perturb(model)
    y1 = bench.out(model)
    path = tmp_path / "adapter.safetensors"
    ll.save(model, path)

    specs = state_of(model).specs  # a shared tensor (ParamSpec shared=True) is stored once
    expected = {f"shared.{p}" if s.shared else f"{t}.{p}" for t, per in specs.items() for p, s in per.items()}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        stored = sum(f.get_tensor(k).numel() for k in keys)
    assert keys == expected
    held = {id(t): t.numel() for t_name, layer in state_of(model).targets.items()
            for t in (getattr(layer, p) for p in specs[t_name])}
    assert stored == sum(held.values()), "the file holds each adapter tensor as often as memory does: once"
    assert not keys & set(bench.model.state_dict()), "the checkpoint holds base weights"

    ll.detach(model)
    assert torch.equal(bench.out(model), y0)
    fresh = bench.fresh()
    ll.load(fresh, path)
    assert torch.equal(bench.out(fresh), y1)
    ll.load(model, path)  # onto the detached model itself
    assert torch.equal(bench.out(model), y1)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_detach_restores_the_base(bench, case):
    model = bench.fresh()
    before = snapshot(model)
    y0 = bench.out(model)
    cfg = attach_case(bench, case, model)
    perturb(model)
    ll.detach(model)
    assert torch.equal(bench.out(model), y0)
    assert_untouched(model, before)  # bit for bit
    assert not any(".lora_" in k for k in model.state_dict())
    # attach -> detach -> attach works and is again the identity
    attach_case(bench, case, model)
    if REGISTRY[cfg.variant].identity_at_init:
        assert rel_err(bench.out(model), y0) <= IDENTITY_TOL.get(cfg.variant, {}).get(bench.dtype, 0.0)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_base_weights_are_never_written(bench, case):
    """While attached (and trained) the base state_dict entries are the pristine ones bit for bit;
    the adapter's tensors are the only extra entries."""
    model = bench.fresh()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    attach_case(bench, case, model)
    perturb(model)
    bench.out(model)
    state = model.state_dict()
    assert {k for k in state if ".lora_" not in k} == set(base)
    for k, v in base.items():
        assert torch.equal(state[k], v), k


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_second_attach_is_refused_untouched(bench, case, tmp_path):
    model = bench.fresh()
    attach_case(bench, case, model)
    ll.save(model, tmp_path / "a.safetensors")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="already has a lora-lite adapter"):
        ll.attach(model, ll.LoRAConfig(r=2, target_names=bench.targets))
    with pytest.raises(RuntimeError, match="already has a lora-lite adapter"):
        ll.load(model, tmp_path / "a.safetensors")
    assert_untouched(model, before)


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("base", ["qwen", "gpt2"])
def test_hooked_layer_equals_closed_form(request, base, case):
    """Each hooked target computes x W_effᵀ + b_eff with the variant's closed-form weights
    (on GPT-2's Conv1D, W_eff is in the nn.Linear layout, the transpose of what it stores)."""
    bench = request.getfixturevalue(base)
    model = bench.fresh()
    cfg = attach_case(bench, case, model)
    perturb(model)
    variant = REGISTRY[cfg.variant]
    g = torch.Generator().manual_seed(0)
    for name, layer in state_of(model).targets.items():
        x = torch.randn(5, dims(layer)[0], generator=g)
        with torch.no_grad():
            W_eff, b_eff = variant.at_target(name, cfg).effective_weight(layer, cfg)
            expected = torch.nn.functional.linear(x, W_eff.float(), None if b_eff is None else b_eff.float())
            assert rel_err(layer(x), expected) <= 1e-5, name


# exact-identity variants that attach without data and store nothing read from W (a norm or a
# factor of W rounds in a bf16 adapter): a bf16 adapter at init must give y0
EXACT_NO_DATA = [c for c in PRIMARY if variant(c).identity_at_init and not variant(c).identity_tol
                 and not variant(c).needs_dense_weight and not variant(c).calibration_needs(CASES[c](()))[1]]


@pytest.mark.parametrize("case", EXACT_NO_DATA)
def test_low_precision_adapter_never_rounds_y(qwen, case):
    """bf16 adapter tensors on an fp32 base: at init the output is the base output bit for bit,
    so y itself was not rounded through bf16 (SPEC A4.11)."""
    import dataclasses

    model = qwen.fresh()
    y0 = qwen.out(model)
    cfg = dataclasses.replace(CASES[case](qwen.targets), dtype=torch.bfloat16)
    ll.attach(model, cfg)
    assert all(p.dtype == torch.bfloat16 for p in trainables(model).values())
    y = qwen.out(model)
    assert y.dtype == torch.float32 and torch.equal(y, y0)
    # off init, the hooks add the change of those bf16 values computed in fp32 (the activation's
    # dtype): the same outputs, bit for bit, as fp32 adapter tensors holding the same values
    perturb(model)
    twin = qwen.fresh()
    ll.attach(twin, dataclasses.replace(cfg, dtype=torch.float32))
    with torch.no_grad():  # every adapter tensor, frozen buffers too (DeLoRA's column norms)
        ours, theirs = state_of(model), state_of(twin)
        for name, layer in ours.targets.items():
            for pname in ours.specs[name]:
                getattr(theirs.targets[name], pname).copy_(getattr(layer, pname).float())
    y = qwen.out(model)
    assert not torch.equal(y, y0) and torch.equal(y, qwen.out(twin))


def test_bf16_base_with_fp32_adapter(qwen):
    model = qwen.fresh().to(torch.bfloat16)
    y0 = qwen.out(model)
    ll.attach(model, CASES["dora"](qwen.targets))
    perturb(model)
    y = qwen.out(model)
    assert y.dtype == torch.bfloat16 and rel_err(y.float(), y0.float()) > 1e-3
    assert all(p.dtype == torch.float32 for p in trainables(model).values())
    # the change matches the same adapter on the fp32 copy of the rounded base, to bf16 precision
    ref = model.float()  # in place: the bf16 base weights exactly, and the fp32 adapter
    y_ref, y0_ref = qwen.out(ref), qwen.out(qwen.fresh().to(torch.bfloat16).float())
    assert rel_err((y.float() - y0.float()), (y_ref - y0_ref)) <= 0.05


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_steering_coefficient_zero_is_the_base_bit_for_bit(bench, case):
    """A trained adapter (every trainable perturbed) steered to 0 — `ll.scaled(model, 0)` for
    every variant, `coeff = 0` where the variant has a run-time coeff — gives the base model's
    outputs bit for bit (y + 0·Δy, and ELU(0·g) = 0 exactly), and the adapter's own output back
    after the context / a reconfigure to the trained coeff."""
    model = bench.fresh()
    y0 = bench.out(model)
    cfg = attach_case(bench, case, model)
    perturb(model)
    y1 = bench.out(model)
    assert not torch.equal(y1, y0)
    with ll.scaled(model, 0.0):
        assert torch.equal(bench.out(model), y0)
    assert torch.equal(bench.out(model), y1)
    if "coeff" in REGISTRY[cfg.variant].runtime_fields:
        ll.reconfigure(model, coeff=0.0)
        assert torch.equal(bench.out(model), y0)
        ll.reconfigure(model, coeff=cfg.coeff)
        assert torch.equal(bench.out(model), y1)
