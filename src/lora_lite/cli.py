"""`lora-lite` command line: demo, inspect, export-peft, import-peft.

    lora-lite inspect ADAPTER.safetensors [--json]       what a checkpoint holds; no model loaded
    lora-lite export-peft ADAPTER.safetensors OUT_DIR    a PEFT adapter dir, from the file alone
    lora-lite import-peft PEFT_DIR OUT.safetensors --base-model PATH [--model-class causal-lm]
                                                         a PEFT adapter as a lora-lite checkpoint

import-peft loads the base model because a lora-lite checkpoint records fingerprints of the base
weights it was made on (load warns when they differ); the conversion itself reads only the PEFT
directory and goes through `ll.import_peft`, so it refuses exactly what that refuses.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter

COMMANDS = {
    "demo": ("lora_lite.demo", "fine-tune the embedded MiniLM with LoRA, save, reload, verify"),
    "inspect": ("lora_lite.cli:inspect_main", "show a lora-lite checkpoint: variant, config, targets, tensors"),
    "export-peft": ("lora_lite.cli:export_main", "write a lora-lite checkpoint as an HF PEFT adapter directory"),
    "import-peft": ("lora_lite.cli:import_main", "convert an HF PEFT adapter directory into a lora-lite checkpoint"),
}


def dispatch(usage: str, commands: dict[str, tuple[str, str]], argv: list[str]) -> int:
    """Run the entry point of `commands[argv[0]]` ("module" -> its `main`, "module:function")
    with argv[1:], or print the usage and the commands."""
    if not argv or argv[0] not in commands:
        print(f"usage: {usage} [options]\n\ncommands:")
        for name, (_, help_) in commands.items():
            print(f"  {name:12s} {help_}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module_name, _, func = commands[argv[0]][0].partition(":")
    module = __import__(module_name, fromlist=[func or "main"])
    return getattr(module, func or "main")(argv[1:])


def main(argv: list[str] | None = None) -> int:
    return dispatch("lora-lite <command>", COMMANDS, sys.argv[1:] if argv is None else argv)


# ---- inspect ------------------------------------------------------------------------------------

def describe(path: str) -> dict:
    """A lora-lite checkpoint's contents (`ll.read`: hashes verified), no model loaded.
    Raises CheckpointError for anything that is not a valid lora-lite checkpoint."""
    from .checkpoint import BASE, read
    from .runtime import variant_of

    adapter = read(path)
    cfg = adapter.config
    variant = variant_of(cfg)
    fingerprints = adapter.fingerprints or {}
    trainable, groups = 0, {}
    items = [(name, pname, t) for name, per in adapter.tensors.items() for pname, t in per.items()]
    items += [(None, BASE + n, t) for n, t in adapter.trainable.items()]
    for name, pname, t in items:
        shape, dtype = tuple(t.shape), t.dtype
        spec = None
        if name is not None:
            d_out, d_in = ((fingerprints.get(name) or {}).get("weight") or {}).get("shape", [None, None])
            spec = variant.at_target(name, cfg).param_specs(d_in, d_out, cfg).get(pname) if d_in else None
        if spec is not None and spec.trainable:
            trainable += t.numel()
        key = pname  # "lora_*" grouped over targets; "base.<parameter>" one each
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
        "stored_parameters": sum(t.numel() for _, _, t in items),
        "trainable_parameters": trainable,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


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
        label = p if p.startswith("base.") else f"<target>.{p}"
        print(f"  {label:27s} {shapes}  {t['dtype']}  {kind}")
    print(f"parameters  {d['trainable_parameters']:,} trainable of {d['stored_parameters']:,} stored")


def inspect_main(argv: list[str]) -> int:
    from .checkpoint import CheckpointError

    p = argparse.ArgumentParser(prog="lora-lite inspect", description="Show a lora-lite checkpoint without loading a model.")
    p.add_argument("path", help="a file written by lora_lite.save")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    args = p.parse_args(argv)
    try:
        d = describe(args.path)
    except (CheckpointError, KeyError) as e:
        print(f"lora-lite inspect: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        _print_description(d)
    return 0


# ---- PEFT ---------------------------------------------------------------------------------------

def export_main(argv: list[str]) -> int:
    from .checkpoint import CheckpointError
    from .interop.peft import export_peft_file

    p = argparse.ArgumentParser(
        prog="lora-lite export-peft",
        description="Write a lora-lite checkpoint as an HF PEFT adapter directory (adapter_config.json + "
        "adapter_model.safetensors), from the file alone: no base model is loaded.",
    )
    p.add_argument("adapter", help="a file written by lora_lite.save")
    p.add_argument("out_dir", help="the PEFT adapter directory to write")
    args = p.parse_args(argv)
    try:
        fields = export_peft_file(args.adapter, args.out_dir)
    except (CheckpointError, ValueError, KeyError) as e:
        print(f"lora-lite export-peft: {e}", file=sys.stderr)
        return 1
    rank = f", r={fields['r']}" if "r" in fields else ""
    print(f"wrote {args.out_dir}: PEFT {fields['peft_type']}{rank} on {len(fields['target_modules'])} modules")
    return 0


MODEL_CLASSES = {  # --model-class -> transformers auto class (an allow-list, never getattr on input)
    "causal-lm": "AutoModelForCausalLM",
    "base": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}


def import_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="lora-lite import-peft",
        description="Convert an HF PEFT adapter directory into a lora-lite checkpoint. The base model is "
        "loaded (transformers) to check the targets and record its fingerprints in the file.",
    )
    p.add_argument("peft_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("out", help="the lora-lite checkpoint to write")
    p.add_argument("--base-model", required=True, help="path (or cached hub id) of the base model")
    p.add_argument("--model-class", choices=sorted(MODEL_CLASSES), default="causal-lm",
                   help="the transformers class PEFT wrapped (module names depend on it); default causal-lm")
    args = p.parse_args(argv)

    import transformers

    import lora_lite as ll
    from lora_lite.runtime import state_of

    model = getattr(transformers, MODEL_CLASSES[args.model_class]).from_pretrained(args.base_model)
    try:
        cfg = ll.import_peft(model, args.peft_dir)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"lora-lite import-peft: {e}", file=sys.stderr)
        return 1
    ll.save(model, args.out)
    print(f"wrote {args.out}: {cfg.variant} on {len(state_of(model).targets)} modules")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
