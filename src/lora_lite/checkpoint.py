"""save / load: adapter tensors + metadata in one safetensors file.

File layout: tensors named "<target module>.<lora_name>" (never a frozen base weight) and string
metadata: format, format_version, library_version, variant, config (JSON of cfg.to_dict()),
targets (JSON list), fingerprints (JSON {target: sketch of the pristine base layer, see
fingerprint.py}), sha256 (JSON {tensor: sha256 of its raw bytes}) and metadata_sha256 (sha256
of the canonical JSON of every other metadata entry). With `trainable_modules`, their
parameters are stored as "base.<parameter name>" and listed in the metadata "trainable" (JSON
list; absent = none). A tensor shared by all targets (ParamSpec shared=True) is stored once, as
"shared.<lora_name>", and listed in the metadata "shared" (JSON list; absent = none). The
metadata "name" is the adapter of its model the file holds (an identifier; absent = the default
adapter); tensors are stored under their `lora_*` names whatever the adapter's name.

An adapter is data: `read(path)` returns an `Adapter` (config, targets, tensors per target,
trained base parameters, fingerprints, format version) after reading the file once, into
memory, and checking integrity (every hash; a flipped bit anywhere in the payload or the
metadata is refused, not read as a slightly different adapter), finiteness and consistency
(every tensor belongs to a target or is a trained base parameter). `load`, `lora-lite inspect`
and the PEFT exporter take that `Adapter`; the PEFT importer produces one. `load(model, path or
Adapter)` then checks the fit (targets, tensor names, shapes, dtypes, trained base parameters,
base fingerprints) before the model is touched, and fills it from those same in-memory tensors:
no calibration data, no data-dependent init (frozen SVD factors and initial factors are in
the file). Metadata is parsed as data (JSON, dtype names through an allow-list), nothing is
executed or unpickled.

Every file the library writes goes through `write_atomic`: a new file in the same folder
(permissions from the umask, as a plain `open()` gives), fsync, then a rename over the target.
"""

from __future__ import annotations

import dataclasses
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

from dataclasses import dataclass, field

from ._version import __version__
from .config import AdapterConfig
from .fingerprint import fingerprint, same_base
from .kinds import KINDS, kind_of
from .runtime import (
    DEFAULT, ensure_free, install, layer_specs, shared_specs, state_of, trainable_params, unwrap, validate, variant_of,
)
from .targets import targets_by_name

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support: nothing can be sharded
    DTensor = ()

FORMAT = "lora-lite"
FORMAT_VERSION = "2"
READABLE_VERSIONS = (FORMAT_VERSION,)
# safetensors names of the config dtype allow-list
_DTYPE_CODES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
BASE = "base."  # key prefix of trained base parameters; adapter keys end in ".lora_*"
SHARED = "shared."  # key prefix of the tensors shared by all targets


class CheckpointError(ValueError):
    """A file that is not a readable lora-lite checkpoint, or that does not fit this model."""


@dataclass
class Adapter:
    """An adapter as data: what a checkpoint holds, verified; what `load` and the exporters take.

    tensors: {target module name: {"lora_*": tensor}}, targets in model order.
    shared: {"lora_*": tensor} shared by all targets (ParamSpec shared=True), stored once.
    trainable: {base parameter name: trained value} of `trainable_modules` (empty if none).
    fingerprints: {target: sketch of the base layer it was made on} (fingerprint.py); None when
    unknown (an imported PEFT adapter), which skips the different-base warning.
    kinds: {target: layer kind} (kinds.py) of the targets that are not nn.Linear ("conv1d",
    "embedding", "fused"): exporters name their tensors by kind.
    name: the adapter of its model it was saved from (runtime.DEFAULT: the one-adapter API's);
    `load` attaches it under this name unless told another.
    """

    config: AdapterConfig
    tensors: dict[str, dict[str, torch.Tensor]]
    trainable: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprints: dict[str, dict] | None = None
    kinds: dict[str, str] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)
    format_version: str = FORMAT_VERSION
    library_version: str = __version__
    source: str = "<memory>"                    # the file it was read from, for messages
    name: str = DEFAULT

    @property
    def variant(self) -> str:
        return self.config.variant

    @property
    def targets(self) -> list[str]:
        return list(self.tensors)


