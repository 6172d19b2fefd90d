"""torch.compile of an attached model: no graph breaks, and the same outputs and gradients.

For every case in tests/cases.py the attached tiny Qwen3 decoder (and GPT-2, whose Conv1D
layers store W transposed) is compiled whole with
`fullgraph=True` (dynamo raises, naming the reason, at the first graph break) and the
`aot_eager` backend (dynamo + AOTAutograd forward/backward graphs, without inductor's C++
codegen, which is too slow for 23 cases on a 2-core box); logits and adapter gradients must
equal eager's. A representative subset (one case per kind of hook math) runs in the full tier,
the rest with `--run-optin`. One test runs `torch._dynamo.explain`, one (opt-in) the inductor
backend.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from cases import CASES, HOOK_KINDS
from conftest import make_gpt2, make_qwen, rel_err
from test_variants import attach_case

# One case per hook kind (cases.HOOK_KINDS) in the full tier, every case with --run-optin.
CASE_PARAMS = [
    pytest.param(c, marks=pytest.mark.slow if c in HOOK_KINDS else pytest.mark.optin) for c in CASES
]


@pytest.fixture(scope="module", params=["qwen", "gpt2"])
def bench(request):
    """The tiny Qwen3 (nn.Linear targets) and GPT-2 (transformers Conv1D targets)."""
    return make_qwen() if request.param == "qwen" else make_gpt2()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # every case compiles the same forward code anew
    yield
    torch._dynamo.reset()


def attached(bench, case):
    model = bench.fresh().train()
    torch.manual_seed(0)
    attach_case(bench, case, model)  # with calibration data where the case takes it
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move off init so every trainable gets a gradient
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def step(fn, model, batch):
    """Logits and adapter gradients of one LM-loss forward/backward through fn."""
    for p in model.parameters():
        p.grad = None
    out = fn(**batch, labels=batch["input_ids"], use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


def assert_compiled_matches_eager(model, batch, backend, tol):
    y_eager, g_eager = step(model, model, batch)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    y_comp, g_comp = step(compiled, model, batch)
    assert g_comp.keys() == g_eager.keys()
    assert any(g.abs().max() > 0 for g in g_eager.values())
    # per tensor, relative to its largest entry; a tensor whose gradient is zero by design
    # (suppress_only's clamped gains, an ablation scalar at 0) must stay exactly zero
    errors = {name: float((g_comp[name] - g).abs().max() / g.abs().max().clamp_min(1e-30))
              for name, g in g_eager.items()}
    print(f"{backend}: logits {rel_err(y_comp, y_eager):.1e}, grads {max(errors.values()):.1e}")
    assert rel_err(y_comp, y_eager) <= tol
    assert max(errors.values()) <= tol, max(errors, key=errors.get)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_compiles_without_graph_breaks_and_matches_eager(bench, case):
    assert_compiled_matches_eager(attached(bench, case), bench.batch, "aot_eager", 1e-5)


def test_dynamo_explain_reports_no_graph_breaks(bench):
    model = attached(bench, "lora")
    report = torch._dynamo.explain(model)(**bench.batch, use_cache=False)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


@pytest.mark.optin  # inductor's C++ codegen of the forward and backward: ~100 s on 2 cores
def test_inductor_matches_eager(bench):
    assert_compiled_matches_eager(attached(bench, "lora"), bench.batch, "inductor", 1e-5)
