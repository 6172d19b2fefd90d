"""Coefficient tensors: `ll.scaled(model, c)` and the gain family's `coeff` with one value per
example, (batch,), or per token, (batch, seq).

Every case of every registered variant (tests/cases.py) on the tiny Qwen3 (nn.Linear), the tiny
GPT-2 (Conv1D) and the Qwen3 with a bf16 base; the embedding and fused-expert kinds with the
variants that adapt them. The reference is independent of the tensor path: each example run
alone, or the same batch run with a float coefficient, and the pristine base model.

* A row of a tensor-scaled batch is bit for bit the row its own float gives, and the example
  run alone with that float (these tiny models are batch-invariant on the CPU, checked below).
  The hooks scale the change with one product and then add it, for a float and for a tensor
  alike (runtime.times), so the arithmetic is the same. On the bf16 base the coefficients are
  exact in bf16 (0, ±0.5, −1, 2), as the tensor is used in the activation's dtype.
* Rows with c = 0 are the base model's rows bit for bit.
* The gain family's `coeff` enters an exponential, ELU(coeff·g): the float path evaluates it on
  the (r,) gains, the tensor path on (batch, …, r), and the CPU's vectorised and scalar exp
  differ in the last bit for some r (AVX2 kernels handle 16-wide blocks and a scalar tail),
  so those rows agree to 1e-6 of the output's size (a last-bit difference in a gain, carried
  through two blocks: a few float32 steps), not to the bit; rows with coeff = 0 stay exact.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

import lora_lite as ll
from lora_lite.kinds import dims
from lora_lite.runtime import state_of
from lora_lite.variant import REGISTRY

from cases import CASE_PARAMS, CASES
from conftest import assert_untouched, rel_err, snapshot
from test_variants import attach_case, perturb

pytestmark = pytest.mark.usefixtures("one_thread")

C = [0.5, -1.0, 0.0, 2.0]  # exact in bf16; one row at 0
EXPERTS = r"mlp\.experts\.(gate_up_proj|down_proj)$"  # the fused parameters of the tiny Qwen3-MoE


@pytest.fixture(params=["qwen", "gpt2", pytest.param("qwen_bf16", marks=pytest.mark.slow)])
def bench(request):
    """nn.Linear targets (fp32 and a bf16 base) and GPT-2's Conv1D targets."""
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["qwen", pytest.param("gpt2", marks=pytest.mark.slow),
                        pytest.param("qwen_bf16", marks=pytest.mark.slow)])
def lm(request):
    """The per-token suites: the fp32 tiny Qwen3 in the fast tier (the per-example suite runs
    GPT-2's Conv1D there)."""
    return request.getfixturevalue(request.param)


def four_rows(bench) -> dict:
    """The bench's two rows (the second left-padded) and two more, unpadded."""
    g = torch.Generator().manual_seed(5)
    ids = torch.cat([bench.batch["input_ids"], torch.randint(0, 256, (2, 10), generator=g)])
    mask = torch.cat([bench.batch["attention_mask"], torch.ones(2, 10, dtype=torch.long)])
    return {"input_ids": ids, "attention_mask": mask}


