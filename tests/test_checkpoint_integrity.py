"""Checkpoint integrity: recorded hashes, refusal of corrupted or non-finite tensors and of other versions."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lora_lite as ll
import lora_lite.checkpoint as ckpt

from ckpt_files import read, reseal_metadata, rewrite, split
from conftest import assert_untouched, snapshot

X = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))


def base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 6)).eval()


@pytest.fixture()
def saved(tmp_path):
    """A trained-looking LoRA checkpoint and the outputs it must reproduce."""
    model = base()
    ll.attach(model, ll.LoRAConfig(r=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    path = tmp_path / "a.safetensors"
    ll.save(model, path)
    with torch.no_grad():
        return path, model(X)


def _refused(path, match):
    model = base()
    before = snapshot(model)
    with pytest.raises(ll.CheckpointError, match=match):
        ll.load(model, path)
    assert_untouched(model, before)


def test_recorded_hashes_are_sha256_of_the_stored_bytes(saved):
    path, _ = saved
    header, payload = split(path.read_bytes())
    meta = header.pop("__metadata__")
    assert meta["format_version"] == "2"
    hashes = json.loads(meta["sha256"])
    assert set(hashes) == set(header)
    for key, entry in header.items():
        start, end = entry["data_offsets"]
        assert hashes[key] == hashlib.sha256(payload[start:end]).hexdigest(), key
    rest = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    assert meta["metadata_sha256"] == hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def test_every_flipped_payload_bit_is_refused_naming_the_tensor(saved):
    """One flipped bit per tensor (the low mantissa bit of its first element: the smallest
    change there is) is refused by that tensor's hash."""
    path, _ = saved
    blob = path.read_bytes()
    header, _ = split(blob)
    start_of_payload = len(blob) - sum(e["data_offsets"][1] - e["data_offsets"][0]
                                       for k, e in header.items() if k != "__metadata__")
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        corrupted = bytearray(blob)
        corrupted[start_of_payload + entry["data_offsets"][0]] ^= 1
        path.write_bytes(bytes(corrupted))
        _refused(path, rf"tensor {key} does not match its recorded sha256")


def test_edited_metadata_is_refused(saved, tmp_path):
    path, _ = saved
    edited = rewrite(path, tmp_path / "b.safetensors", sealed=False, edit_meta=lambda m: m.update(
        config=m["config"].replace('"alpha": 16.0', '"alpha": 17.0')))
    _refused(edited, r"metadata does not match its recorded sha256")


def test_format_2_without_hashes_is_refused(saved, tmp_path):
    path, _ = saved
    _refused(rewrite(path, tmp_path / "b.safetensors", sealed=False,
                     edit_meta=lambda m: [m.pop("sha256"), m.pop("metadata_sha256")]),
             r"metadata does not match its recorded sha256")
    _refused(rewrite(path, tmp_path / "c.safetensors", sealed=False,
                     edit_meta=lambda m: m.update(reseal_metadata({k: v for k, v in m.items() if k != "sha256"})) or m.pop("sha256")),
             r"metadata 'sha256' is missing")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensors_are_refused_naming_the_tensor(saved, tmp_path, value):
    """Even with consistent hashes (a diverged adapter saved by other means)."""
    path, _ = saved
    key = "0.lora_B"

    def poison(t):
        t[key] = t[key].clone()
        t[key][1, 0] = value

    _refused(rewrite(path, tmp_path / "b.safetensors", edit_tensors=poison),
             rf"tensor {key} holds non-finite values")


def test_payload_overwritten_with_ff_bytes_is_refused(saved):
    """0xFF bytes are NaN in every float dtype: refused by hash (and would be by finiteness)."""
    path, _ = saved
    blob = path.read_bytes()
    header, payload = split(blob)
    path.write_bytes(blob[: len(blob) - len(payload)] + b"\xff" * len(payload))
    _refused(path, r"does not match its recorded sha256")


def test_save_refuses_a_diverged_adapter_and_keeps_the_previous_file(saved):
    path, _ = saved
    before = path.read_bytes()
    model = base()
    ll.attach(model, ll.LoRAConfig(r=2))
    with torch.no_grad():
        model[0].lora_A[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save: 0\.lora_A holds non-finite values"):
        ll.save(model, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_unsupported_versions_are_refused(saved, tmp_path):
    path, _ = saved
    for v in ("0", "1", "3", "", "2.0"):
        _refused(rewrite(path, tmp_path / f"v{v}.safetensors", edit_meta=lambda m: m.update(format_version=v)),
                 r"format version .* is not supported .* \(reads versions \[.2.\]\)")


def test_crafted_extreme_fingerprint_values_warn_not_crash(saved, tmp_path):
    """Fingerprints are untrusted JSON: a 400-digit integer is 'a different base', not an OverflowError."""
    path, y = saved

    def extreme(m):
        fps = json.loads(m["fingerprints"])
        fps["0"]["weight"]["norm"] = 10**400
        m["fingerprints"] = json.dumps(fps)

    model = base()
    with pytest.warns(UserWarning, match="differ from the base"):
        ll.load(model, rewrite(path, tmp_path / "b.safetensors", edit_meta=extreme))
    with torch.no_grad():
        assert torch.equal(model(X), y)


@pytest.mark.parametrize("targets", ['["0", "0"]', "[[1]]", "[]", '["0", 2]'])
def test_crafted_target_lists_are_refused(saved, tmp_path, targets):
    path, _ = saved
    _refused(rewrite(path, tmp_path / "b.safetensors", edit_meta=lambda m: m.update(targets=targets)),
             "metadata 'targets' must be a non-empty list of distinct names")


def test_a_config_that_does_not_fit_the_model_is_a_checkpoint_error(saved, tmp_path):
    """Geometry checks of the saved config (here an r its saved tensors do not have) name the file."""
    path, _ = saved

    def big_r(m):
        cfg = json.loads(m["config"])
        m["config"] = json.dumps({**cfg, "r": 7})

    _refused(rewrite(path, tmp_path / "b.safetensors", edit_meta=big_r),
             r"b\.safetensors: 0\.lora_A has shape \(2, 8\), this model needs \(7, 8\)")


def test_load_reads_each_tensor_once(saved, monkeypatch):
    """Verification and installation use the same in-memory tensors: one open, one read each."""
    path, y = saved
    opens, reads = [], []
    real = ckpt.safe_open

    class Counting:
        def __init__(self, *a, **k):
            opens.append(a)
            self.f = real(*a, **k)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            reads.append(key)
            return self.inner.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(ckpt, "safe_open", Counting)
    model = base()
    ll.load(model, path)
    assert len(opens) == 1
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 4
    with torch.no_grad():
        assert torch.equal(model(X), y)
