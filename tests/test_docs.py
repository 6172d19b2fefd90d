"""The docs hold together: every relative link in README.md and docs/*.md reaches a file (and, with
a #anchor, a heading of that file), and every `lora-lite` command the docs show sits in a
```console block, which tests/test_readme.py runs and compares with what the block shows.

A console block: a line `$ lora-lite ...` is a command, run in the folder where the section's
python blocks before it ran; the lines after it, up to the next `$ ` line, are what it prints on
stdout. It must exit 0; stderr (warnings, progress bars) is not compared. The only normalisation:
a line that is exactly `...` matches any number of lines (none included), and trailing spaces
are ignored. Anything else that differs (a size, a format version, a config field) fails.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(```+)\s*(\S*)\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CLI_COMMANDS = ("inspect", "export-peft", "import-peft")  # the demo trains for minutes: shown, not run
SHOWN_COMMAND = re.compile(r"\blora-lite\s+(" + "|".join(CLI_COMMANDS) + r")\b")


def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """(`## ` section title, fence language, body) of every fenced block, in order."""
    out, title, lines, i = [], "(top)", text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if fence:
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == fence.group(1))
            out.append((title, fence.group(2), "\n".join(lines[i + 1 : end])))
            i = end
        elif line.startswith("## "):
            title = line[3:].strip()
        i += 1
    return out


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced blocks."""
    out, fence = [], None
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None and m:
            fence = m.group(1)
        elif fence is not None and line.strip() == fence:
            fence = None
        elif fence is None:
            out.append((n, line))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link markup reduced to its text, lowercased, punctuation and
    symbols dropped except `-` and `_`, each space a `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    kept = "".join(c for c in text if c in "-_ " or not unicodedata.category(c).startswith(("P", "S")))
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor; a repeated one gets GitHub's -1, -2, ... suffix."""
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(text):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """'page:line: target (why)' for every relative link of the page that does not resolve."""
    text = page.read_text(encoding="utf-8")
    out = []
    for n, line in prose_lines(text):
        for target in LINK.findall(re.sub(r"`[^`]*`", "", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}:{n}: {target}"
            if not file.exists():
                out.append(f"{where} (no file {path})")
            elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text(encoding="utf-8")):
                out.append(f"{where} (no heading with anchor #{anchor} in {file.name})")
    return out