def row(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


def attached(bench, case):
    model = bench.fresh()
    torch.manual_seed(0)  # random inits (kaiming A, ...) the same whatever ran before
    attach_case(bench, case, model)
    perturb(model, scale=0.1)  # every trainable off its init: a change at every target
    return model


def coeff_cases():
    return [p for p in CASE_PARAMS if "coeff" in REGISTRY[CASES[p.values[0]](()).variant].runtime_fields]


def test_the_models_are_batch_invariant(bench):
    """The reference 'each example alone' is exact only if the base model is: checked here."""
    batch = four_rows(bench)
    y = bench.out(bench.model, batch)
    for i in range(len(C)):
        assert torch.equal(y[i], bench.out(bench.model, row(batch, i))[0]), i


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_per_example_rows_are_their_float_runs(bench, case):
    model = attached(bench, case)
    batch = four_rows(bench)
    with ll.scaled(model, torch.tensor(C)):
        y = bench.out(model, batch)
    assert y.dtype == bench.dtype
    for i, c in enumerate(C):
        with ll.scaled(model, c):
            together, alone = bench.out(model, batch)[i], bench.out(model, row(batch, i))[0]
        assert torch.equal(y[i], together), (i, c)
        # alone: bit for bit where the float path itself is batch-size invariant (a variant's
        # batched matmuls, e.g. antipasto_rot's einsum, may take another kernel for one row)
        assert torch.equal(y[i], alone) or not torch.equal(together, alone), (i, c)
        assert rel_err(y[i], alone) <= 1e-6, (i, c)
    assert torch.equal(y[C.index(0.0)], bench.out(bench.model, batch)[C.index(0.0)])
    assert not torch.equal(y[0], y[1])  # the coefficients do act


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_per_token_coefficients(lm, case):
    """A (batch, seq) c constant along each row is the (batch,) c; steering only a prefix of a
    causal LM leaves the prefix's outputs those of the full adapter, the rest differ; a token
    at c = 0 everywhere is the base model."""
    model = attached(lm, case)
    batch = four_rows(lm)
    seq = batch["input_ids"].shape[1]
    with ll.scaled(model, torch.tensor(C)):
        y_rows = lm.out(model, batch)
    with ll.scaled(model, torch.tensor(C)[:, None].expand(-1, seq)):
        assert torch.equal(lm.out(model, batch), y_rows)
    prompt = torch.zeros(len(C), seq)
    prompt[:, :6] = 1.0
    with ll.scaled(model, prompt):
        y_prompt = lm.out(model, batch)
    y_full, y_base = lm.out(model, batch), lm.out(lm.model, batch)
    assert torch.equal(y_prompt[:, :6], y_full[:, :6])
    assert not torch.equal(y_prompt[:, 6:], y_full[:, 6:])
    assert not torch.equal(y_prompt[:, 6:], y_base[:, 6:])  # the later tokens attend to a steered prompt
    with ll.scaled(model, torch.zeros(len(C), seq)):
        assert torch.equal(lm.out(model, batch), y_base)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_per_token_rows_at_one_layer(lm, case):
    """At every target, each (example, token) of a (batch, seq)-scaled activation is the one its
    own float gives: c varies along the sequence too."""
    model = attached(lm, case)
    state = state_of(model)
    g = torch.Generator().manual_seed(0)
    c = torch.tensor([-1.0, 0.5, 2.0, 0.0, 1.0])[torch.randint(0, 5, (2, 7), generator=g)]
    for name, layer in state.targets.items():
        inp = torch.randn(2, 7, dims(layer)[0], generator=g).to(lm.dtype)
        with torch.no_grad(), ll.scaled(model, c):
            y = layer(inp)
        for value in c.unique().tolist():
            with torch.no_grad(), ll.scaled(model, value):
                want = layer(inp)
            at = c == value
            assert torch.equal(y[at], want[at]), (name, value)


@pytest.mark.parametrize("case", coeff_cases())
def test_coeff_tensor_rows_are_their_float_runs(bench, case):
    model = attached(bench, case)
    batch = four_rows(bench)
    cs = [abs(c) for c in C] if getattr(state_of(model).cfg, "suppress_only", False) else C  # needs coeff >= 0
    ll.reconfigure(model, coeff=torch.tensor(cs))
    y = bench.out(model, batch)
    assert state_of(model).per_row  # the hooks match it against each activation
    base = bench.out(bench.model, batch)
    for i, c in enumerate(cs):
        ll.reconfigure(model, coeff=c)
        alone, together = bench.out(model, row(batch, i))[0], bench.out(model, batch)[i]
        tol = 1e-6 * base[i].abs().max()  # a few float32 steps of the output
        assert c == 0.0 or (together - base[i]).abs().max() >= 100 * tol  # a wrong c would show
        assert (y[i] - together).abs().max() <= tol, (i, c)
        assert (y[i] - alone).abs().max() <= tol, (i, c)
    assert torch.equal(y[C.index(0.0)], base[C.index(0.0)])
    # through both knobs at once: the strength multiplies the change the coeff steers
    ll.reconfigure(model, coeff=torch.tensor(cs)[:, None].expand(-1, batch["input_ids"].shape[1]))
    with ll.scaled(model, torch.tensor([1.0, 0.0, 1.0, 1.0])):
        y2 = bench.out(model, batch)
    assert torch.equal(y2[1], base[1]) and torch.equal(y2[2], base[2])
    assert rel_err(y2[[0, 3]], y[[0, 3]]) <= 1e-6
    ll.reconfigure(model, coeff=1.0)


def first_case(kind: str) -> list[str]:
    """Each variant's first example, for the variants that adapt layer kind `kind`."""
    return [next(iter(v.examples)) for v in REGISTRY.values() if kind in v.kinds]


@pytest.mark.parametrize("case", first_case("embedding"))
def test_embedding_rows(qwen, case):
    """Token ids in, (batch, seq, d) out: a (batch,) and a (batch, seq) c act on the lookup."""
    model = qwen.fresh()
    ll.attach(model, CASES[case]((r"embed_tokens$",)))
    perturb(model, scale=0.1)
    batch = four_rows(qwen)
    with ll.scaled(model, torch.tensor(C)):
        y = qwen.out(model, batch)
    for i, c in enumerate(C):
        with ll.scaled(model, c):
            assert torch.equal(y[i], qwen.out(model, row(batch, i))[0]), (case, c)
    assert torch.equal(y[C.index(0.0)], qwen.out(qwen.model, batch)[C.index(0.0)])
    with ll.scaled(model, torch.tensor(C)[:, None].expand(-1, 10)):
        assert torch.equal(qwen.out(model, batch), y)
    with ll.scaled(model, torch.ones(4, 9)), pytest.raises(ValueError, match=r"embed_tokens.*\(4, 9\).*\(4, 10, 64\)"):
        qwen.out(model, batch)


@pytest.mark.parametrize("case", first_case("fused"))
def test_fused_experts_take_one_value(qwen_moe, case):
    """Experts run on W + c·ΔW, one weight for the batch: a tensor of equal entries is that
    float, bit for bit; different entries are refused before anything runs."""
    model = qwen_moe.fresh()
    ll.attach(model, dataclasses.replace(CASES[case](()), target_parameters=(EXPERTS,)))
    perturb(model, scale=0.1)
    with ll.scaled(model, 0.5):
        y_half = qwen_moe.out(model)
    assert not torch.equal(y_half, qwen_moe.out(model))
    with ll.scaled(model, torch.full((2,), 0.5)):
        assert torch.equal(qwen_moe.out(model), y_half)
    with ll.scaled(model, torch.full((2, 10), 0.5)):
        assert torch.equal(qwen_moe.out(model), y_half)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"fused parameter.*one weight for every row"):
        with ll.scaled(model, torch.tensor([0.5, 1.0])):
            pass
    assert_untouched(model, before)
    assert state_of(model).scale == 1.0


