"""Every variant on a quantized base (issue #9): bitsandbytes Linear4bit (nf4) and Linear8bitLt,
torchao Int8WeightOnlyConfig, on the tiny Qwen3 with every linear but lm_head quantized, on CPU.

Hook-only variants run on the quantized layer as is; variants that read W get it from
`quant.dense_weight` (dequantized, never written back). For each backend and case: identity at
init relative to the *quantized* base's output, finite nonzero adapter gradients, save -> load
on a fresh quantized copy reproduces the outputs, detach gives the quantized base back bit for
bit, and the quantized storage (packed weights, scales, quant state) never changes. A backend
whose package is not installed is skipped with the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.quant import dense_weight, is_quantized, weight_storage
from lora_lite.variant import REGISTRY

from cases import CASE_PARAMS, IDENTITY_TOL
from conftest import Bench, rel_err
from test_variants import attach_case, neutralize, perturb, trainables

# one torch thread: the tiny SVDs and matmuls here run ~10x slower with two threads on a busy
# 2-core box (OpenMP synchronisation), and the results do not depend on it
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # bitsandbytes / torchao bases

BACKENDS = ("bnb_4bit", "bnb_int8", "torchao")
QUANT_ERROR = {"bnb_4bit": 0.16, "bnb_int8": 0.6 / 127, "torchao": 0.51 / 127}  # max |ΔW| / block absmax


def _swap_linears(model: nn.Module, make) -> nn.Module:
    """Replace every nn.Linear but lm_head by make(linear), loaded from its weights."""
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if type(child) is nn.Linear and cname != "lm_head":
                q = make(child)
                q.load_state_dict(child.state_dict())
                setattr(parent, cname, q.to("cpu"))  # bitsandbytes quantizes on .to(device)
    return model


def quantize(model: nn.Module, backend: str) -> nn.Module:
    if backend == "bnb_4bit":
        bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (extra 'quant')")
        return _swap_linears(model, lambda l: bnb.nn.Linear4bit(
            l.in_features, l.out_features, bias=l.bias is not None, quant_type="nf4",
            compute_dtype=torch.float32))
    if backend == "bnb_int8":
        bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (extra 'quant')")
        return _swap_linears(model, lambda l: bnb.nn.Linear8bitLt(
            l.in_features, l.out_features, bias=l.bias is not None, has_fp16_weights=False))
    pytest.importorskip("torchao", reason="torchao is not installed (extra 'quant')")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(model, Int8WeightOnlyConfig(),
              filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and not fqn.endswith("lm_head"))
    return model


_BENCHES: dict[str, Bench] = {}


@pytest.fixture(params=BACKENDS)
def qbench(request, qwen):
    """The tiny Qwen3, quantized once per backend (tests get deep copies via `fresh`)."""
    backend = request.param
    if backend not in _BENCHES:
        # Train mode (the tiny Qwen3 has no dropout, so outputs equal eval mode's): on a CPU with
        # AVX512-BF16, Linear4bit's first eval-mode forward repacks its weight for a bf16
        # inference kernel without a backward (test_bnb_4bit_cpu_inference_layout covers it).
        model = quantize(copy.deepcopy(qwen.model), backend).train()
        qwen.out(model)  # Linear8bitLt's first forward moves its int8 codes into layer.state
        _BENCHES[backend] = Bench("qwen", model, qwen.batch, qwen.targets, qwen.calibration)
    return _BENCHES[backend]


def storage(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stored base tensor as a plain tensor: packed weights, scales, quant-state pieces (a
    torchao weight contributes its inner tensors). Read from the modules, not `state_dict()`:
    bitsandbytes' Linear4bit unpacks its CPU inference layout in place when saving."""
    out = {}
    for name, module in model.named_modules():
        found = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        w = found.get("weight")
        qs = getattr(w, "quant_state", None)
        if qs is not None:  # bitsandbytes 4-bit: the block scales (nested: their own scales)
            found |= {"absmax": qs.absmax, "code": qs.code}
            if qs.nested:
                found |= {"absmax2": qs.state2.absmax, "offset": qs.offset}
        state = getattr(module, "state", None)
        for attr in ("CB", "SCB"):  # bitsandbytes int8: codes and row scales after a forward
            if getattr(state, attr, None) is not None:
                found[f"state.{attr}"] = getattr(state, attr)
        for key, t in found.items():
            if ".lora_" in f".{key}":
                continue
            inner = getattr(t, "tensor_data_names", None)
            for n, part in ((f":{n}", getattr(t, n)) for n in inner) if inner else (("", t),):
                out[f"{name}.{key}{n}"] = part.detach().as_subclass(torch.Tensor).clone()
    return out


