"""A variant is one file: the test-only `gated_lora` (tests/toy_variant.py, registered by one
import line in conftest) is run by every generic suite from its declarations alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cases import CASES, TRAINABLE
from lora_lite.interop.peft import native_export, peft_methods

HERE = Path(__file__).resolve().parent
SUITES = {  # generic suite -> what it checks for every case
    "test_variants.py": "identity (fp32), trainables, liveness, reload, detach",
    "test_precision.py": "identity and reload on a bf16 base",
    "test_properties.py": "properties over geometries and dtypes",
    "test_merge.py": "merge, disabled, scaled",
    "test_interop.py": "PEFT export from the model and from the file",
    "test_runtime.py": "attach/detach state",
    "test_quantized.py": "quantized bases",
    "test_compile.py": "torch.compile, 0 graph breaks",
}


def test_the_toy_is_a_case_with_declarations():
    assert "gated_lora" in CASES and "gated_lora" in TRAINABLE
    assert "gated_lora" not in peft_methods() and "gated_lora" not in native_export()  # exported as a LoRA


@pytest.mark.slow
def test_every_generic_suite_collects_the_toy():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "--run-optin", "-k", "gated_lora", "-p", "no:cacheprovider",
         *SUITES], cwd=HERE, capture_output=True, text=True, timeout=600)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    missing = [s for s in SUITES if not any(i.split("::")[0].endswith(s) for i in ids)]
    assert not missing, (missing, out.stdout[-2000:], out.stderr[-2000:])


@pytest.mark.slow
def test_the_toy_compiles_without_graph_breaks():
    from conftest import make_qwen
    from test_compile import assert_compiled_matches_eager, attached

    bench = make_qwen()
    assert_compiled_matches_eager(attached(bench, "gated_lora"), bench.batch, "aot_eager", 1e-5)


def test_the_docs_show_exactly_the_toy_file():
    root = HERE.parent
    toy = (HERE / "toy_variant.py").read_text()
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    assert any(f"```python\n{toy}```" in p.read_text() for p in docs if p.exists())