def test_a_deepcopy_scales_on_its_own(qwen):
    model = attached(qwen, "lora")
    twin = copy.deepcopy(model)
    batch = four_rows(qwen)
    y1 = qwen.out(model, batch)
    with ll.scaled(twin, torch.tensor(C)):
        y_twin = qwen.out(twin, batch)
        assert torch.equal(qwen.out(model, batch), y1)  # the original is not scaled
    with ll.scaled(model, torch.tensor(C)):
        assert torch.equal(qwen.out(model, batch), y_twin)
    ll.attach(anti := qwen.fresh(), CASES["antipasto"](qwen.targets), calibration_data=None)
    perturb(anti, scale=0.1)
    copy_ = copy.deepcopy(anti)
    ll.reconfigure(copy_, coeff=torch.tensor(C))
    assert state_of(anti).cfg.coeff == 1.0 and not state_of(anti).per_row
    ll.reconfigure(anti, coeff=torch.tensor(C))
    assert torch.equal(qwen.out(anti, batch), qwen.out(copy_, batch))


def test_nesting_multiplies_row_by_row(qwen):
    model = attached(qwen, "lora")
    batch = four_rows(qwen)
    per_token = torch.rand(4, 10, generator=torch.Generator().manual_seed(0))
    with ll.scaled(model, torch.tensor(C)[:, None] * per_token):
        want = qwen.out(model, batch)
    with ll.scaled(model, torch.tensor(C)), ll.scaled(model, per_token):
        assert torch.equal(qwen.out(model, batch), want)
    with ll.scaled(model, 2.0), ll.scaled(model, torch.tensor(C)):
        y = qwen.out(model, batch)
    with ll.scaled(model, torch.tensor(C) * 2.0):
        assert torch.equal(qwen.out(model, batch), y)
    with ll.scaled(model, torch.tensor(C)):
        with pytest.raises(ValueError, match=r"nested coefficient tensors of shapes \(4,\).*\(3, 10\)"):
            with ll.scaled(model, torch.ones(3, 10)):
                pass
        assert torch.equal(state_of(model).scale, torch.tensor(C))
    assert state_of(model).scale == 1.0 and state_of(model).per_row == ()


