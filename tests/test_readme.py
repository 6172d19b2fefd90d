"""The README and every docs/*.md page run as written: every ```python block, verbatim.

Convention: a `## ` section's python blocks (its `### ` subsections included) run in order in
one fresh interpreter, in a temporary folder; sections share nothing, so a block that needs a
model loads it itself (`from lora_lite.demo import load_minilm; model, tok = load_minilm()`).
A section whose blocks import an optional package that is not installed is skipped, naming it.
A docs page runs the same way, section by section.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every README/docs block in a fresh interpreter (MiniLM loads)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
OPTIONAL = ("torchao", "bitsandbytes", "peft")


def python_sections(text: str) -> dict[str, str]:
    """{section title: its python blocks joined in order}, for sections that have any."""
    sections: dict[str, list[str]] = {}
    title = "(top)"
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            title = line[3:].strip()
        elif line.strip() == "```python":
            end = lines.index("```", i + 1)
            sections.setdefault(title, []).append("\n".join(lines[i + 1 : end]))
            i = end
        i += 1
    return {t: "\n\n".join(blocks) + "\n" for t, blocks in sections.items()}


SECTIONS = python_sections(README.read_text(encoding="utf-8"))
DOCS = {f"{page.name}#{title}": code for page in sorted((ROOT / "docs").glob("*.md"))
        for title, code in python_sections(page.read_text(encoding="utf-8")).items()}


def test_the_readme_has_python_blocks_where_expected():
    assert {"Quickstart", "Calibration", "Quantized bases"} <= set(SECTIONS)


@pytest.mark.parametrize("title", list(SECTIONS))
def test_readme_section_runs(title, tmp_path):
    _runs(f"README section {title!r}", SECTIONS[title], tmp_path)


@pytest.mark.parametrize("title", list(DOCS))
def test_docs_section_runs(title, tmp_path):
    _runs(f"docs/{title}", DOCS[title], tmp_path)


def _runs(where: str, code: str, tmp_path) -> None:
    imported = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", code, flags=re.M))
    missing = [m for m in OPTIONAL if m in imported and importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{where} needs {missing} (not installed)")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # small SVDs on a busy 2-core box; results do not depend on it
    }
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{where} failed:\n{res.stderr[-3000:]}"
