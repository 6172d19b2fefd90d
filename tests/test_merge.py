"""merge, disabled, scaled: the same function as the hooks, for every variant.

The reference effective weight is probed from the variant's hook math (`delta` / `delta_input`)
on the identity basis in fp32 — independent of `effective_weight` and of merge — and merge must
match it: fp32 to 1e-5 relative, bf16 within one bf16 rounding of the fp32 value. The toy model
has biases (the tiny Qwen3 has none), so the bias-changing variants (ia3, road) write one.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll
from lora_lite.kinds import dims, is_transposed
from lora_lite.runtime import STATE_ATTR, state_of
from lora_lite.variant import REGISTRY

from cases import CASE_PARAMS, HOOK_KINDS
from conftest import Bench, assert_untouched, rel_err, snapshot
from test_variants import attach_case, perturb

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: threads only contend


class ToyBench(Bench):
    """Two biased linears (32 -> 64 -> 32): every variant's bias path."""

    def out(self, model, batch=None):
        with torch.no_grad():
            return model(self.batch if batch is None else batch)


def make_toy():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.bias.normal_(0, 0.5)
    g = torch.Generator().manual_seed(4)
    calibration = [torch.randn(3, 6, 32, generator=g) for _ in range(3)]
    return ToyBench("toy", model, torch.randn(4, 5, 32, generator=g), (), calibration)


@pytest.fixture(scope="module")
def toy():
    return make_toy()


@pytest.fixture(params=["qwen", pytest.param("qwen_bf16", marks=pytest.mark.slow),
                        pytest.param("toy", marks=pytest.mark.slow), "gpt2"])
def base(request):
    return request.getfixturevalue(request.param)


@torch.no_grad()
def probed(layer, variant, cfg):
    """(W_eff, b_eff) in fp32 from the hook math on x = 0 and x = e_i."""
    d_in = dims(layer)[0]
    X = torch.cat([torch.zeros(1, d_in), torch.eye(d_in)])
    W = stored_W(layer).float()
    b = None if layer.bias is None else layer.bias.float()
    if variant.delta_input is not None:
        Y = F.linear(X + variant.change(layer, cfg, X), W, b)
    else:
        Y0 = F.linear(X, W, b)
        Y = Y0 + variant.change(layer, cfg, X, Y0)
    return (Y[1:] - Y[0]).T, Y[0]


def stored_W(layer):
    """The layer's W in the nn.Linear layout (d_out, d_in), as stored (GPT-2's Conv1D holds Wᵀ)."""
    return layer.weight.T if is_transposed(layer) else layer.weight


