"""Property tests over layer geometries, ranks, biases and base dtypes, for every variant.

hypothesis draws a single linear layer (d_in ≠ d_out allowed, tiny and odd sizes within each
variant's constraints: HRA's even r ≤ d_in, RoAd's group size dividing d_out, rank ≤ min(d_in,
d_out), block sizes dividing r, ...), with or without bias, in fp32, bf16 or fp16, and a config;
calibrated variants get random input batches. The contract (SPEC Amendments 1 and 2: no variant
writes the base weight, so every variant is additive):

* identity at init: bit for bit, except where the variant declares `identity_tol` (with the
  tensors it declares `neutral` zeroed);
* the base `state_dict` entries never change while attached (after attach and after training);
* save → load onto a pristine base reproduces the outputs bit for bit;
* detach gives the pristine model back bit for bit (weights, flags, hooks, attributes).

Deterministic (`derandomize=True`); EXAMPLES per variant and property.
"""

from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn

import lora_lite as ll
from lora_lite.variant import REGISTRY

from conftest import assert_untouched, snapshot

pytestmark = pytest.mark.slow  # hypothesis: 20 examples per variant and property

EXAMPLES = 20
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

TMP = Path(tempfile.mkdtemp(prefix="lora-lite-props-"))


# ------------------------------------------------------------------------------- strategies
@st.composite
def configs(draw, name):
    """(d_in, d_out, config): a geometry and one of the variant's declared examples with its
    rank (and the fields bounded by it) redrawn to fit; combinations the config or the variant
    refuses are rejected, so every variant's own constraints (HRA's even r, RoAd's group size
    dividing d_out, rot's blocks dividing r, ...) hold without a table here."""
    variant = REGISTRY[name]
    fields = dict(variant.examples[draw(st.sampled_from(sorted(variant.examples)))].fields)
    fields.pop("layers", None)
    d_in, d_out = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    if "group_size" in fields:  # a group size that divides d_out
        fields["group_size"] = draw(st.sampled_from([g for g in (2, 4, 6, 8) if d_out % g == 0] or [2]))
    if "r" in fields:
        fields["r"] = draw(st.integers(1, min(d_in, d_out)))
        for bounded in ("k", "core_rank"):
            if bounded in fields:
                fields[bounded] = draw(st.integers(1, fields["r"]))
    try:
        cfg = ll.AdapterConfig.from_dict({"variant": name, **fields})
        layer = nn.Linear(d_in, d_out)
        if variant.uses_rank and getattr(cfg, "r", 0) > min(d_in, d_out):
            raise ValueError("rank")
        variant.at_target("0", cfg).validate(layer, cfg)  # "0": the layer's name in setups' model
        variant.at_target("0", cfg).param_specs(d_in, d_out, cfg)
    except ValueError:
        reject()
    return d_in, d_out, cfg


@st.composite
def setups(draw, name):
    """(pristine model, input, config, calibration batches or None)."""
    d_in, d_out, cfg = draw(configs(name))
    dtype = draw(st.sampled_from(DTYPES))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=g) / math.sqrt(d_in))
        if bias:
            layer.bias.copy_(0.1 * torch.randn(d_out, generator=g))
    model = nn.Sequential(layer).to(dtype).eval()
    x = torch.randn(2, 5, d_in, generator=g).to(dtype)
    kind, required = REGISTRY[name].calibration_needs(cfg)
    data = None
    if kind is not None and (required or draw(st.booleans())):
        data = [torch.randn(8, d_in, generator=g).to(dtype) for _ in range(4)]  # 32 tokens >= r
    return model, x, cfg, data


def _settings():
    return settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example,
                                           HealthCheck.filter_too_much])


def _attach(model, cfg, data):
    ll.attach(model, cfg, calibration_data=data, progress=False)


@torch.no_grad()
def _train(model, seed=1):
    """A trained-looking adapter: every trainable tensor moved."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_((0.05 * torch.randn(p.shape, generator=g)).to(p.dtype))


def _out(model, x):
    with torch.no_grad():
        return model(x)


def _base_state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def _assert_base_unchanged(model, base: dict):
    now = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert now.keys() == base.keys()
    for k, v in base.items():
        assert torch.equal(now[k], v), f"base tensor {k} changed while attached"


VARIANTS = sorted(REGISTRY)


# ------------------------------------------------------------------------------- properties
@pytest.mark.parametrize("name", VARIANTS)
@_settings()
@given(data=st.data())
def test_identity_at_init(name, data):
    model, x, cfg, batches = data.draw(setups(name))
    y0 = _out(model, x)
    _attach(model, cfg, batches)
    with torch.no_grad():
        for layer in model.modules():
            for t in REGISTRY[name].neutral:
                if hasattr(layer, t):
                    getattr(layer, t).zero_()
    y = _out(model, x)
    tol = REGISTRY[name].identity_tol.get(x.dtype, 0.0)
    assert y.dtype == y0.dtype
    if tol == 0:
        assert torch.equal(y, y0), f"{name} on {x.dtype}: not the identity bit for bit"
    else:
        err = float((y.float() - y0.float()).abs().max())
        scale = float(y0.float().abs().max()) or 1.0
        assert err <= tol * scale, f"{name} on {x.dtype}: {err / scale:.2e} relative > {tol}"


@pytest.mark.parametrize("name", VARIANTS)
@_settings()
@given(data=st.data())
def test_base_weights_never_change_while_attached(name, data):
    model, x, cfg, batches = data.draw(setups(name))
    base = _base_state(model)
    _attach(model, cfg, batches)
    _assert_base_unchanged(model, base)
    _train(model)
    _out(model, x)
    _assert_base_unchanged(model, base)


@pytest.mark.parametrize("name", VARIANTS)
@_settings()
@given(data=st.data())
def test_save_load_reproduces_outputs(name, data):
    model, x, cfg, batches = data.draw(setups(name))
    pristine = copy.deepcopy(model)
    _attach(model, cfg, batches)
    _train(model)
    y = _out(model, x)
    path = TMP / f"{name}.safetensors"
    ll.save(model, path)
    ll.load(pristine, path)
    assert torch.equal(_out(pristine, x), y)


@pytest.mark.parametrize("name", VARIANTS)
@_settings()
@given(data=st.data())
def test_detach_restores_the_model_exactly(name, data):
    model, x, cfg, batches = data.draw(setups(name))
    before = snapshot(model)
    y0 = _out(model, x)
    _attach(model, cfg, batches)
    _train(model)
    ll.detach(model)
    assert_untouched(model, before)
    assert torch.equal(_out(model, x), y0)
