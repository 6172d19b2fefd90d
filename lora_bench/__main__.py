"""`python -m lora_bench <benchmark> [options]`: dispatch to one benchmark's `main`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "cost": "C1: step time, params, memory, checkpoints; ours vs HF PEFT",
    "quality": "C2: offline accuracy of every variant on a generated task",
    "frontier": "C2 against trainable params: a LoRA rank frontier, lr chosen on validation",
    "steer": "steering both ways: adapters against steering vectors on a frozen probe",
    "gsm8k": "C3: MetaMathQA -> GSM8K (needs a GPU and the HF hub)",
    "report": "regenerate results/*.md, the plots and the generated docs tables",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m lora_bench <benchmark> [options]\n\nbenchmarks:")
        for name, help_ in COMMANDS.items():
            print(f"  {name:8s} {help_}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown benchmark {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return importlib.import_module(f"lora_bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