def assert_one_rounding(merged: torch.Tensor, ref: torch.Tensor, what: str):
    """merged (low precision) is ref (fp32) rounded once: within half a spacing of ref's binade,
    plus the fp32 noise of the two computations."""
    _, e = torch.frexp(ref)  # |ref| in [2^(e-1), 2^e): spacing there is 2^(e-1)·eps
    half_spacing = torch.ldexp(torch.ones_like(ref), e - 1) * torch.finfo(merged.dtype).eps / 2
    err = (merged.float() - ref).abs()
    assert (err <= half_spacing * 1.01 + 1e-6 * ref.abs().max()).all(), f"{what}: max err {err.max():.3g}"
    assert (merged != ref.to(merged.dtype)).float().mean() < 0.01, f"{what}: not one rounding of ref"


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_merge_is_the_same_function(base, case):
    model = base.fresh()
    cfg = attach_case(base, case, model)
    perturb(model)
    state = state_of(model)
    refs = {n: probed(layer, state.variant.at_target(n, cfg), cfg) for n, layer in state.targets.items()}
    had_bias = {n: layer.bias is not None for n, layer in state.targets.items()}
    y_hooked = base.out(model)
    ll.merge(model)

    assert STATE_ATTR not in model.__dict__
    assert not [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert not [n for n, _ in model.named_buffers() if ".lora_" in n]
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert [n for n, p in model.named_parameters() if p.requires_grad] == \
        [n for n, p in base.model.named_parameters() if p.requires_grad]
    for name, (W_ref, b_ref) in refs.items():
        layer = model.get_submodule(name)
        assert (layer.bias is not None) == had_bias[name], "merge created or dropped a bias"
        if base.dtype == torch.float32:
            assert rel_err(stored_W(layer), W_ref) <= 1e-5, name
            if had_bias[name]:
                assert rel_err(layer.bias, b_ref) <= 1e-5, name
        else:
            assert_one_rounding(stored_W(layer), W_ref, name)
    if base.dtype == torch.float32:
        assert rel_err(base.out(model), y_hooked) <= 1e-5


@pytest.mark.parametrize("c", [0.5, -1.0])
def test_merge_bakes_in_the_current_strength(toy, c):
    for case in HOOK_KINDS:
        model = toy.fresh()
        attach_case(toy, case, model)
        perturb(model)
        with ll.scaled(model, c):
            y = toy.out(model)
            ll.merge(model)
        assert STATE_ATTR not in model.__dict__
        assert rel_err(toy.out(model), y) <= 1e-5, case


def test_merge_inside_disabled_keeps_the_base(toy):
    model = toy.fresh()
    attach_case(toy, "road_1", model)
    perturb(model)
    with ll.disabled(model):
        ll.merge(model)
    for (n, a), b in zip(model.state_dict().items(), toy.model.state_dict().values()):
        assert torch.equal(a, b), n


def test_stacking_is_merge_then_attach(qwen, tmp_path):
    model = qwen.fresh()
    attach_case(qwen, "lora", model)
    perturb(model)
    ll.merge(model)
    merged = copy.deepcopy(model)
    y_merged = qwen.out(model)
    attach_case(qwen, "pissa", model)  # a second adapter on top of the first, merged one
    assert torch.equal(qwen.out(model), y_merged)
    perturb(model, seed=5)
    y2 = qwen.out(model)
    assert rel_err(y2, y_merged) > 1e-3
    ll.save(model, tmp_path / "second.safetensors")
    ll.load(merged, tmp_path / "second.safetensors")
    assert torch.equal(qwen.out(merged), y2)
    ll.merge(model)
    assert rel_err(qwen.out(model), y2) <= 1e-5


class QuantLinear(nn.Module):
    """A linear-like int8 layer: hook-only variants attach, merge cannot write it."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = lin.in_features, lin.out_features
        self.scale = lin.weight.abs().max() / 127
        self.register_buffer("weight", (lin.weight / self.scale).round().to(torch.int8))

    def forward(self, x):
        return F.linear(x, self.weight.float() * self.scale)


def test_merge_refuses_quantised_layers_before_touching_anything(toy):
    model = toy.fresh()
    model[2] = QuantLinear(model[2])
    ll.attach(model, ll.LoRAConfig(r=2))
    perturb(model)
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"^2: merge writes a dense weight.*QuantLinear.*int8"):
        ll.merge(model)
    assert_untouched(model, before)
    assert STATE_ATTR in model.__dict__


# ---- disabled / scaled ---------------------------------------------------------------------------

def check_strengths(model):
    """At every target: disabled = base layer, scaled(c) = y0 + c·(y1 − y0); c = 0 is the base bit
    for bit and c = 1 the adapted output."""
    state = state_of(model)
    g = torch.Generator().manual_seed(7)
    moved = 0
    for name, layer in state.targets.items():
        x = torch.randn(2, 3, dims(layer)[0], generator=g).to(layer.weight.dtype)
        with torch.no_grad():
            y_plain = type(layer).forward(layer, x)  # the layer's own math, no hooks
            y1 = layer(x)
            with ll.disabled(model):
                y0 = layer(x)
            assert torch.equal(y0, y_plain), name
            with ll.scaled(model, 0.0):
                assert torch.equal(layer(x), y0), name
            with ll.scaled(model, 1.0):
                assert torch.equal(layer(x), y1), name
            moved += rel_err(y1, y0) > 1e-4
            for c in (0.5, -1.0, 2.5):
                with ll.scaled(model, c):
                    yc = layer(x)
                assert rel_err(yc, y0 + c * (y1 - y0)) <= 1e-5, (name, c)
    assert moved, "the adapter is a no-op everywhere: the check is vacuous"


@pytest.mark.parametrize("case", CASE_PARAMS)
@pytest.mark.parametrize("bench", ["qwen", "gpt2"])
def test_disabled_and_scaled_for_every_variant(request, bench, case, tmp_path):
    qwen = request.getfixturevalue(bench)
    model = qwen.fresh()
    cfg = attach_case(qwen, case, model)
    perturb(model)
    y1 = qwen.out(model)
    with ll.disabled(model):
        assert torch.equal(qwen.out(model), qwen.out(qwen.model))
    with ll.scaled(model, 0):
        assert torch.equal(qwen.out(model), qwen.out(qwen.model))
    assert torch.equal(qwen.out(model), y1)
    check_strengths(model)

    if "coeff" in REGISTRY[cfg.variant].runtime_fields:  # the AntiPaSTO family's own steering knob
        ll.reconfigure(model, coeff=0.6)
        check_strengths(model)

    ll.save(model, tmp_path / "a.safetensors")
    loaded = qwen.fresh()
    ll.load(loaded, tmp_path / "a.safetensors")
    check_strengths(loaded)


def test_nesting_composes_and_exceptions_restore(qwen):
    model = qwen.fresh()
    attach_case(qwen, "dora", model)
    perturb(model)
    state = state_of(model)
    y_base, y1 = qwen.out(qwen.model), qwen.out(model)
    with ll.scaled(model, 0.6):
        y06 = qwen.out(model)
    with ll.scaled(model, -0.9):
        y_m = qwen.out(model)

    with ll.scaled(model, 2.0):
        with ll.scaled(model, 0.3):
            assert state.scale == 2.0 * 0.3
            assert torch.equal(qwen.out(model), y06)
        with ll.scaled(model, -0.45):
            assert torch.equal(qwen.out(model), y_m)
        with ll.disabled(model):
            assert torch.equal(qwen.out(model), y_base)
            with ll.scaled(model, 3.0):
                assert torch.equal(qwen.out(model), y_base)
        assert state.enabled and state.scale == 2.0
    with ll.disabled(model):
        with ll.disabled(model):
            pass
        assert not state.enabled
    assert torch.equal(qwen.out(model), y1)

    with pytest.raises(ZeroDivisionError):
        with ll.disabled(model):
            with ll.scaled(model, 5.0):
                1 / 0
    assert state.enabled and state.scale == 1.0
    assert torch.equal(qwen.out(model), y1)

    for bad in (float("nan"), float("inf"), "2", True, None):
        with pytest.raises(ValueError, match="finite number"):
            with ll.scaled(model, bad):
                pass
    assert state.scale == 1.0


def test_contexts_need_an_adapter(qwen):
    with pytest.raises(RuntimeError, match="no lora-lite adapter"):
        with ll.disabled(qwen.fresh()):
            pass


def test_toggling_under_torch_compile(toy):
    """torch 2.13: the hooks' `enabled` / `scale` reads are guarded; one graph for (enabled,
    scale == 1), one for disabled, one for any other scale (a float graph input, since
    torch._dynamo.config.specialize_float is False). After those three, toggling never compiles."""
    model = toy.fresh()
    attach_case(toy, "lora", model)
    perturb(model)
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    x = toy.batch
    settings = [(True, 1.0), (False, 1.0), (True, 0.5), (True, -1.0), (True, 1.0), (False, 1.0),
                (True, 3.0), (True, 0.0)]
    counts = []
    with torch.no_grad():
        for enabled, c in settings * 2:
            with ll.scaled(model, c):
                if enabled:
                    y, y_eager = compiled(x), model(x)
                else:
                    with ll.disabled(model):
                        y, y_eager = compiled(x), model(x)
            assert torch.equal(y, y_eager), (enabled, c)
            counts.append(len(frames))
    torch._dynamo.reset()
    assert counts[:3] == [1, 2, 3]
    assert counts[-1] == 3, counts
