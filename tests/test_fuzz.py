"""Fuzzed loader: mutated checkpoints are refused with the model untouched, never anything else.

Two kinds of mutation of valid checkpoints (a LoRA in fp32 and a DoRA in bf16 on a tiny MLP):

* raw corruption (random bytes and bits anywhere, the 8-byte header length, truncation,
  trailing bytes, edits of the header JSON: tensor keys, dtypes, shapes, data_offsets,
  metadata entries): `load` must raise `CheckpointError` and leave the model bit-for-bit
  untouched, or load a model whose outputs equal the unmutated file's (only possible for
  bytes the format ignores, e.g. header padding). A load with other outputs is a "silent load".
* crafted files: a metadata JSON value replaced by a random JSON value of any type, then
  re-sealed (hashes recomputed, as someone editing the file on purpose would). The content is
  consistent, so a load may succeed with other outputs; a refusal must still be a
  `CheckpointError` with the model untouched.

Any other exception type fails the test. CI runs FUZZ_EXAMPLES cases in total, deterministically
(`derandomize=True`); a longer run: `LORA_LITE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py`.
"""

from __future__ import annotations

import copy
import json
import os
import struct
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import lora_lite as ll

from ckpt_files import join, reseal_metadata, split
from conftest import assert_untouched, snapshot

pytestmark = pytest.mark.slow  # hypothesis: hundreds of mutated checkpoints

# Cases per CI run, by family; LORA_LITE_FUZZ_EXAMPLES=N runs N in total, split in proportion.
FUZZ_BUDGET = {"bytes": 120, "length_field": 30, "truncation": 40, "header_json": 100, "crafted": 110}
FUZZ_EXAMPLES = sum(FUZZ_BUDGET.values())
_TOTAL = int(os.environ.get("LORA_LITE_FUZZ_EXAMPLES", FUZZ_EXAMPLES))


def _settings(family: str):
    n = max(1, round(FUZZ_BUDGET[family] * _TOTAL / FUZZ_EXAMPLES))
    return settings(
        max_examples=n, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# ---------------------------------------------------------------------------------- the files
CONFIGS = {
    "lora_fp32": ll.LoRAConfig(r=2, alpha=4),
    "dora_bf16": ll.DoRAConfig(r=2, alpha=4, dtype=torch.bfloat16),
}
X = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
TMP = Path(tempfile.mkdtemp(prefix="lora-lite-fuzz-"))


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 10, bias=False), nn.Linear(10, 6)).eval()


BASE = _base()


def _make(name: str) -> tuple[bytes, torch.Tensor]:
    model = copy.deepcopy(BASE)
    ll.attach(model, CONFIGS[name])
    with torch.no_grad():  # a trained-looking adapter: every tensor matters for the output
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    path = TMP / f"{name}.safetensors"
    ll.save(model, path)
    fresh = copy.deepcopy(BASE)
    ll.load(fresh, path)
    with torch.no_grad():
        return path.read_bytes(), fresh(X)


FILES = {name: _make(name) for name in CONFIGS}
STATS: Counter = Counter()  # (family, outcome) -> count, printed at the end with -s


def _attempt(family: str, name: str, data: bytes, crafted: bool = False) -> None:
    path = TMP / "mutated.safetensors"
    path.write_bytes(data)
    model = copy.deepcopy(BASE)
    before = snapshot(model)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a crafted fingerprint only warns (additive variants)
            ll.load(model, path)
    except ll.CheckpointError:
        assert_untouched(model, before)
        STATS[family, "refused"] += 1
        return
    with torch.no_grad():
        same = data == FILES[name][0] or torch.equal(model(X), FILES[name][1])
    if crafted:
        STATS[family, "loaded (crafted, consistent)"] += 1
        return
    STATS[family, "loaded, same outputs" if same else "SILENT LOAD"] += 1
    assert same, f"{family}: a corrupted file loaded with different outputs"


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nfuzz outcomes:", dict(sorted(STATS.items())), "total", sum(STATS.values()))


names = st.sampled_from(sorted(CONFIGS))


# ---------------------------------------------------------------------------------- raw corruption
@_settings("bytes")
@given(name=names, data=st.data())
def test_random_bytes_and_bits(name, data):
    blob = bytearray(FILES[name][0])
    n_edits = data.draw(st.integers(1, 4))
    for _ in range(n_edits):
        pos = data.draw(st.integers(0, len(blob) - 1))
        if data.draw(st.booleans()):
            blob[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            blob[pos] = data.draw(st.integers(0, 255).filter(lambda b, old=blob[pos]: b != old))
    assume(blob != FILES[name][0])  # two edits may cancel
    _attempt("bytes", name, bytes(blob))


@_settings("length_field")
@given(name=names, data=st.data())
def test_header_length_field(name, data):
    blob = FILES[name][0]
    (n,) = struct.unpack("<Q", blob[:8])
    special = [0, 1, 2, 7, 8, n - 1, n + 1, n + 8, len(blob), len(blob) - 8, 2**31, 2**40, 2**63, 2**64 - 1]
    new = data.draw(st.one_of(st.sampled_from(special), st.integers(0, 2**64 - 1)).filter(lambda v: v != n))
    _attempt("length_field", name, struct.pack("<Q", new) + blob[8:])


@_settings("truncation")
@given(name=names, data=st.data())
def test_truncation_and_trailing_bytes(name, data):
    blob = FILES[name][0]
    if data.draw(st.booleans()):
        mutated = blob[: data.draw(st.integers(0, len(blob) - 1))]
    else:
        mutated = blob + data.draw(st.binary(min_size=1, max_size=64))
    _attempt("truncation", name, mutated)


_DTYPE_CODES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32",
                "F32", "F64", "I64", "U64", "F4", "C64", "", "f32", "F32 "]