def console_commands(body: str) -> list[tuple[str, list[str]]]:
    """[(command after `$ `, the output lines shown under it)] of a console block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:].strip(), []))
        elif not out:
            raise ValueError(f"a console block must start with a `$ ` command line, not {line!r}")
        else:
            out[-1][1].append(line)
    return out


def cli_argv(command: str) -> list[str]:
    """The arguments after `lora-lite`; refuses anything but the commands the docs may run."""
    argv = shlex.split(command)
    if len(argv) < 2 or argv[0] != "lora-lite" or argv[1] not in CLI_COMMANDS:
        raise ValueError(f"a console block runs `lora-lite {'|'.join(CLI_COMMANDS)} ...`, not {command!r}")
    return argv[1:]


def output_matches(shown: list[str], printed: list[str]) -> bool:
    """Whether printed lines are what the doc shows: equal line for line (trailing spaces aside),
    where a shown line `...` stands for any run of printed lines."""
    shown = [s.rstrip() for s in shown]
    printed = [p.rstrip() for p in printed]
    # can[i][j]: shown[i:] matches printed[j:]
    can = [[False] * (len(printed) + 1) for _ in range(len(shown) + 1)]
    can[len(shown)][len(printed)] = True
    for i in range(len(shown) - 1, -1, -1):
        for j in range(len(printed), -1, -1):
            if shown[i] == "...":
                can[i][j] = can[i + 1][j] or (j < len(printed) and can[i][j + 1])
            else:
                can[i][j] = j < len(printed) and shown[i] == printed[j] and can[i + 1][j + 1]
    return can[0][0]


# ---- the docs -------------------------------------------------------------------------------------

def test_every_relative_link_resolves():
    broken = [b for page in PAGES for b in broken_links(page)]
    assert not broken, "\n".join(broken)


def test_every_shown_cli_command_is_a_console_block_that_runs():
    """A `lora-lite inspect/export-peft/import-peft` in any other block would never be run."""
    for page in PAGES:
        for title, lang, body in fenced_blocks(page.read_text(encoding="utf-8")):
            where = f"{page.relative_to(ROOT)} section {title!r}"
            if lang == "console":
                for command, _ in console_commands(body):
                    cli_argv(command)
            else:
                assert not SHOWN_COMMAND.search(body), f"{where}: a lora-lite command outside a ```console block"


def test_the_deploy_page_runs_each_command():
    blocks = fenced_blocks((ROOT / "docs" / "deploy.md").read_text(encoding="utf-8"))
    run = {cli_argv(c)[0] for _, lang, body in blocks if lang == "console" for c, _ in console_commands(body)}
    assert run == set(CLI_COMMANDS)


# ---- the checker itself ---------------------------------------------------------------------------

def test_slugs_follow_github():
    assert slug("torch.compile: attach, then compile") == "torchcompile-attach-then-compile"
    assert slug("Calibration on encoder–decoder models") == "calibration-on-encoderdecoder-models"
    assert slug("C3 MetaMathQA → GSM8K") == "c3-metamathqa--gsm8k"
    assert slug("`ia3_ff` and [PEFT](https://x.org) #2") == "ia3_ff-and-peft-2"
    assert anchors("# A\n## A\n```python\n# A\n```\n### A\n") == {"a", "a-1", "a-2"}


def test_a_link_to_a_missing_file_or_heading_is_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Deploy\n\n## Export to PEFT\n")
    page = tmp_path / "README.md"
    page.write_text("[ok](docs/a.md#export-to-peft) [gone](#deploy) [typo](docs/b.md) [x](docs/a.md#export)\n"
                    "`[code](nowhere.md)` [web](https://example.org/#x)\n```\n[in a block](nowhere.md)\n```\n")
    assert [b.split(": ", 1)[1] for b in broken_links(page, tmp_path)] == [
        "#deploy (no heading with anchor #deploy in README.md)",
        "docs/b.md (no file docs/b.md)",
        "docs/a.md#export (no heading with anchor #export in a.md)",
    ]


def test_output_must_match_line_for_line():
    shown = ["file        adapter.safetensors (10.4 KiB)", "written by  lora-lite 0.1.0 (checkpoint format 2)"]
    assert output_matches(shown, [*shown])
    assert output_matches(shown, [shown[0] + "  ", shown[1]])  # trailing spaces
    assert not output_matches(shown, ["file        adapter.safetensors (9.4 KiB)", shown[1]])
    assert not output_matches(shown, [shown[0], shown[1].replace("format 2", "format 3")])
    assert not output_matches(shown, shown[:1])
    assert not output_matches(shown, [*shown, "one more line"])


def test_an_ellipsis_line_matches_any_run_of_lines():
    shown = ["tensors", "...", "parameters  1,792 trainable of 1,792 stored"]
    assert output_matches(shown, ["tensors", "parameters  1,792 trainable of 1,792 stored"])
    assert output_matches(shown, ["tensors", "  a", "  b", "parameters  1,792 trainable of 1,792 stored"])
    assert not output_matches(shown, ["tensors", "  a", "parameters  1,800 trainable of 1,800 stored"])
    assert not output_matches(["file ... KiB"], ["file 10.4 KiB"])  # only a whole line is a wildcard


def test_console_blocks_parse_into_commands_and_outputs():
    body = "$ lora-lite inspect a.safetensors\nfile a\n\n$ lora-lite export-peft a.safetensors out/\nwrote out/"
    assert console_commands(body) == [("lora-lite inspect a.safetensors", ["file a", ""]),
                                      ("lora-lite export-peft a.safetensors out/", ["wrote out/"])]
    assert cli_argv("lora-lite import-peft 'my dir/' b.safetensors --base-model base/") == [
        "import-peft", "my dir/", "b.safetensors", "--base-model", "base/"]
    for bad in ("lora-lite demo", "rm -rf /", "lora-lite"):
        with pytest.raises(ValueError, match="a console block runs"):
            cli_argv(bad)
    with pytest.raises(ValueError, match="must start with a `\\$ ` command line"):
        console_commands("wrote out/\n$ lora-lite inspect a")
