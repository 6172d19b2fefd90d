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
