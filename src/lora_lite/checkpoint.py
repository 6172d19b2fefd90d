"""save / load: adapter tensors + metadata in one safetensors file.

File layout: tensors named "<target module>.<lora_name>" (never a base weight) and string
metadata: format, format_version, library_version, variant, config (JSON of cfg.to_dict()),
targets (JSON list), fingerprints (JSON {target: sketch of the pristine base layer, see
fingerprint.py}), sha256 (JSON {tensor: sha256 of its raw bytes}) and metadata_sha256 (sha256
of the canonical JSON of every other metadata entry).

load() rebuilds the adapted model on a pristine base from the file alone: no calibration
data, no data-dependent init. It reads the file once, into memory, and checks everything
before the model is touched: integrity (every hash; a flipped bit anywhere in the payload or
the metadata is refused, not loaded as a slightly different adapter), finiteness, then fit
(config, targets, shapes, dtypes, base fingerprints); the model is then filled from those same
in-memory tensors. Metadata is parsed as data (JSON, dtype names through an allow-list),
nothing is executed or unpickled. Format 1 files (no hashes) still load, with a warning.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import warnings

import torch
from safetensors import safe_open
from safetensors.torch import save as serialize
from torch import nn

from ._version import __version__
from .config import AdapterConfig
from .fingerprint import fingerprint, same_base
from .runtime import ensure_free, install, state_of, validate, variant_of
from .targets import is_linear_like

FORMAT = "lora-lite"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", FORMAT_VERSION)  # 1: no content hashes (loads with a warning)
_DTYPE_CODES = ("BF16", "F16", "F32", "F64")  # safetensors names of the config dtype allow-list


class CheckpointError(ValueError):
    """A file that is not a readable lora-lite checkpoint, or that does not fit this model."""


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the attached adapter to `path` atomically (temp file in the same folder + fsync +
    rename): on any failure the previous file at `path`, if any, is left as it was."""
    state = state_of(model)
    tensors = {
        f"{name}.{pname}": getattr(layer, pname).detach().to("cpu").contiguous()
        for name, layer in state.targets.items()
        for pname in state.specs[name]
    }
    for key, t in tensors.items():
        if not _finite(t):
            raise ValueError(
                f"refusing to save: {key} holds non-finite values (NaN/Inf), so the adapter has "
                f"diverged; load() would refuse this file"
            )
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "variant": state.cfg.variant,
        "config": json.dumps(state.cfg.to_dict()),
        "targets": json.dumps(list(state.targets)),
        "fingerprints": json.dumps(state.fingerprints),
        "sha256": json.dumps({key: _digest(t) for key, t in tensors.items()}),
    }
    metadata["metadata_sha256"] = _metadata_digest(metadata)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"cannot save there, no folder {folder!r}", path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        _write(tmp, serialize(tensors, metadata=metadata))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write(tmp: str, data: bytes) -> None:
    """A new file (permissions from the umask, unlike a mkstemp file's 0600), flushed to disk."""
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def load(model: nn.Module, path: str | os.PathLike) -> None:
    """Attach the adapter saved at `path` to a pristine `model`, exactly as it was saved."""
    path = os.fspath(path)
    ensure_free(model)
    meta, tensors = _read(path)
    _verify(path, meta, tensors)
    cfg = _parse_config(path, meta)
    variant = variant_of(cfg)
    names = _parse_json(path, meta, "targets", list)
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise CheckpointError(f"{path}: metadata 'targets' must be a non-empty list of distinct names")
    fps = _parse_json(path, meta, "fingerprints", dict)
    modules = dict(model.named_modules())
    absent = [n for n in names if not (n in modules and is_linear_like(modules[n]))]
    if absent:
        raise CheckpointError(
            f"{path}: {len(absent)} target(s) are not linear layers of this model, e.g. "
            f"{absent[:3]}; was the adapter trained on another architecture?"
        )
    targets = [(n, modules[n]) for n in names]
    try:
        validate(model, variant, cfg, targets)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the saved {cfg.variant!r} adapter does not fit this model: {e}") from None

    expected = {}
    for name, layer in targets:
        for pname, spec in variant.param_specs(layer.in_features, layer.out_features, cfg).items():
            expected[f"{name}.{pname}"] = tuple(spec.shape)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match a {cfg.variant!r} adapter on these targets: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, shape in expected.items():
        t = tensors[key]
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(t.shape)}, this model needs {shape}")
        if t.dtype != cfg.dtype:
            raise CheckpointError(f"{path}: {key} is {t.dtype}, the config says {cfg.dtype}")

    now = {n: fingerprint(m) for n, m in targets}
    differ = [n for n in names if not same_base(fps.get(n), now[n])]
    if differ:
        msg = (
            f"{path}: the base weights of {len(differ)} target(s) (e.g. {differ[0]}) differ from "
            f"the base the adapter was saved from"
        )
        if variant.base_delta is not None:
            raise CheckpointError(
                msg + f"; {cfg.variant!r} rewrites W as W - Δ0 and needs the same pristine base"
            )
        warnings.warn(msg + "; outputs will differ from the saved model's", stacklevel=2)

    def fill(name, layer, specs):
        for pname in specs:
            getattr(layer, pname).copy_(tensors[f"{name}.{pname}"])

    install(model, cfg, variant, targets, fill, fingerprints=now)


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and every tensor, read once into memory; CheckpointError if the file is
    unreadable, not a lora-lite checkpoint, of an unknown version, or holds a dtype we never write."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(
                    f"{path}: not a lora-lite checkpoint (metadata format={meta.get('format')!r})"
                )
            if meta.get("format_version") not in READABLE_VERSIONS:
                raise CheckpointError(
                    f"{path}: checkpoint format version {meta.get('format_version')!r} is not "
                    f"supported by lora-lite {__version__} (reads versions {list(READABLE_VERSIONS)})"
                )
            for key in f.keys():
                code = f.get_slice(key).get_dtype()
                if code not in _DTYPE_CODES:
                    raise CheckpointError(f"{path}: {key} has dtype {code}; adapters are {list(_DTYPE_CODES)}")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt/truncated/empty files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return meta, tensors


