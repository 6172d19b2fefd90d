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
    from ..cli import dispatch

    return dispatch("lora-lite bench <benchmark>", COMMANDS, argv or [])
