"""save / load: adapter tensors + metadata in one safetensors file.

File layout: tensors named "<target module>.<lora_name>" (never a frozen base weight) and string
metadata: format, format_version, library_version, variant, config (JSON of cfg.to_dict()),
targets (JSON list) and fingerprints (JSON {target: sketch of the pristine base layer, see
fingerprint.py}). With `trainable_modules`, their parameters are stored as "base.<parameter
name>" and listed in the metadata "trainable" (JSON list; absent = none).

load() rebuilds the adapted model on a pristine base from the file alone: no calibration
data, no data-dependent init (frozen SVD factors and initial factors are in the file). Everything is checked before the model is touched; metadata is parsed as
data (JSON, dtype names through an allow-list), nothing is executed or unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .config import AdapterConfig
from .fingerprint import fingerprint, same_base
from .runtime import ensure_free, install, state_of, trainable_params, validate, variant_of
from .targets import is_linear_like

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing can be sharded
    DTensor = ()

FORMAT = "lora-lite"
FORMAT_VERSION = "1"
BASE = "base."  # key prefix of trained base parameters; adapter keys end in ".lora_*"


class CheckpointError(ValueError):
    """A file that is not a readable lora-lite checkpoint, or that does not fit this model."""


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the attached adapter to `path` atomically (temp file in the same folder + rename).

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
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "variant": state.cfg.variant,
        "config": json.dumps(_stored_config(state, tensors)),
        "targets": json.dumps(list(state.targets)),
        "fingerprints": json.dumps(state.fingerprints),
    }
    tensors.update(_trainable_tensors(model, state))
    if state.originals:
        metadata["trainable"] = json.dumps(list(state.originals))
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
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


def load(model: nn.Module, path: str | os.PathLike) -> None:
    """Attach the adapter saved at `path` to a pristine `model`, exactly as it was saved."""
    path = os.fspath(path)
    ensure_free(model)
    meta, shapes = _read_header(path)
    cfg = _parse_config(path, meta)
    variant = variant_of(cfg)
    names = _parse_json(path, meta, "targets", list)
    fps = _parse_json(path, meta, "fingerprints", dict)
    modules = dict(model.named_modules())
    absent = [n for n in names if not (n in modules and is_linear_like(modules[n]))]
    if absent:
        raise CheckpointError(
            f"{path}: {len(absent)} target(s) are not linear layers of this model, e.g. "
            f"{absent[:3]}; was the adapter trained on another architecture?"
        )
    targets = [(n, modules[n]) for n in names]
    validate(model, variant, cfg, targets)

    expected = {}
    for name, layer in targets:
        for pname, spec in variant.param_specs(layer.in_features, layer.out_features, cfg).items():
            expected[f"{name}.{pname}"] = tuple(spec.shape)
    trainable = _check_trainable(path, model, meta, shapes, cfg, targets)
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected) - {BASE + n for n in trainable})
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tensors do not match a {cfg.variant!r} adapter on these targets: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    for key, shape in expected.items():
        file_shape, file_dtype = shapes[key]
        if file_shape != shape:
            raise CheckpointError(f"{path}: {key} has shape {file_shape}, this model needs {shape}")
        if file_dtype != cfg.dtype:
            raise CheckpointError(f"{path}: {key} is {file_dtype}, the config says {cfg.dtype}")

    now = {n: fingerprint(m) for n, m in targets}
    differ = [n for n in names if not same_base(fps.get(n), now[n])]
    if differ:
        warnings.warn(
            f"{path}: the base weights of {len(differ)} target(s) (e.g. {differ[0]}) differ from "
            f"the base the adapter was saved from; the adapter's change is applied as saved, but "
            f"outputs will differ from the saved model's",
            stacklevel=2,
        )

    with safe_open(path, framework="pt") as f:

        def fill(name, layer, specs):
            for pname in specs:
                getattr(layer, pname).copy_(f.get_tensor(f"{name}.{pname}"))

        values = {n: f.get_tensor(BASE + n) for n in trainable}
        install(model, cfg, variant, targets, fill, fingerprints=now, trainable_values=values)


def _trainable_tensors(model: nn.Module, state) -> dict[str, torch.Tensor]:
    """The trained parameters of `trainable_modules`, keyed "base.<parameter name>"."""
    return {BASE + n: model.get_parameter(n).detach().to("cpu").contiguous() for n in state.originals}


def _check_trainable(path, model, meta, shapes, cfg, targets) -> list[str]:
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
        if BASE + n not in shapes:
            raise CheckpointError(f"{path}: the trained base parameter {BASE + n} is missing")
        file_shape, file_dtype = shapes[BASE + n]
        p = params[n]
        if file_shape != tuple(p.shape) or file_dtype != p.dtype:
            raise CheckpointError(
                f"{path}: {BASE + n} is {file_dtype} {file_shape}, this model's {n} is "
                f"{p.dtype} {tuple(p.shape)}"
            )
    return names


def _read_header(path: str) -> tuple[dict[str, str], dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """Metadata and {key: (shape, dtype)} without reading tensor data; CheckpointError if unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            shapes = {}
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = (tuple(sl.get_shape()), _DTYPE_CODES.get(sl.get_dtype()))
    except Exception as e:  # safetensors raises its own error types for corrupt/truncated/empty files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a lora-lite checkpoint (metadata format={meta.get('format')!r})"
        )
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')!r} is not supported "
            f"by lora-lite {__version__} (reads version {FORMAT_VERSION})"
        )
    return meta, shapes


_DTYPE_CODES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _parse_json(path: str, meta: dict[str, str], key: str, kind: type):
    try:
        value = json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as e:
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
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: invalid adapter config in metadata: {e}") from None