BAD = {
    "bool": (True, "finite number"),
    "nan": (float("nan"), "finite number"),
    "a list": ([1.0, 2.0], "finite number"),
    "a bool tensor": (torch.tensor([True, False]), "dtype torch.bool"),
    "an int tensor": (torch.tensor([1, 2]), "dtype torch.int64"),
    "a 0-d tensor": (torch.tensor(1.0), r"shape \(\).*pass a float"),
    "a 3-d tensor": (torch.ones(2, 3, 4), r"shape \(2, 3, 4\)"),
    "inf": (torch.tensor([1.0, float("inf")]), "NaN or Inf"),
    "nan entry": (torch.tensor([float("nan"), 1.0]), "NaN or Inf"),
    "another device": (torch.ones(2, device="meta"), "is on meta, the adapter on cpu"),
}


@pytest.mark.parametrize("what", BAD)
def test_bad_coefficients_are_refused_before_anything_runs(qwen, what):
    model = attached(qwen, "antipasto")
    value, message = BAD[what]
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        with ll.scaled(model, value):
            pass
    with pytest.raises(ValueError, match=message):
        ll.reconfigure(model, coeff=value)
    assert_untouched(model, before)
    state = state_of(model)
    assert state.scale == 1.0 and state.cfg.coeff == 1.0 and state.per_row == ()


def test_a_mismatched_activation_names_the_layer_and_both_shapes(qwen):
    model = attached(qwen, "lora")
    batch = four_rows(qwen)
    before = snapshot(model)
    for c, shape in ((torch.ones(4, 9), r"\(4, 9\)"), (torch.ones(3), r"\(3,\)")):
        with ll.scaled(model, c), pytest.raises(
                ValueError, match=rf"^model\.layers\.0\.self_attn\.q_proj: .*{shape}.*\(4, 10, 64\)"):
            qwen.out(model, batch)
    assert_untouched(model, before)
    ll.reconfigure(anti := attached(qwen, "antipasto"), coeff=torch.ones(4, 9))
    with pytest.raises(ValueError, match=r"q_proj: a coefficient tensor of shape \(4, 9\)"):
        qwen.out(anti, batch)


def test_merge_save_export_refuse_a_tensor(qwen, tmp_path):
    model = attached(qwen, "antipasto")
    before = snapshot(model)
    with ll.scaled(model, torch.tensor(C)):
        with pytest.raises(RuntimeError, match=r"merge: ll.scaled is a coefficient tensor of shape \(4,\)"):
            ll.merge(model)
        with pytest.raises(RuntimeError, match="inside ll.disabled / ll.scaled"):
            ll.export_peft(model, tmp_path / "peft")
        assert "scale <coefficient tensor (4,)>" in str(ll.describe(model))
    ll.reconfigure(model, coeff=torch.tensor(C))
    with pytest.raises(RuntimeError, match=r"merge: coeff is a coefficient tensor.*reconfigure\(model, coeff=1.0\)"):
        ll.merge(model)
    for save in (lambda: ll.save(model, tmp_path / "a.safetensors"), lambda: ll.export_peft(model, tmp_path / "p")):
        with pytest.raises(ValueError, match=r"coeff holds a coefficient tensor of shape \(4,\)"):
            save()
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="no single weight"):
        state_of(model).variant.effective_weight(next(iter(state_of(model).targets.values())), state_of(model).cfg)
    assert "coeff=<coefficient tensor (4,)>" in str(ll.describe(model))
    ll.reconfigure(model, coeff=1.0)
    assert_untouched(model, before)
    ll.save(model, tmp_path / "a.safetensors")