def save(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> None:
    """Write the attached adapter (`name`, or the only one) to `path` atomically
    (`write_atomic`): on any failure the previous file at `path`, if any, is left as it was.
    The file records the adapter's name.

    Distributed: when torch.distributed is initialised, only global rank 0 writes; the other
    ranks return without writing. Adapter tensors sharded by FSDP2 (DTensors) are gathered
    first with collectives, so under FSDP2 call `save` on every rank (on rank 0 alone it would
    hang). With replicated tensors (DDP) no collective runs, so rank 0 alone may call it. `save`
    holds no barrier: ranks that read the file afterwards call `dist.barrier()` first.
    """
    adapter = adapter_of(model, name)
    if _is_writer():
        write(adapter, path)


def adapter_of(model: nn.Module, name: str | None = None) -> Adapter:
    """The adapter attached to `model` (`name`, or the only one) as data (tensors gathered to
    the CPU; a collective under FSDP2, see `save`)."""
    model = unwrap(model)
    state = state_of(model, name)
    state.cfg.to_dict()  # a coefficient tensor in the config raises here, before any collective
    tensors = _full_adapter_tensors(state)
    shared = {p: _on_cpu(t) for p, t in state.shared.items()}
    return Adapter(
        config=_stored_config(state, {**tensors, SHARED: shared}),
        tensors=tensors,
        shared=shared,
        trainable={n: model.get_parameter(n).detach().to("cpu").contiguous() for n in state.originals},
        fingerprints=state.fingerprints,
        kinds={n: k for n, m in state.targets.items() if (k := kind_of(m)) != "linear"},
        name=state.name,
    )


def write(adapter: Adapter, path: str | os.PathLike) -> None:
    """Write `adapter` as a lora-lite checkpoint (safetensors + hashed metadata) at `path`."""
    tensors = {f"{name}.{p}": t for name, per in adapter.tensors.items() for p, t in per.items()}
    tensors.update({SHARED + p: t for p, t in adapter.shared.items()})
    tensors.update({BASE + n: t for n, t in adapter.trainable.items()})
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
        "variant": adapter.variant,
        "config": json.dumps(adapter.config.to_dict()),
        "targets": json.dumps(adapter.targets),
        "fingerprints": json.dumps(adapter.fingerprints or {}),
        "sha256": json.dumps({key: _digest(t) for key, t in tensors.items()}),
    }
    if adapter.trainable:
        metadata["trainable"] = json.dumps(list(adapter.trainable))
    if adapter.shared:
        metadata["shared"] = json.dumps(list(adapter.shared))
    if adapter.kinds:  # an exporter without the model needs them (PEFT's names differ per kind)
        metadata["kinds"] = json.dumps(adapter.kinds)
    if adapter.name != DEFAULT:  # absent: the default adapter
        metadata["name"] = adapter.name
    metadata["metadata_sha256"] = _metadata_digest(metadata)
    write_atomic(path, serialize(tensors, metadata=metadata))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically: a new temp file in the same folder (permissions from
    the umask, like a plain `open()`; a mkstemp file would be 0600), flushed and fsynced, then
    renamed over `path`. On any failure the temp file is removed and `path` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(errno.ENOENT, f"cannot write there, no folder {folder!r}", path)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        _write_new(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_new(tmp: str, data: bytes) -> None:
    """A new file (permissions from the umask), flushed to disk."""
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _stored_config(state, tensors: dict[str, dict[str, torch.Tensor]]) -> AdapterConfig:
    """The config as saved: `dtype` is what the tensors are stored in now (a `.half()` or `.to()`
    after attach changes it), so load recreates them in that dtype."""
    dtypes = {t.dtype for per in tensors.values() for t in per.values()}
    if len(dtypes) == 1:
        return dataclasses.replace(state.cfg, dtype=dtypes.pop())
    return state.cfg


def _full_adapter_tensors(state) -> dict[str, dict[str, torch.Tensor]]:
    """{target: {tensor name: the whole adapter tensor on the CPU}}. A tensor sharded by FSDP2
    (a DTensor) is all-gathered with `full_tensor()`, a collective: every rank must get here,
    and all ranks gather the same tensors in the same order (targets in model order, then spec
    order)."""
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name, layer in state.targets.items():
        for pname, spec in state.specs[name].items():
            if not spec.shared:  # stored once, apart (adapter_of)
                tensors.setdefault(name, {})[pname] = _on_cpu(getattr(layer, pname))
    return tensors


def _on_cpu(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor, detached, contiguous, on the CPU (a DTensor gathered: a collective)."""
    t = t.detach()
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.to("cpu").contiguous()


def _is_writer() -> bool:
    """Rank 0 of an initialised process group, or a process outside any group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def read(path: str | os.PathLike) -> Adapter:
    """The adapter saved at `path`, verified: integrity (metadata and per-tensor sha256),
    finiteness, a valid config, and every tensor belonging to a listed target (as
    `<target>.lora_*`) or to a listed trained base parameter (`base.<name>`). Reads the file
    once; CheckpointError for anything else."""
    path = os.fspath(path)
    meta, stored = _read(path)
    _verify(path, meta, stored)
    cfg = _parse_config(path, meta)
    names = _parse_json(path, meta, "targets", list)
    if not names or not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise CheckpointError(f"{path}: metadata 'targets' must be a non-empty list of distinct names")
    fps = _parse_json(path, meta, "fingerprints", dict)
    trained = _parse_json(path, meta, "trainable", list) if "trainable" in meta else []
    if not all(isinstance(n, str) for n in trained):
        raise CheckpointError(f"{path}: metadata 'trainable' must be a JSON list of strings")
    shared_names = _parse_json(path, meta, "shared", list) if "shared" in meta else []
    if not all(isinstance(n, str) and n.startswith("lora_") for n in shared_names):
        raise CheckpointError(f"{path}: metadata 'shared' must be a JSON list of lora_* names")
    tensors: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    trainable: dict[str, torch.Tensor] = {}
    shared: dict[str, torch.Tensor] = {}
    for key, t in stored.items():
        if key.startswith(BASE) and key[len(BASE):] in trained:
            trainable[key[len(BASE):]] = t
            continue
        if key.startswith(SHARED) and key[len(SHARED):] in shared_names:
            shared[key[len(SHARED):]] = t
            continue
        name, _, pname = key.rpartition(".")
        if name not in tensors or not pname.startswith("lora_"):
            raise CheckpointError(
                f"{path}: tensor {key!r} belongs to no target listed in the metadata and is no trained "
                f"base parameter; the file was not written by lora-lite or was edited"
            )
        tensors[name][pname] = t
    empty = [n for n, per in tensors.items() if not per]
    if empty:
        raise CheckpointError(f"{path}: target(s) {empty[:3]} have no adapter tensors")
    missing = [n for n in trained if n not in trainable]
    if missing:
        raise CheckpointError(f"{path}: the trained base parameter {BASE + missing[0]} is missing")
    missing = [n for n in shared_names if n not in shared]
    if missing:
        raise CheckpointError(f"{path}: the shared tensor {SHARED + missing[0]} is missing")
    trainable = {n: trainable[n] for n in trained}  # the saved (model) order
    kinds = _parse_json(path, meta, "kinds", dict) if "kinds" in meta else {}
    if not set(kinds) <= set(names) or not set(kinds.values()) <= set(KINDS):
        raise CheckpointError(f"{path}: metadata 'kinds' must map listed targets to one of {KINDS}")
    name = meta.get("name", DEFAULT)
    if not name.isidentifier() or name == DEFAULT and "name" in meta:
        raise CheckpointError(f"{path}: metadata 'name' must be an identifier other than {DEFAULT!r}, got {name!r}")
    return Adapter(config=cfg, tensors=tensors, trainable=trainable, fingerprints=fps, kinds=kinds, shared=shared,
                   format_version=meta["format_version"],
                   library_version=str(meta.get("library_version", "?")), source=path, name=name)


def load(model: nn.Module, source: str | os.PathLike | Adapter, name: str | None = None) -> None:
    """Attach the adapter saved at `source` (a file, or an `Adapter` from `read` or an
    importer) to a pristine `model`, exactly as it was saved (returns None; no wrapper), under
    `name` (default: the name the file records; a name already attached is refused).

    The file is read and verified (`ll.read`: hashes, config, tensor names, shapes, dtypes), then
    everything `ll.attach` does happens, with the saved tensors in place of an init: the
    `lora_*` tensors are registered on the saved targets, every base parameter is frozen, the
    adapter's trainable tensors (and the `trainable_modules` parameters, set to their saved
    values) get `requires_grad=True`, and the hooks go on. No calibration data is needed: a
    data-driven variant's statistics live in its saved tensors. The loaded model computes what
    the saved one did; to train further, build the optimizer after `load`; for inference only,
    `model.requires_grad_(False)`.

    Raises, before the model is changed:
      RuntimeError     the model already has an adapter of that name (`ll.detach` it first);
      CheckpointError  (a ValueError) a file that is not a readable lora-lite checkpoint, or one
                       that does not fit this model: a target it lacks (another architecture or
                       model class), a layer of another kind, shapes or dtypes that differ, the
                       `trainable_modules` it saved not found.
    Warns (UserWarning) when the base weights differ from those the adapter was saved on (the
    checkpoint's fingerprints): the change is applied as saved, but outputs will differ.

    Example:
        >>> ll.save(model, "adapter.safetensors")
        >>> base = AutoModelForCausalLM.from_pretrained(name)   # a pristine base
        >>> ll.load(base, "adapter.safetensors")                # base now computes what model did
    """
    model = unwrap(model)
    if name is not None:
        ensure_free(model, name)
    adapter = source if isinstance(source, Adapter) else read(source)
    as_name = adapter.name if name is None else name
    ensure_free(model, as_name)
    where, cfg = adapter.source, adapter.config
    variant = variant_of(cfg)
    names = adapter.targets
    found, absent = targets_by_name(model, names)
    if absent:
        raise CheckpointError(
            f"{where}: {len(absent)} target(s) are not adaptable layers of this model, e.g. "
            f"{absent[:3]}; was the adapter made on another architecture, or for another model class "
            f"(AutoModelForCausalLM and AutoModel name their modules differently)?"
        )
    targets = found  # model order (an imported adapter lists them in its file's order)
    for name, layer in targets:
        saved_kind, kind = adapter.kinds.get(name, "linear"), kind_of(layer)
        if saved_kind != kind and {saved_kind, kind} != {"linear", "conv1d"}:  # same tensors for these two
            article = "an" if saved_kind[0] in "aeiou" else "a"
            raise CheckpointError(f"{where}: {name} is a {kind} layer here, the adapter was made for {article} {saved_kind} one")
    try:
        validate(model, variant, cfg, targets, adapter=as_name)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: the saved {cfg.variant!r} adapter does not fit this model: {e}") from None

    all_specs = {name: layer_specs(variant.at_target(name, cfg), layer, cfg) for name, layer in targets}
    for name, layer in targets:
        specs = {p: s for p, s in all_specs[name].items() if not s.shared}
        have = adapter.tensors[name]
        missing, unexpected = sorted(set(specs) - set(have)), sorted(set(have) - set(specs))
        if missing or unexpected:
            raise CheckpointError(
                f"{where}: tensors do not match a {cfg.variant!r} adapter on these targets: "
                f"missing {[f'{name}.{p}' for p in missing][:5]}, unexpected {[f'{name}.{p}' for p in unexpected][:5]}"
            )
        for pname, spec in specs.items():
            t = have[pname]
            if tuple(t.shape) != tuple(spec.shape):
                raise CheckpointError(
                    f"{where}: {name}.{pname} has shape {tuple(t.shape)}, this model needs {tuple(spec.shape)}"
                )
            if t.dtype != cfg.dtype:
                raise CheckpointError(f"{where}: {name}.{pname} is {t.dtype}, the config says {cfg.dtype}")
    group = shared_specs(all_specs)
    if set(group) != set(adapter.shared):
        raise CheckpointError(f"{where}: a {cfg.variant!r} adapter on these targets shares {sorted(group)}, "
                              f"the file holds {sorted(adapter.shared)}")
    for pname, spec in group.items():
        t = adapter.shared[pname]
        if tuple(t.shape) != tuple(spec.shape) or t.dtype != cfg.dtype:
            raise CheckpointError(f"{where}: {SHARED + pname} is {t.dtype} {tuple(t.shape)}, these targets need "
                                  f"{cfg.dtype} {tuple(spec.shape)}")
    _check_trainable(where, model, adapter, cfg, targets)

    now = {n: fingerprint(m) for n, m in targets}
    if adapter.fingerprints is not None:
        differ = [n for n in names if not same_base(adapter.fingerprints.get(n), now[n])]
        if differ:
            warnings.warn(
                f"{where}: the base weights of {len(differ)} target(s) (e.g. {differ[0]}) differ from "
                f"the base the adapter was saved from; the adapter's change is applied as saved, but "
                f"outputs will differ from the saved model's",
                stacklevel=2,
            )

    def fill(name, layer, specs):
        for pname in specs:
            getattr(layer, pname).copy_(adapter.tensors[name][pname])

    def fill_shared(shared, specs):
        for pname, t in shared.items():
            t.copy_(adapter.shared[pname])

    install(model, cfg, variant, targets, fill, fingerprints=now, trainable_values=adapter.trainable,
            fill_shared=fill_shared, name=as_name)


def _check_trainable(where, model, adapter: Adapter, cfg, targets) -> None:
    """The stored trained base parameters against what `trainable_modules` selects on this
    model (same names, shapes and dtypes); CheckpointError otherwise."""
    params = trainable_params(model, cfg, targets)
    if set(adapter.trainable) != set(params):
        raise CheckpointError(
            f"{where}: trainable_modules={cfg.trainable_modules} select {sorted(params)[:5]} on this "
            f"model, the file holds {sorted(adapter.trainable)[:5]}"
        )
    for n, t in adapter.trainable.items():
        p = params[n]
        if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype:
            raise CheckpointError(
                f"{where}: {BASE + n} is {t.dtype} {tuple(t.shape)}, this model's {n} is "
                f"{p.dtype} {tuple(p.shape)}"
            )


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and every tensor, read once into memory; CheckpointError if the file is
    unreadable, not a lora-lite checkpoint, of an unknown version, or holds a dtype we never write."""
    return _open(path, lambda f: {key: f.get_tensor(key) for key in f.keys()})


def _open(path: str, read):
    """(metadata, read(handle)) of a lora-lite checkpoint of a readable version whose tensors
    all have allowed dtypes; CheckpointError otherwise."""
    if not os.path.isfile(path):
        peft = os.path.join(path, "adapter_config.json")
        if os.path.isfile(peft):
            raise CheckpointError(f"{path}: {_PEFT_HINT}")
        raise CheckpointError(f"{path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
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
    except CheckpointError as e:
        if os.path.isfile(os.path.join(os.path.dirname(path) or ".", "adapter_config.json")):
            raise CheckpointError(f"{e}; its folder holds adapter_config.json: {_PEFT_HINT}") from None
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt/truncated/empty files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


_PEFT_HINT = ("an HF PEFT adapter folder (adapter_config.json), not a lora-lite checkpoint: convert it "
              "with ll.import_peft(model, folder), or on the command line `lora-lite import-peft "
              "FOLDER OUT.safetensors --base-model BASE`")


def _verify(path: str, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """Integrity (metadata and per-tensor sha256) and finiteness, before anything else is read."""
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


def swap(model: nn.Module, source: str | os.PathLike | Adapter) -> None:
    """Put the tensors saved at `source` (a file or an `Adapter`) into the adapter attached to
    `model`, in place: the same variant, config, targets, tensor shapes and dtypes, new values.

    No re-attach: hooks, parameter objects (and so a `torch.compile`d model's graphs, which
    take the tensors as inputs) stay, so serving can change adapters without recompiling. The
    values of `trainable_modules` parameters are swapped too. An optimizer's state still
    refers to the previous values: make a new optimizer to train on.

        ll.load(model, "a.safetensors"); compiled = torch.compile(model)
        ll.swap(model, "b.safetensors")            # compiled now computes with b

    Raises CheckpointError before any value changes when the file does not fit: another
    variant, a config that differs in anything but the dtype and the fields that chose the
    targets (naming the fields), other targets,
    tensor names, shapes or dtypes, or other trainable base parameters. Warns, as `load`
    does, when the file's recorded base differs from this model's."""
    model = unwrap(model)
    state = state_of(model)
    adapter = source if isinstance(source, Adapter) else read(source)
    where = adapter.source
    have, want = state.cfg.to_dict(), adapter.config.to_dict()
    chosen = ("dtype", "target_names", "target_roles", "exclude_names", "layers", "target_parameters")
    differ = sorted(k for k in have.keys() | want.keys() if k not in chosen and have.get(k) != want.get(k))
    if differ:
        raise CheckpointError(
            f"{where}: swap needs the attached adapter's config, but "
            + ", ".join(f"{k} is {want.get(k)!r} in the file, {have.get(k)!r} here" for k in differ[:4])
            + "; set run-time fields with lora_lite.reconfigure first, or detach and load"
        )
    if list(adapter.tensors) != list(state.targets):
        missing = sorted(set(state.targets) - set(adapter.tensors))
        extra = sorted(set(adapter.tensors) - set(state.targets))
        raise CheckpointError(f"{where}: swap needs the same targets; the file lacks {missing[:3]} and adds {extra[:3]}")
    for name, layer in state.targets.items():
        own = [p for p, spec in state.specs[name].items() if not spec.shared]
        if set(adapter.tensors[name]) != set(own):
            raise CheckpointError(f"{where}: {name} holds {sorted(adapter.tensors[name])}, the adapter {sorted(own)}")
        for pname in own:
            live, new = getattr(layer, pname), adapter.tensors[name][pname]
            if new.shape != live.shape or new.dtype != live.dtype:
                raise CheckpointError(
                    f"{where}: {name}.{pname} is {tuple(new.shape)} {new.dtype} in the file, "
                    f"{tuple(live.shape)} {live.dtype} here"
                )
            if isinstance(live, DTensor):
                raise CheckpointError(f"{where}: {name}.{pname} is sharded (FSDP2); swap before sharding, or load")
    if set(adapter.shared) != set(state.shared) or any(
            adapter.shared[p].shape != t.shape or adapter.shared[p].dtype != t.dtype for p, t in state.shared.items()):
        raise CheckpointError(f"{where}: the shared tensors differ from the adapter's ({sorted(state.shared)})")
    params = {n: model.get_parameter(n) for n in state.originals}
    if set(adapter.trainable) != set(params) or any(
            adapter.trainable[n].shape != p.shape or adapter.trainable[n].dtype != p.dtype for n, p in params.items()):
        raise CheckpointError(
            f"{where}: swap needs the same trainable base parameters ({sorted(params)[:3]}), with the same "
            f"shapes and dtypes; the file has {sorted(adapter.trainable)[:3]}"
        )
    if adapter.fingerprints is not None:
        differ = [n for n in state.targets if not same_base(adapter.fingerprints.get(n), state.fingerprints.get(n))]
        if differ:
            warnings.warn(
                f"{where}: the base weights of {len(differ)} target(s) (e.g. {differ[0]}) differ from the "
                f"base the adapter was saved from; its change is applied as saved", stacklevel=2,
            )
    with torch.no_grad():
        for name, layer in state.targets.items():
            for pname in adapter.tensors[name]:
                getattr(layer, pname).copy_(adapter.tensors[name][pname])
        for pname, t in state.shared.items():
            t.copy_(adapter.shared[pname])
        for n, p in params.items():
            p.copy_(adapter.trainable[n])
