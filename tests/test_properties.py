"""Property tests over layer geometries, ranks, biases and base dtypes, for every variant.

hypothesis draws a single linear layer (d_in ≠ d_out allowed, tiny and odd sizes within each
variant's constraints: HRA's even r ≤ d_in, RoAd's group size dividing d_out, rank ≤ min(d_in,
d_out), block sizes dividing r, ...), with or without bias, in fp32, bf16 or fp16, and a config;
calibrated variants get random input batches. The contract (SPEC Amendments 1 and 2: no variant
writes the base weight, so every variant is additive):

* identity at init: bit for bit, except where TOLERANCE says why not;
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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_lite as ll
from lora_lite.variant import REGISTRY

from cases import NEUTRAL
from conftest import assert_untouched, snapshot

EXAMPLES = 20
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Identity at init, as max|y − y_base| ≤ ulps · eps(base dtype) · max|y_base|; 0 means bit for bit.
# Variants that are deliberately not the identity at init are checked with their NEUTRAL tensors
# (tests/cases.py) zeroed.
TOLERANCE = {
    "lora": (0, "B = 0: the added change is exactly 0"),
    "pissa": (0, "additive: s·(B A − B₀A₀) x is exactly 0 while A, B equal their frozen copies"),
    "dora": (0, "m = ‖W‖ row norms and B = 0: the gain m/n is exactly 1"),
    "delora": (0, "B = 0: the added change is exactly 0"),
    "hra": (32, "paired reflections H(u)H(u) = I cancel only up to rounding in the compute dtype"),
    "ia3": (0, "gates are exactly 1"),
    "ia3_ff": (0, "gates are exactly 1"),
    "road": (0, "α = 1, θ = 0: f = 1 and s = 0 exactly"),
    "lora_xs": (0, "with R zeroed (random R at init is deliberate) B R A = 0 exactly"),
    "eva": (0, "B = 0: the added change is exactly 0"),
    "antipasto": (0, "gain = 1: the change of the frozen SVD part is exactly 0"),
    "antipasto_rot": (0, "with δ_s zeroed and rot_T = 0 (Cayley(0) = I) the change is exactly 0"),
    "antipasto_corda": (0, "gain = 1: the change of the frozen part is exactly 0"),
    "antipasto_asvd": (0, "gain = 1: the change of the frozen part is exactly 0"),
    "antipasto_ablate": (0, "with α zeroed the ablation term is exactly 0"),
    "antipasto_dplr": (0, "gain = 1 and B = 0: the change is exactly 0"),
}
TMP = Path(tempfile.mkdtemp(prefix="lora-lite-props-"))


def test_tolerance_table_covers_every_variant():
    assert sorted(TOLERANCE) == sorted(REGISTRY)


# ------------------------------------------------------------------------------- strategies
def _rank(draw, d_in, d_out, multiple_of=1):
    top = min(d_in, d_out) // multiple_of
    return multiple_of * draw(st.integers(1, top))


def _geometry(draw, name):
    """(d_in, d_out) within the variant's constraints: HRA pairs reflections in R^{d_in}, RoAd's
    group size divides d_out, AntiPaSTO-rot needs a block of >= 2 directions."""
    d_in = draw(st.integers(2 if name in ("hra", "antipasto_rot") else 1, 24))
    if name == "road":
        g = draw(st.sampled_from([2, 4, 6, 8]))
        return d_in, g * draw(st.integers(1, 24 // g))
    return d_in, draw(st.integers(2 if name == "antipasto_rot" else 1, 24))


def _config(draw, name, d_in, d_out):
    """A valid config for `name` on a d_in -> d_out layer (see _geometry)."""
    lo = min(d_in, d_out)
    if name in ("lora", "pissa", "dora", "eva"):
        return ll.AdapterConfig.from_dict({"variant": name, "r": _rank(draw, d_in, d_out),
                                           "alpha": draw(st.sampled_from([1.0, 3.0, 16.0]))})
    if name == "delora":
        return ll.DeLoRAConfig(r=_rank(draw, d_in, d_out), lambda0=draw(st.sampled_from([0.5, 2.0])))
    if name == "hra":
        return ll.HRAConfig(r=2 * draw(st.integers(1, d_in // 2)))
    if name in ("ia3", "ia3_ff"):
        return ll.AdapterConfig.from_dict({"variant": name})
    if name == "road":
        groups = [g for g in (2, 4, 6, 8) if d_out % g == 0]
        return ll.RoadConfig(
            group_size=draw(st.sampled_from(groups)),
            road_variant=draw(st.sampled_from(["road_1", "road_2", "road_4"])))
    if name == "lora_xs":
        return ll.LoRAXSConfig(r=_rank(draw, d_in, d_out), alpha=draw(st.sampled_from([1.0, 4.0])))
    if name in ("antipasto", "antipasto_corda", "antipasto_asvd"):
        suppress = draw(st.booleans())
        return ll.AdapterConfig.from_dict({
            "variant": name, "r": _rank(draw, d_in, d_out), "suppress_only": suppress,
            "coeff": draw(st.sampled_from([0.5, 1.0] if suppress else [-1.0, 0.5, 1.0]))})
    if name == "antipasto_rot":
        blocks = [b for b in (2, 3, 4) if b <= lo]
        bs = draw(st.sampled_from(blocks))
        return ll.AntiPaSTORotConfig(r=_rank(draw, d_in, d_out, bs), block_size=bs,
                                     rotate_basis=draw(st.sampled_from(["V", "U", "both", "none"])))
    if name == "antipasto_ablate":
        r = _rank(draw, d_in, d_out)
        return ll.AntiPaSTOAblateConfig(r=r, k=draw(st.integers(1, r)), cov_orient=draw(st.booleans()),
                                        init_alpha=draw(st.sampled_from([0.0, 0.05])))
    if name == "antipasto_dplr":
        r = _rank(draw, d_in, d_out)
        return ll.AntiPaSTODPLRConfig(r=r, lora_rank=draw(st.integers(1, r)))
    raise AssertionError(f"no strategy for variant {name!r}: add one to _config")


@st.composite
def setups(draw, name):
    """(pristine model, input, config, calibration batches or None)."""
    d_in, d_out = _geometry(draw, name)
    cfg = _config(draw, name, d_in, d_out)
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
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])


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
    if not REGISTRY[name].identity_at_init:
        with torch.no_grad():
            for layer in model.modules():
                for t in NEUTRAL.get(name, ()):
                    if hasattr(layer, t):
                        getattr(layer, t).zero_()
    y = _out(model, x)
    ulps, why = TOLERANCE[name]
    assert y.dtype == y0.dtype
    if ulps == 0:
        assert torch.equal(y, y0), f"{name} on {x.dtype}: not the identity bit for bit ({why})"
    else:
        err = float((y.float() - y0.float()).abs().max())
        scale = float(y0.float().abs().max()) or 1.0
        assert err <= ulps * torch.finfo(x.dtype).eps * scale, f"{name} on {x.dtype}: {err / scale:.2e} relative"


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
