"""save / load: adapter tensors + metadata in one safetensors file.

File layout: tensors named "<target module>.<lora_name>" (never a frozen base weight) and string
metadata: format, format_version, library_version, variant, config (JSON of cfg.to_dict()),
targets (JSON list), fingerprints (JSON {target: sketch of the pristine base layer, see
fingerprint.py}), sha256 (JSON {tensor: sha256 of its raw bytes}) and metadata_sha256 (sha256
of the canonical JSON of every other metadata entry). With `trainable_modules`, their
parameters are stored as "base.<parameter name>" and listed in the metadata "trainable" (JSON
list; absent = none).

load() rebuilds the adapted model on a pristine base from the file alone: no calibration
data, no data-dependent init (frozen SVD factors and initial factors are in the file). It
reads the file once, into memory, and checks everything before the model is touched:
integrity (every hash; a flipped bit anywhere in the payload or the metadata is refused, not
loaded as a slightly different adapter), finiteness, then fit (config, targets, shapes,
dtypes, trained base parameters, base fingerprints); the model is then filled from those same
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
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as serialize
from torch import nn

from ._version import __version__
from .config import AdapterConfig
from .fingerprint import fingerprint, same_base
from .runtime import ensure_free, install, state_of, trainable_params, validate, variant_of
from .targets import named_linear_layers

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing can be sharded
    DTensor = ()

FORMAT = "lora-lite"
FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", FORMAT_VERSION)  # 1: no content hashes (loads with a warning)
# safetensors names of the config dtype allow-list
_DTYPE_CODES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
BASE = "base."  # key prefix of trained base parameters; adapter keys end in ".lora_*"


class CheckpointError(ValueError):
    """A file that is not a readable lora-lite checkpoint, or that does not fit this model."""


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the attached adapter to `path` atomically (temp file in the same folder + fsync +
    rename): on any failure the previous file at `path`, if any, is left as it was.

    Distributed: when torch.distributed is initialised, only global rank 0 writes; the other
    ranks return without writing. Adapter tensors sharded by FSDP2 (DTensors) are gathered
    first with collectives, so under FSDP2 call `save` on every rank (on rank 0 alone it would
    hang). With replicated tensors (DDP) no collective runs, so rank 0 alone may call it. `save`
    holds no barrier: ranks that read the file afterwards call `dist.barrier()` first.
    """
    state = state_of(model)
    tensors = _full_adapter_tensors(state)
    if not _is_writer():
        return
    config = _stored_config(state, tensors)
    tensors.update(_trainable_tensors(model, state))
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
        "config": json.dumps(config),
        "targets": json.dumps(list(state.targets)),
        "fingerprints": json.dumps(state.fingerprints),
        "sha256": json.dumps({key: _digest(t) for key, t in tensors.items()}),
    }
    if state.originals:
        metadata["trainable"] = json.dumps(list(state.originals))
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


def _stored_config(state, tensors: dict[str, torch.Tensor]) -> dict:
    """The config as saved: `dtype` is what the tensors are stored in now (a `.half()` or `.to()`
    after attach changes it), so load recreates them in that dtype."""
    d = state.cfg.to_dict()
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) == 1:
        d["dtype"] = str(dtypes.pop()).removeprefix("torch.")
    return d


def _full_adapter_tensors(state) -> dict[str, torch.Tensor]:
    """{file key: the whole adapter tensor on the CPU}. A tensor sharded by FSDP2 (a DTensor) is
    all-gathered with `full_tensor()`, a collective: every rank must get here, and all ranks
    gather the same tensors in the same order (targets in model order, then spec order)."""
    tensors = {}
    for name, layer in state.targets.items():
        for pname in state.specs[name]:
            t = getattr(layer, pname).detach()
            if isinstance(t, DTensor):
                t = t.full_tensor()
            tensors[f"{name}.{pname}"] = t.to("cpu").contiguous()
    return tensors


def _is_writer() -> bool:
    """Rank 0 of an initialised process group, or a process outside any group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
    found, absent = named_linear_layers(model, names)
    if absent:
        raise CheckpointError(
            f"{path}: {len(absent)} target(s) are not linear layers of this model, e.g. "
            f"{absent[:3]}; was the adapter trained on another architecture?"
        )
    layers = dict(found)
    targets = [(n, layers[n]) for n in names]  # the saved order
    try:
        validate(model, variant, cfg, targets)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: the saved {cfg.variant!r} adapter does not fit this model: {e}") from None

    expected = {}
    for name, layer in targets:
        for pname, spec in variant.param_specs(layer.in_features, layer.out_features, cfg).items():
            expected[f"{name}.{pname}"] = tuple(spec.shape)
    trainable = _check_trainable(path, model, meta, tensors, cfg, targets)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - {BASE + n for n in trainable})
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
        warnings.warn(
            f"{path}: the base weights of {len(differ)} target(s) (e.g. {differ[0]}) differ from "
            f"the base the adapter was saved from; the adapter's change is applied as saved, but "
            f"outputs will differ from the saved model's",
            stacklevel=2,
        )

    def fill(name, layer, specs):
        for pname in specs:
            getattr(layer, pname).copy_(tensors[f"{name}.{pname}"])

    values = {n: tensors[BASE + n] for n in trainable}
    install(model, cfg, variant, targets, fill, fingerprints=now, trainable_values=values)


def _trainable_tensors(model: nn.Module, state) -> dict[str, torch.Tensor]:
    """The trained parameters of `trainable_modules`, keyed "base.<parameter name>"."""
    return {BASE + n: model.get_parameter(n).detach().to("cpu").contiguous() for n in state.originals}


def _check_trainable(path, model, meta, tensors, cfg, targets) -> list[str]:
    """Names of the stored trainable base parameters, checked against what `trainable_modules`
    selects on this model (same names, shapes and dtypes); CheckpointError otherwise."""
    names = _parse_json(path, meta, "trainable", list) if "trainable" in meta else []
    if not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: metadata 'trainable' must be a JSON list of strings")
    params = trainable_params(model, cfg, targets)
    if set(names) != set(params):
        raise CheckpointError(
            f"{path}: trainable_modules={cfg.trainable_modules} select {sorted(params)[:5]} on this "
            f"model, the file holds {sorted(names)[:5]}"
        )
    for n in names:
        if BASE + n not in tensors:
            raise CheckpointError(f"{path}: the trained base parameter {BASE + n} is missing")
        file_shape, file_dtype = tuple(tensors[BASE + n].shape), tensors[BASE + n].dtype
        p = params[n]
        if file_shape != tuple(p.shape) or file_dtype != p.dtype:
            raise CheckpointError(
                f"{path}: {BASE + n} is {file_dtype} {file_shape}, this model's {n} is "
                f"{p.dtype} {tuple(p.shape)}"
            )
    return names


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and every tensor, read once into memory; CheckpointError if the file is
    unreadable, not a lora-lite checkpoint, of an unknown version, or holds a dtype we never write."""
    return _open(path, lambda f: {key: f.get_tensor(key) for key in f.keys()})


def _read_header(path: str) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """Metadata and {key: (shape, dtype)} without reading tensor data (`lora-lite inspect`); the
    same checks as `_read` but no integrity check, which needs the data."""
    def shapes(f):
        return {key: (tuple(f.get_slice(key).get_shape()), _DTYPE_CODES[f.get_slice(key).get_dtype()]) for key in f.keys()}

    return _open(path, shapes)


def _open(path: str, read):
    """(metadata, read(handle)) of a lora-lite checkpoint of a readable version whose tensors
    all have allowed dtypes; CheckpointError otherwise."""
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
            return meta, read(f)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt/truncated/empty files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


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