_weird_ints = st.one_of(st.integers(-3, 40), st.sampled_from([2**31, 2**32, 2**63 - 1, 2**64, -(2**63)]))


def _header_edit(header: dict, data) -> tuple[dict, int]:
    """One structural edit of the header JSON; returns (header, trailing pad spaces)."""
    keys = sorted(k for k in header if k != "__metadata__")
    key = data.draw(st.sampled_from(keys))
    entry = header[key]
    op = data.draw(st.sampled_from(
        ["dtype", "shape", "offsets", "rename", "drop", "add", "swap", "meta_drop", "meta_text",
         "meta_type", "not_a_dict", "pad"]))
    meta = header.setdefault("__metadata__", {})
    if op == "dtype":
        entry["dtype"] = data.draw(st.one_of(st.sampled_from(_DTYPE_CODES), st.text(max_size=6)))
    elif op == "shape":
        entry["shape"] = data.draw(st.lists(_weird_ints, max_size=4))
    elif op == "offsets":
        entry["data_offsets"] = data.draw(st.lists(_weird_ints, min_size=0, max_size=3))
    elif op == "rename":
        header[data.draw(st.text(min_size=1, max_size=20).filter(lambda s: s not in header))] = header.pop(key)
    elif op == "drop":
        del header[key]
    elif op == "add":
        header[key + ".extra"] = dict(entry)
    elif op == "swap":
        other = data.draw(st.sampled_from(keys))
        header[key], header[other] = header[other], header[key]
    elif op == "meta_drop":
        meta.pop(data.draw(st.sampled_from(sorted(meta))), None)
    elif op == "meta_text":
        meta[data.draw(st.sampled_from(sorted(meta)))] = data.draw(st.text(max_size=30))
    elif op == "meta_type":
        meta[data.draw(st.sampled_from(sorted(meta)))] = data.draw(_json_values)
    elif op == "not_a_dict":
        return data.draw(st.sampled_from([[], [1, 2], "x", 0, None])), 0
    return header, (data.draw(st.integers(1, 64)) if op == "pad" else 0)


_json_leaves = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from([10**400, -(10**400), 2**63, "NaN", "Infinity", "float32", "lora", "../x", "\x00"])
)
_json_values = st.recursive(
    _json_leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@_settings("header_json")
@given(name=names, data=st.data())
def test_header_json_edits(name, data):
    header, payload = split(FILES[name][0])
    header, pad = _header_edit(header, data)
    _attempt("header_json", name, join(header, payload, pad=pad))


# ---------------------------------------------------------------------------------- crafted files
def _replace_somewhere(value, data, to_leaf: bool):
    """`value` with one random node replaced (a leaf when `to_leaf`, else at a random depth,
    possibly the whole value), or a dict key dropped."""
    if isinstance(value, (dict, list)) and value and (to_leaf or data.draw(st.integers(0, 3))):
        keys = sorted(value) if isinstance(value, dict) else list(range(len(value)))
        k = data.draw(st.sampled_from(keys))
        if isinstance(value, dict) and data.draw(st.integers(0, 7)) == 0:
            del value[k]
        else:
            value[k] = _replace_somewhere(value[k], data, to_leaf)
        return value
    return data.draw(_json_values)


@_settings("crafted")
@given(name=names, data=st.data())
def test_crafted_metadata_values(name, data):
    header, payload = split(FILES[name][0])
    meta = header["__metadata__"]
    key = data.draw(st.sampled_from(sorted(k for k in meta if k != "metadata_sha256")))
    try:
        value = json.loads(meta[key])
    except ValueError:
        value = meta[key]
    value = _replace_somewhere(value, data, to_leaf=data.draw(st.booleans()))
    meta[key] = value if isinstance(value, str) and data.draw(st.booleans()) else json.dumps(value)
    header["__metadata__"] = reseal_metadata(meta)
    _attempt("crafted", name, join(header, payload), crafted=True)


def test_padding_only_loads_identically():
    """The one raw edit the format ignores: spaces after the header JSON."""
    for name, (blob, _) in FILES.items():
        header, payload = split(blob)
        _attempt("padding", name, join(header, payload, pad=24))
    assert STATS["padding", "loaded, same outputs"] == len(FILES)