def assert_same_storage(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"{k} changed"


def test_every_linear_is_quantized(qbench):
    kinds = {weight_storage(m) for n, m in qbench.model.named_modules() if n.endswith("_proj")}
    assert kinds == {next(iter(kinds))} and is_quantized(qbench.model.model.layers[0].mlp.down_proj)


def test_dense_weight_is_what_the_layer_computes_with(qbench, qwen):
    """dense_weight against the layer's own forward and against the original fp32 weight."""
    g = torch.Generator().manual_seed(0)
    q_layers = dict(qbench.model.named_modules())
    for name, ref in qwen.model.named_modules():
        if not name.endswith("_proj"):
            continue
        layer = q_layers[name]
        W = dense_weight(layer)
        assert W.dtype == torch.float32 and W.shape == ref.weight.shape
        # round-to-nearest error: half the widest nf4 gap (0.139) of each 64-block's absmax (itself
        # stored in 8 bits), half an int8 step of the row absmax (bitsandbytes rounds W to fp16 first)
        kind = weight_storage(layer)
        block = 64 if kind == "bnb_4bit" else layer.in_features
        err = (W - ref.weight).detach().reshape(-1, block).abs()
        scale = ref.weight.detach().reshape(-1, block).abs().amax(1, keepdim=True)
        assert (err <= QUANT_ERROR[kind] * scale).all(), name
        x = torch.randn(4, layer.in_features, generator=g)
        with torch.no_grad():
            expected = x @ W.T + (0 if layer.bias is None else layer.bias)
            # LLM.int8() also rounds the activations to int8, the 4-bit CPU inference kernel
            # computes in bf16; the other paths multiply by the dequantized W in fp32
            packed = getattr(getattr(layer.weight, "quant_state", None), "packing_format_for_cpu", False)
            tol = 3e-2 if kind == "bnb_int8" else 1e-2 if packed else 1e-5
            assert rel_err(layer(x), expected) <= tol, name


def test_bnb_4bit_cpu_inference_layout(tmp_path):
    """Linear4bit in its training layout equals x·dense_weightᵀ to fp32 rounding. On a CPU with
    AVX512-BF16 its first eval-mode forward without grad repacks the weight in place for a bf16
    kernel; dense_weight reads that layout (the same W up to the bf16 rounding of the block
    scales), and DoRA, which reads W on every call, keeps identity, reload and detach exact."""
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (extra 'quant')")
    torch.manual_seed(0)
    net = nn.Sequential(*(bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32)
                          for _ in range(2))).to("cpu")
    x = torch.randn(5, 64)
    W = dense_weight(net[0])
    with torch.no_grad():
        assert rel_err(net[0](x), x @ W.T + net[0].bias) <= 1e-6
        y0 = net.eval()(x)
    if not getattr(net[0].weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("this CPU keeps Linear4bit's training layout in eval mode (no AVX512-BF16)")
    assert rel_err(dense_weight(net[0]), W) <= 2 ** -8
    before = storage(net)
    fresh = copy.deepcopy(net)
    ll.attach(net, ll.DoRAConfig(r=4))
    with torch.no_grad():
        assert torch.equal(net(x), y0)
        perturb(net)
        y1 = net(x)
    ll.save(net, tmp_path / "a.safetensors")
    ll.detach(net)
    ll.load(fresh, tmp_path / "a.safetensors")
    with torch.no_grad():
        assert torch.equal(net(x), y0) and torch.equal(fresh(x), y1)
    assert_same_storage(storage(net), before)


def _neutralize(model, case, cfg):
    neutralize(model)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_identity_at_init_on_a_quantized_base(qbench, case):
    model = qbench.fresh()
    y0 = qbench.out(model)
    cfg = attach_case(qbench, case, model)
    _neutralize(model, case, cfg)
    assert rel_err(qbench.out(model), y0) <= IDENTITY_TOL.get(cfg.variant, {}).get(torch.float32, 0.0)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_training_step_on_a_quantized_base(qbench, case):
    """Finite nonzero gradients for every live trainable, a step moves the output, and the
    quantized storage is the same bit for bit afterwards."""
    model = qbench.fresh()
    before = storage(model)
    cfg = attach_case(qbench, case, model)
    y0 = qbench.out(model)
    params = trainables(model)
    out = qbench.output(model(**qbench.batch))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * weights).sum().backward()
    zero_by_design = REGISTRY[cfg.variant].zero_grad_at_init
    for name, p in params.items():
        if name.rsplit(".", 1)[1] in zero_by_design:
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    torch.optim.Adam(params.values(), lr=1e-2).step()
    assert rel_err(qbench.out(model), y0) > 1e-6
    assert_same_storage(storage(model), before)


