"""The lora-lite benchmarks: generated tasks' training runs, cost and quality tables, the GSM8K
harness and the report writer. Part of the repository, not of the installed library: run from
a checkout as

    python -m lora_bench cost|quality|gsm8k|report [options]    (each with --help)

`lora_lite` never imports this package; it imports `lora_lite`.
"""
