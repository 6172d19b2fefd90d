"""The README and every docs/*.md page run as written: every ```python block, verbatim, and every
```console block's `lora-lite` commands, whose printed output must be what the block shows.

Convention: a `## ` section's python blocks (its `### ` subsections included) run in order in
one fresh interpreter, in a temporary folder; sections share nothing, so a block that needs a
model loads it itself (`from lora_lite.demo import load_minilm; model, tok = load_minilm()`).
A console block's commands run at their place in that order, in the same folder, so they see
the files the blocks above them wrote (tests/test_docs.py says how output is compared).
A section whose blocks import an optional package that is not installed is skipped, naming it.
A docs page runs the same way, section by section.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from test_docs import cli_argv, console_commands, fenced_blocks, output_matches

pytestmark = pytest.mark.slow  # every README/docs block in a fresh interpreter (MiniLM loads)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPTIONAL = ("torchao", "bitsandbytes", "peft", "diffusers")


def runnable_sections(text: str) -> dict[str, list[tuple[str, str]]]:
    """{section title: its python and console blocks, (language, body) in order}."""
    sections: dict[str, list[tuple[str, str]]] = {}
    for title, lang, body in fenced_blocks(text):
        if lang in ("python", "console"):
            sections.setdefault(title, []).append((lang, body))
    return sections


def python_sections(text: str) -> dict[str, str]:
    """{section title: its python blocks joined in order}, for sections that have any."""
    return {t: "\n\n".join(b for lang, b in blocks if lang == "python") + "\n"
            for t, blocks in runnable_sections(text).items() if any(lang == "python" for lang, _ in blocks)}


SECTIONS = runnable_sections(README.read_text(encoding="utf-8"))
DOCS = {f"{page.name}#{title}": blocks for page in sorted((ROOT / "docs").glob("*.md"))
        for title, blocks in runnable_sections(page.read_text(encoding="utf-8")).items()}


def test_the_docs_have_python_blocks_where_expected():
    with_python = {t for t, blocks in [*SECTIONS.items(), *DOCS.items()] if any(lang == "python" for lang, _ in blocks)}
    assert {"Quickstart", "variants.md#Calibration", "variants.md#Steering coefficient",
            "variants.md#Adding a variant", "deploy.md#From a trained adapter to a served model",
            "training.md#Using with", "quantized.md#PiSSA on an int8 MiniLM",
            "checkpoints.md#Checkpoints"} <= with_python


@pytest.mark.parametrize("title", list(SECTIONS))
def test_readme_section_runs(title, tmp_path):
    _runs(f"README section {title!r}", SECTIONS[title], tmp_path)


@pytest.mark.parametrize("title", list(DOCS))
def test_docs_section_runs(title, tmp_path):
    _runs(f"docs/{title}", DOCS[title], tmp_path)


# Runs a console block's commands where the section's script has got to, recording what each
# printed for the comparison below (the doc's own names stay untouched: one underscored helper).
CONSOLE = """
def _lora_lite_docs_console(argvs, log):
    import json, subprocess, sys
    runs = [subprocess.run([sys.executable, "-m", "lora_lite_cli", *argv], capture_output=True, text=True,
                           timeout=300) for argv in argvs]
    with open(log, "w") as f:
        json.dump([{"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr} for r in runs], f)
"""


def _runs(where: str, blocks: list[tuple[str, str]], tmp_path) -> None:
    code = "\n\n".join(body for lang, body in blocks if lang == "python")
    imported = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", code, flags=re.M))
    missing = [m for m in OPTIONAL if m in imported and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{where} needs {missing} (not installed)")
    work, logs = tmp_path / "work", tmp_path / "console"
    work.mkdir()
    logs.mkdir()
    parts, shown = [], []
    for lang, body in blocks:
        if lang == "python":
            parts.append(body)
            continue
        commands = console_commands(body)
        log = logs / f"{len(shown)}.json"
        shown.append((commands, log))
        parts.append(f"_lora_lite_docs_console({[cli_argv(c) for c, _ in commands]!r}, {str(log)!r})")
    script = (CONSOLE if shown else "") + "\n\n".join(parts) + "\n"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # small SVDs on a busy 2-core box; results do not depend on it
    }
    res = subprocess.run([sys.executable, "-c", script], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{where} failed:\n{res.stderr[-3000:]}"
    for commands, log in shown:
        for (command, expected), run in zip(commands, json.loads(log.read_text()), strict=True):
            assert run["rc"] == 0, f"{where}: `{command}` exited {run['rc']}:\n{run['stderr'][-3000:]}"
            printed = run["stdout"].splitlines()
            assert output_matches(expected, printed), (
                f"{where}: `{command}` printed\n" + "\n".join(printed) + "\n\nbut the doc shows\n" + "\n".join(expected))
