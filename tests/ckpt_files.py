"""Reading, editing and re-sealing checkpoint files in tests, independently of checkpoint.py.

`seal` recomputes the integrity entries from their definition (docs/checkpoints.md): sha256 of
each tensor's raw little-endian bytes, and sha256 of the sorted-key JSON of every other
metadata entry. A sealed edit models a crafted file whose hashes are consistent, so the checks
behind the integrity layer (config, targets, shapes, fingerprints) are what refuses it.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def read(path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def seal(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    meta = dict(meta)
    meta["sha256"] = json.dumps({
        k: hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for k, t in tensors.items()
    })
    return reseal_metadata(meta)


def reseal_metadata(meta: dict[str, str]) -> dict[str, str]:
    """Only the metadata hash (the tensor hash table is kept as it is)."""
    meta = dict(meta)
    rest = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    meta["metadata_sha256"] = hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()
    return meta


def rewrite(src, dst, edit_tensors=None, edit_meta=None, sealed=True):
    """Copy a checkpoint with edits; `sealed` recomputes its hashes after the edits."""
    meta, tensors = read(src)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if sealed:
        meta = seal(meta, tensors)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def split(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file's header JSON and its payload (the byte buffer after the header)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, payload: bytes, pad: int = 0) -> bytes:
    """Inverse of `split`; `pad` extra trailing spaces in the header (the format ignores them)."""
    text = json.dumps(header, separators=(",", ":")).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + payload
