"""What the `lora-lite` commands run: inspect, export-peft, import-peft (the demo is
`lora_lite.demo`). Their arguments are parsed in `lora_lite_cli` (no torch import), which
calls `inspect(args)`, `export(args)`, `import_(args)` here; `main` is that entry point.

import-peft loads the base model because a lora-lite checkpoint records fingerprints of the base
weights it was made on (load warns when they differ); the conversion itself reads only the PEFT
directory and goes through `ll.import_peft`, so it refuses exactly what that refuses.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter

from lora_lite_cli import MODEL_CLASSES, main  # noqa: F401  (main: `python -m lora_lite.cli`)


# ---- inspect ------------------------------------------------------------------------------------

def describe(path: str) -> dict:
    """A lora-lite checkpoint's contents (`ll.read`: hashes verified), no model loaded.
    Raises CheckpointError for anything that is not a valid lora-lite checkpoint."""
    from .checkpoint import BASE, SHARED, read
    from .runtime import variant_of

    adapter = read(path)
    cfg = adapter.config
    variant = variant_of(cfg)
    fingerprints = adapter.fingerprints or {}
    trainable, groups = 0, {}
    items = [(name, pname, pname, t) for name, per in adapter.tensors.items() for pname, t in per.items()]
    first = adapter.targets[0]  # a shared tensor's spec: as any target declares it
    items += [(first, p, SHARED + p, t) for p, t in adapter.shared.items()]
    items += [(None, None, BASE + n, t) for n, t in adapter.trainable.items()]
    for name, pname, key, t in items:
        shape, dtype = tuple(t.shape), t.dtype
        spec = None
        if name is not None:
            # the base weight's shape, its last two dims (a fused parameter's are one expert's)
            d_out, d_in = ((fingerprints.get(name) or {}).get("weight") or {}).get("shape", [None, None])[-2:]
            spec = variant.at_target(name, cfg).param_specs(d_in, d_out, cfg).get(pname) if d_in else None
        if spec is not None and spec.trainable:
            trainable += t.numel()
        # key: "lora_*" grouped over targets; "shared.lora_*" and "base.<parameter>" one each
        g = groups.setdefault(key, {"shapes": Counter(), "dtype": set(), "trainable": None, "count": 0})
        g["shapes"][shape] += 1
        g["dtype"].add(str(dtype).removeprefix("torch."))
        g["trainable"] = True if name is None else (None if spec is None else spec.trainable)
        g["count"] += 1
    trainable += sum(t.numel() for t in adapter.trainable.values())
    return {
        "file": path,
        "bytes": os.path.getsize(path),
        "format_version": adapter.format_version,
        "library_version": adapter.library_version,
        "variant": cfg.variant,
        "config": cfg.to_dict(),
        "targets": adapter.targets,
        "target_patterns": _patterns(adapter.targets),
        "tensors": {
            p: {"count": g["count"], "shapes": {"x".join(map(str, s)): c for s, c in g["shapes"].items()},
                "dtype": "/".join(sorted(g["dtype"])), "trainable": g["trainable"]}
            for p, g in groups.items()
        },
        "stored_parameters": sum(t.numel() for *_, t in items),
        "trainable_parameters": trainable,
    }


def _patterns(names: list[str]) -> list[str]:
    """Target names with block indices folded: 'model.layers.{0-3}.self_attn.q_proj'."""
    groups: dict[str, list[int]] = {}
    for n in names:
        m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", n)
        if m is None:
            groups.setdefault(n, [])
            continue
        key = n[: m.start(1)] + "{}" + n[m.end(1):]
        groups.setdefault(key, []).append(int(m.group(1)))
    out = []
    for key, idx in groups.items():
        if not idx:
            out.append(key)
            continue
        idx = sorted(set(idx))
        span = f"{idx[0]}-{idx[-1]}" if idx == list(range(idx[0], idx[-1] + 1)) and len(idx) > 1 else ",".join(map(str, idx))
        out.append(key.replace("{}", "{" + span + "}" if len(idx) > 1 else span))
    return out


def _print_description(d: dict) -> None:
    cfg = d["config"]
    kb = d["bytes"] / 1024
    print(f"file        {d['file']} ({kb:,.1f} KiB)")
    print(f"written by  lora-lite {d['library_version']} (checkpoint format {d['format_version']})")
    print(f"variant     {d['variant']}")
    print("config      " + ", ".join(f"{k}={v}" for k, v in cfg.items() if k not in ("variant",)))
    pats = d["target_patterns"]
    shown = ", ".join(pats[:6]) + (f", ... ({len(pats) - 6} more patterns)" if len(pats) > 6 else "")
    print(f"targets     {len(d['targets'])}: {shown}")
    print("tensors")
    for p, t in d["tensors"].items():
        kind = {True: "trainable", False: "frozen", None: "?"}[t["trainable"]]
        shapes = ", ".join(f"{tuple(int(n) for n in s.split('x'))} x{c}" for s, c in t["shapes"].items())
        label = p if p.startswith(("base.", "shared.")) else f"<target>.{p}"
        print(f"  {label:27s} {shapes}  {t['dtype']}  {kind}")
    print(f"parameters  {d['trainable_parameters']:,} trainable of {d['stored_parameters']:,} stored")


def inspect(args) -> int:
    d = describe(args.path)
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print_description(d)
    return 0


# ---- PEFT ---------------------------------------------------------------------------------------

def export(args) -> int:
    from .interop.peft import export_peft_file

    fields = export_peft_file(args.adapter, args.out_dir)
    rank = f", r={fields['r']}" if "r" in fields else ""
    on = [f"{len(fields.get(k) or [])} {what}" for k, what in (("target_modules", "modules"),
                                                                ("target_parameters", "parameters"))
          if fields.get(k)]
    print(f"wrote {args.out_dir}: PEFT {fields['peft_type']}{rank} on {' and '.join(on)}")
    return 0


def _has_target_parameters(peft_dir: str) -> bool:
    try:
        with open(os.path.join(peft_dir, "adapter_config.json")) as f:
            return bool(json.load(f).get("target_parameters"))
    except (OSError, ValueError, AttributeError):
        return False  # read_peft names what is wrong with the folder


def import_(args) -> int:
    import transformers

    import lora_lite as ll
    from lora_lite.interop.peft import read_peft
    from lora_lite.runtime import state_of

    if not _has_target_parameters(args.peft_dir):  # those need the model to be read
        read_peft(args.peft_dir)  # refusals come before the (slow) base load
    base = args.base_model
    # a hub id is "name" or "owner/name"; anything else is a folder, which must exist
    if not os.path.isdir(base) and (base.endswith(("/", os.sep)) or base.startswith((".", "/", "~"))
                                    or base.count("/") > 1 or os.path.exists(base)):
        raise FileNotFoundError(f"--base-model {base}: no such folder (a saved model's folder, or a hub id "
                                f"such as Qwen/Qwen3-0.6B)")
    model = getattr(transformers, MODEL_CLASSES[args.model_class]).from_pretrained(base)
    cfg = ll.import_peft(model, args.peft_dir)
    ll.save(model, args.out)
    print(f"wrote {args.out}: {cfg.variant} on {len(state_of(model).targets)} modules")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
