"""Every variant's hooks compile with fullgraph=True (a graph break raises) on a small MLP, cheap
enough to run for all cases by default; tests/test_compile.py compiles the whole decoder and
tests/test_grad_checkpointing.py covers gradient checkpointing (SPEC A4.10)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.runtime import state_of
from lora_lite.variant import REGISTRY

from cases import CASE_PARAMS, CASES, NO_DATA
from conftest import rel_err
from test_variants import perturb


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_hooks_compile_without_graph_breaks(case):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    cfg = CASES[case](())
    data = None if case in NO_DATA or not REGISTRY[cfg.variant].calibration_needs(cfg)[0] else [torch.randn(16, 32)]
    ll.attach(net, cfg, calibration_data=data, progress=False)
    perturb(net)
    x = torch.randn(4, 32)
    y = net(x)
    torch._dynamo.reset()
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # a graph break raises
    y_c = compiled(x)
    assert rel_err(y_c.detach(), y.detach()) <= 1e-6
    y_c.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


# ---- gate variants: the one-product hook is the declared change ---------------------------------

GATED = [name for name, v in REGISTRY.items() if v.gate is not None]


@pytest.mark.parametrize("name", GATED)
@pytest.mark.parametrize("c", [1.0, 0.5, -1.0])
def test_a_gate_hook_adds_exactly_the_variants_declared_change(name, c):
    """A variant with `gate` also declares its additive change (delta / delta_input), which
    generic code (Variant.change) and merge rely on; the hook's one product must be that change."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5))
    ll.attach(model, ll.AdapterConfig.from_dict({"variant": name, "target_names": ["0"]}))
    layer, variant = model[0], REGISTRY[name]
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.startswith("lora_"):
                p.add_(0.3 * torch.randn_like(p))
        x = torch.randn(4, 6)
        with ll.scaled(model, c):
            y = model(x)
        with ll.disabled(model):
            y0 = model(x)
            cfg = state_of(model).cfg
            if variant.delta_input is not None:
                ref = model(x + c * variant.change(layer, cfg, x))
            else:
                ref = y0 + c * variant.change(layer, cfg, x, y0)
    assert GATED and (y - ref).abs().max() <= 1e-6 * ref.abs().max()


@pytest.mark.parametrize("fn, words", [
    (ll.attach, ("requires_grad=False", "forward hook", "lora_*", "calibration_data", "r unmasked tokens",
                 "RuntimeError", "ValueError", "TypeError", "Example", "ll.detach")),
    (ll.load, ("ll.read", "requires_grad=True", "No calibration data", "RuntimeError", "CheckpointError",
               "UserWarning", "Example")),
])
def test_help_says_what_it_does_raises_and_shows(fn, words):
    """help(ll.attach) / help(ll.load): what they do to the model, what they raise, an example."""
    missing = [w for w in words if w not in fn.__doc__]
    assert not missing, missing
