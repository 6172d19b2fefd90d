"""The `lora-lite` console script: argument parsing without torch.

    lora-lite demo [options]                             fine-tune the embedded MiniLM, save, reload, verify
    lora-lite inspect ADAPTER.safetensors [--json]       what a checkpoint holds; no model loaded
    lora-lite export-peft ADAPTER.safetensors OUT_DIR    a PEFT adapter dir, from the file alone
    lora-lite import-peft PEFT_DIR OUT.safetensors --base-model PATH [--model-class causal-lm]
                                                         a PEFT adapter as a lora-lite checkpoint

This is a separate top-level package because importing anything inside `lora_lite` runs its
`__init__`, which imports torch (seconds): `--help`, `--version` and argument errors answer from
here, and a command's code (`lora_lite.cli`, `lora_lite.demo`) is imported only to run it.
Errors a user can act on (a missing file, a refused adapter, a base model that will not load)
print one line on stderr and exit 1; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

PROG = "lora-lite"


def version() -> str:
    """lora_lite.__version__, read from its file: `import lora_lite` would import torch."""
    spec = importlib.util.find_spec("lora_lite")  # locates the package without running it
    namespace: dict = {}
    exec(Path(spec.submodule_search_locations[0], "_version.py").read_text(), namespace)
    return namespace["__version__"]


def _demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=600, help="optimizer steps (default 600; fewer steps, lower accuracy)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank r on every encoder linear layer (alpha = 2r)")
    p.add_argument("--lr", type=float, default=1e-3, help="adapter peak lr (10%% warm-up, then cosine to 0)")
    p.add_argument("--head-lr", type=float, default=1e-2, help="the head's peak lr (same schedule)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per step")
    p.add_argument("--seed", type=int, default=0, help="head init and batch order (the sentences are fixed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the digits depend on it)")
    p.add_argument("--out", default=None, help="folder for adapter.safetensors (default: a new temp folder)")


def _inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a file written by lora_lite.save")
    p.add_argument("--json", action="store_true", help="print the description as JSON")


def _export(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter", help="a file written by lora_lite.save")
    p.add_argument("out_dir", help="the PEFT adapter directory to write")


MODEL_CLASSES = {  # --model-class -> transformers auto class (an allow-list, never getattr on input)
    "causal-lm": "AutoModelForCausalLM",
    "base": "AutoModel",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
}


def _import(p: argparse.ArgumentParser) -> None:
    p.add_argument("peft_dir", help="directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("out", help="the lora-lite checkpoint to write")
    p.add_argument("--base-model", required=True, help="path (or cached hub id) of the base model")
    p.add_argument("--model-class", choices=sorted(MODEL_CLASSES), default="causal-lm",
                   help="the transformers class PEFT wrapped (module names depend on it); default causal-lm")


# name -> (what it does, its arguments, "module:function" that runs it with the parsed args)
COMMANDS = {
    "demo": ("fine-tune the embedded MiniLM with LoRA, save, reload, verify", _demo, "lora_lite.demo:run"),
    "inspect": ("show a lora-lite checkpoint: variant, config, targets, tensors", _inspect,
                "lora_lite.cli:inspect"),
    "export-peft": ("write a lora-lite checkpoint as an HF PEFT adapter directory, from the file alone",
                    _export, "lora_lite.cli:export"),
    "import-peft": ("convert an HF PEFT adapter directory into a lora-lite checkpoint (loads the base)",
                    _import, "lora_lite.cli:import_"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="lora-lite: parameter-efficient adapters attached with "
                                "forward hooks. `lora-lite COMMAND --help` for a command's options.")
    p.add_argument("--version", action="version", version=f"{PROG} {version()}")
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, (help_, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_, description=help_, parents=[debug]))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    p = parser()
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in COMMANDS:
        p.print_usage(sys.stderr)
        print(f"{PROG}: unknown command {first!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        args = p.parse_args(argv)
    except SystemExit as e:  # --help, --version (0) and argument errors (2) as return codes
        return int(e.code or 0)
    if args.command is None:
        p.print_help()
        return 2
    module, _, function = COMMANDS[args.command][2].partition(":")
    try:
        rc = getattr(importlib.import_module(module), function)(args)
        sys.stdout.flush()  # a closed pipe fails here, not in the interpreter's exit flush
        return rc
    except BrokenPipeError:  # `lora-lite inspect --json f | head -1` closed stdout early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush there
        return 141  # the shell's code for a process ended by SIGPIPE
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"{PROG} {args.command}: {message} ({type(e).__name__}; --debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