@pytest.mark.parametrize("case", CASE_PARAMS)
def test_save_load_detach_on_a_quantized_base(qbench, case, tmp_path):
    model = qbench.fresh()
    before = storage(model)
    y0 = qbench.out(model)
    attach_case(qbench, case, model)
    perturb(model)
    y1 = qbench.out(model)
    assert rel_err(y1, y0) > 1e-4
    ll.save(model, tmp_path / "adapter.safetensors")
    ll.detach(model)
    assert torch.equal(qbench.out(model), y0)
    assert_same_storage(storage(model), before)
    assert not any(".lora_" in k for k in model.state_dict())

    fresh = qbench.fresh()
    ll.load(fresh, tmp_path / "adapter.safetensors")  # no warning: the same quantized base
    assert torch.equal(qbench.out(fresh), y1)


def test_load_warns_on_a_differently_quantized_base(qwen, tmp_path):
    """The fingerprint sketches the dequantized weight: an adapter saved on the fp32 base and
    loaded onto its int8 copy warns that outputs will differ."""
    pytest.importorskip("torchao", reason="torchao is not installed (extra 'quant')")
    model = qwen.fresh()
    ll.attach(model, ll.DoRAConfig(r=4))
    ll.save(model, tmp_path / "a.safetensors")
    q = quantize(qwen.fresh(), "torchao")
    with pytest.warns(UserWarning, match="differ from the base the adapter was saved from"):
        ll.load(q, tmp_path / "a.safetensors")


class _PackedLinear(nn.Module):
    """Linear-like with a weight no reader understands (an unknown quantizer's packed bytes)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.zeros(d_out * d_in // 2, dtype=torch.uint8), requires_grad=False)

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def test_dense_weight_refuses_unknown_storage():
    with pytest.raises(TypeError, match=r"cannot read the weight of _PackedLinear \(weight type Parameter, dtype torch\.uint8\)"):
        dense_weight(_PackedLinear(8, 4))
    with pytest.raises(TypeError, match="cannot read the weight of ConvTranspose1d"):
        dense_weight(nn.ConvTranspose1d(4, 8, 3))  # a transposed convolution: no layer kind of ours (kinds.py)
    conv = nn.Conv1d(4, 8, 3)
    assert torch.equal(dense_weight(conv), conv.weight.reshape(8, 12))  # the dense view (C_out, C_in·k)
    emb = nn.Embedding(4, 8)
    assert torch.equal(dense_weight(emb), emb.weight.T)  # W = weightᵀ (dim, V)
    lin = nn.Linear(8, 4)
    assert dense_weight(lin) is lin.weight and weight_storage(lin) == "dense"


def test_weight_reading_variant_refuses_unknown_quantized_layer():
    net = nn.Sequential(_PackedLinear(8, 8))
    with pytest.raises(TypeError, match=r"0: variant 'pissa' reads the weight W and needs torch\.nn\.Linear, got _PackedLinear"):
        ll.attach(net, ll.PiSSAConfig(r=2))
    assert not hasattr(net[0], "lora_A")
    ll.attach(net, ll.LoRAConfig(r=2))  # hook-only: fine
