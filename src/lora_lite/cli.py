"""`lora-lite` command line: `lora-lite demo ...`, `lora-lite bench ...`."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": ("lora_lite.demo", "fine-tune the embedded MiniLM with LoRA, save, reload, verify"),
    "bench": ("lora_lite.bench", "benchmarks: cost | quality | gsm8k | report (see lora-lite bench)"),
}


def dispatch(usage: str, commands: dict[str, tuple[str, str]], argv: list[str]) -> int:
    """Run `commands[argv[0]]`'s module `main(argv[1:])`, or print the usage and the commands."""
    if not argv or argv[0] not in commands:
        print(f"usage: {usage} [options]\n\ncommands:")
        for name, (_, help_) in commands.items():
            print(f"  {name:8s} {help_}")
        return 0 if argv[:1] in ([], ["-h"], ["--help"]) else 2
    module = __import__(commands[argv[0]][0], fromlist=["main"])
    return module.main(argv[1:])


def main(argv: list[str] | None = None) -> int:
    return dispatch("lora-lite <command>", COMMANDS, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    raise SystemExit(main())