def test_suppress_only_checks_every_entry(qwen):
    model = attached(qwen, "antipasto_suppress")
    with pytest.raises(ValueError, match="suppress_only"):
        ll.reconfigure(model, coeff=torch.tensor([0.5, -0.1]))
    ll.reconfigure(model, coeff=torch.tensor([0.5, 0.0]))


def one_per_hook_form() -> list[str]:
    """The first declared case of the first variant of each hook form: output or input hook,
    with or without a gate, with or without a run-time coeff."""
    forms = {}
    for v in REGISTRY.values():
        form = (v.delta_input is not None, v.gate is not None, "coeff" in v.runtime_fields)
        forms.setdefault(form, next(iter(v.examples)))
    return list(forms.values())


@pytest.mark.slow
@pytest.mark.parametrize("case", one_per_hook_form())
def test_compile_takes_new_values_without_recompiling(qwen, case):
    """fullgraph=True raises at a graph break; the counter counts compiled frames."""
    torch._dynamo.reset()
    model = attached(qwen, case)
    batch = four_rows(qwen)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    values = [torch.tensor(C), torch.randn(4, generator=g), torch.randn(4, generator=g)]
    for c in values:
        with ll.scaled(model, c):
            y = qwen.out(compiled, batch)
            assert rel_err(y, qwen.out(model, batch)) <= 1e-6
    assert counter.frame_count == 1
    if "coeff" in REGISTRY[state_of(model).cfg.variant].runtime_fields:
        for c in values:
            ll.reconfigure(model, coeff=c)
            qwen.out(compiled, batch)
        assert counter.frame_count == 2  # one more graph: coeff went from a float to a tensor
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("case,knob", [(p.values[0], "scaled") for p in CASE_PARAMS]
                         + [(p.values[0], "coeff") for p in coeff_cases()])
def test_training_gradients_are_the_sum_of_the_rows(qwen, case, knob):
    """One backward through a batch with per-example c (both signs in one forward, as a
    bidirectional steering loss has) gives the sum of the rows' gradients, each row run alone
    with its float c."""
    model = attached(qwen, case).train()
    batch = four_rows(qwen)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def grads(c, rows):
        for p in params.values():
            p.grad = None
        if knob == "coeff":
            ll.reconfigure(model, coeff=c)
            out = model(**rows).logits
        else:
            with ll.scaled(model, c):
                out = model(**rows).logits
        (out * rows["attention_mask"][..., None]).square().sum().backward()
        if knob == "coeff":
            ll.reconfigure(model, coeff=1.0)
        return {n: p.grad.clone() for n, p in params.items()}

    cs = [abs(c) for c in C] if getattr(state_of(model).cfg, "suppress_only", False) else C  # needs coeff >= 0
    together = grads(torch.tensor(cs), batch)
    alone = [grads(c, row(batch, i)) for i, c in enumerate(cs)]
    assert any(g.abs().max() > 0 for g in together.values())
    for n, g in together.items():
        # a sum over the batch in another order: fp32 rounding of reductions over up to
        # 4 x 10 x 128 terms (a scalar such as DeLoRA's λ sums all of them); zero by design
        # where a clamp holds (antipasto_ablate's α)
        want = sum(a[n] for a in alone)
        assert (rel_err(g, want) <= 1e-4) if want.abs().max() > 0 else not g.abs().max(), n