def _verify(path: str, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Integrity (metadata and per-tensor sha256) and finiteness, before anything else is read."""
    if meta["format_version"] == "1" and "sha256" not in meta and "metadata_sha256" not in meta:
        warnings.warn(
            f"{path}: a format-1 checkpoint records no content hashes, so its integrity cannot be "
            f"verified; save it again with lora-lite {__version__} to add them",
            stacklevel=3,
        )
    else:
        if meta.get("metadata_sha256") != _metadata_digest(meta):
            raise CheckpointError(
                f"{path}: the metadata does not match its recorded sha256 (metadata_sha256); the "
                f"file is corrupted or was edited"
            )
        hashes = _parse_json(path, meta, "sha256", dict)
        if set(hashes) != set(tensors):
            odd = sorted(set(hashes) ^ set(tensors))
            raise CheckpointError(f"{path}: tensors and recorded hashes disagree on {odd[:3]}")
        for key, t in tensors.items():
            if hashes[key] != _digest(t):
                raise CheckpointError(
                    f"{path}: tensor {key} does not match its recorded sha256; the file is "
                    f"corrupted or was edited"
                )
    for key, t in tensors.items():
        if not _finite(t):
            raise CheckpointError(f"{path}: tensor {key} holds non-finite values (NaN/Inf)")


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in t. A NaN or Inf makes the sum non-finite, so the sum (one pass, no
    temporary) decides unless it overflowed; only then the elementwise check runs."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _digest(t: torch.Tensor) -> str:
    """sha256 of a contiguous CPU tensor's raw bytes (as safetensors stores them)."""
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def _metadata_digest(meta: dict[str, str]) -> str:
    rest = {k: v for k, v in meta.items() if k != "metadata_sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _parse_json(path: str, meta: dict[str, str], key: str, kind: type):
    try:
        value = json.loads(meta[key])
    except (KeyError, ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise CheckpointError(f"{path}: metadata {key!r} is missing or not JSON ({e})") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path}: metadata {key!r} must be a JSON {kind.__name__}")
    return value


def _parse_config(path: str, meta: dict[str, str]) -> AdapterConfig:
    d = _parse_json(path, meta, "config", dict)
    if d.get("variant") != meta.get("variant"):
        raise CheckpointError(
            f"{path}: metadata variant {meta.get('variant')!r} disagrees with the config's "
            f"{d.get('variant')!r}"
        )
    try:
        return AdapterConfig.from_dict(d)
    except Exception as e:  # untrusted data: whatever a field's check raises, the file is at fault
        raise CheckpointError(f"{path}: invalid adapter config in metadata: {e}") from None
