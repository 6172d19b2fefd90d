"""Measurement: generated tasks, cost and quality benchmarks, the GSM8K harness, report tables.

    lora-lite bench cost|quality|gsm8k|report [options]    (each with --help)
"""

from __future__ import annotations

COMMANDS = {
    "cost": ("lora_lite.bench.cost", "C1: step time, params, memory, checkpoints; ours vs HF PEFT"),
    "quality": ("lora_lite.bench.quality", "C2: offline accuracy of every variant on a generated task"),
    "gsm8k": ("lora_lite.bench.gsm8k", "C3: MetaMathQA -> GSM8K (needs a GPU and the HF hub)"),
    "report": ("lora_lite.bench.report", "regenerate results/*.md, the plot and the README tables"),
}


def main(argv: list[str] | None = None) -> int:
    argv = argv or []
    if not argv or argv[0] not in COMMANDS:
        print("usage: lora-lite bench <benchmark> [options]\n\nbenchmarks:")
        for name, (_, help_) in COMMANDS.items():
            print(f"  {name:8s} {help_}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module = __import__(COMMANDS[argv[0]][0], fromlist=["main"])
    return module.main(argv[1:])
