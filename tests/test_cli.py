"""The `lora-lite` commands as a user runs them: subprocesses of `python -m lora_lite_cli` (the
console script's module; a command that runs pays the torch import), and error paths in-process
through `cli.main`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lora_lite as ll
from lora_lite.cli import main
from lora_lite.runtime import state_of

from conftest import rel_err
from test_variants import attach_case, perturb

SRC = str(Path(__file__).resolve().parents[1] / "src")
pytestmark = pytest.mark.slow  # fresh interpreters (the console entry point) and a saved transformers base


def cli(*args, without_peft=False):
    """`lora-lite ARGS` (`python -m lora_lite_cli`); without_peft: with `import peft` made to fail."""
    run = ["-m", "lora_lite_cli"]
    if without_peft:
        run = ["-c", "import sys, runpy; sys.modules['peft'] = None; "
                     "runpy.run_module('lora_lite_cli', run_name='__main__')"]
    return subprocess.run([sys.executable, *run, *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=300)


ENV = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_help_lists_the_commands(capsys):
    res = cli("--help")
    assert res.returncode == 0
    for command in ("demo", "inspect", "export-peft", "import-peft"):
        assert f"\n    {command} " in res.stdout or f"\n    {command}\n" in res.stdout


def test_version_and_an_unknown_command():
    res = cli("--version")
    assert (res.returncode, res.stdout) == (0, f"lora-lite {ll.__version__}\n")
    res = cli("frobnicate")
    assert res.returncode == 2
    assert "lora-lite: unknown command 'frobnicate'; commands: demo, inspect, export-peft, import-peft" in res.stderr
    assert main(["frobnicate"]) == 2


def test_help_and_argument_errors_do_not_import_torch():
    """The console script answers --help, --version and bad arguments without importing torch
    (seconds on a busy CPU box; this answers in a fraction of one)."""
    calls = [["--help"], ["--version"], ["demo", "--help"], ["inspect"], ["inspect", "--bogus", "f"],
             ["import-peft", "a", "b"], ["frobnicate"], []]
    code = ("import sys, contextlib, io\nfrom lora_lite_cli import main\ncodes = []\n"
            f"for argv in {calls!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
            "        codes.append(main(argv))\n"
            "print(codes, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lora_lite')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert res.stdout.strip() == "[0, 0, 0, 2, 2, 2, 2, 2] []", res.stderr


def _tiny_checkpoint(path):
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    ll.attach(net, ll.LoRAConfig(r=2))
    ll.save(net, path)
    return path


def test_an_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    for args in (["inspect", tmp_path / "missing.safetensors"],
                 ["export-peft", tmp_path / "missing.safetensors", tmp_path / "out"]):
        res = cli(*args)
        assert res.returncode == 1
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        assert res.stderr.startswith(f"lora-lite {args[0]}: {tmp_path / 'missing.safetensors'}: no such file")
        res = cli(*args, "--debug")
        assert res.returncode == 1 and "Traceback" in res.stderr and "CheckpointError" in res.stderr


def test_inspect_on_a_peft_folder_names_import_peft(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    res = cli("inspect", tmp_path)
    assert res.returncode == 1 and res.stderr.count("\n") == 1
    assert "an HF PEFT adapter folder" in res.stderr and "lora-lite import-peft" in res.stderr


def test_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`lora-lite inspect --json f | head -1`: the reader is gone before the command writes."""
    path = _tiny_checkpoint(tmp_path / "a.safetensors")
    proc = subprocess.Popen([sys.executable, "-m", "lora_lite_cli", "inspect", "--json", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_inspect(qwen, tmp_path, capsys):
    model = qwen.fresh()
    attach_case(qwen, "antipasto_dplr", model)
    path = tmp_path / "a.safetensors"
    ll.save(model, path)
    res = cli("inspect", path)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "variant     antipasto_dplr" in out
    assert f"lora-lite {ll.__version__}" in out
    assert "targets     14: model.layers.{0-1}.self_attn.q_proj" in out
    assert "<target>.lora_U" in out and "frozen" in out and "trainable" in out
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{trainable:,} trainable of " in out

    assert main(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["variant"] == "antipasto_dplr" and d["config"]["core_rank"] == 2
    assert d["targets"] == list(state_of(model).targets)
    assert d["trainable_parameters"] == trainable
    assert d["bytes"] == path.stat().st_size
    assert d["tensors"]["lora_g"] == {"count": 14, "shapes": {"8": 14}, "dtype": "float32", "trainable": True}

    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    for bad, why in (("model.pt", "not a readable safetensors file"), ("missing.safetensors", "no such file")):
        assert main(["inspect", str(tmp_path / bad)]) == 1
        assert f"lora-lite inspect: {tmp_path / bad}: {why}" in capsys.readouterr().err


KINDS = {  # a checkpoint of every layer kind: (model fixture, config)
    "linear": ("qwen", lambda: ll.LoRAConfig(r=2, alpha=4, target_names=(r"q_proj$",))),
    "conv1d": ("gpt2", lambda: ll.LoRAConfig(r=2, alpha=4, target_names=(r"c_attn$",))),
    "embedding": ("qwen", lambda: ll.LoRAConfig(r=2, alpha=4, target_names=(r"embed_tokens$",))),
    "fused": ("qwen_moe", lambda: ll.LoRAConfig(r=2, alpha=4, target_parameters=(r"mlp\.experts\.(gate_up_proj|down_proj)$",))),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_inspect_and_export_every_layer_kind(kind, request, tmp_path, capsys):
    bench = request.getfixturevalue(KINDS[kind][0])
    model = bench.fresh()
    ll.attach(model, KINDS[kind][1]())
    path = tmp_path / "a.safetensors"
    ll.save(model, path)
    targets = list(state_of(model).targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"targets     {len(targets)}: " in out and f"{trainable:,} trainable of {trainable:,} stored" in out
    assert main(["inspect", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["targets"] == targets and d["trainable_parameters"] == trainable
    assert {p: t["trainable"] for p, t in d["tensors"].items()} == {"lora_A": True, "lora_B": True}

    assert main(["export-peft", str(path), str(tmp_path / "peft")]) == 0
    what = "parameters" if kind == "fused" else "modules"
    assert f"PEFT LORA, r=2 on {len(targets)} {what}\n" in capsys.readouterr().out


def test_export_peft_from_the_file_alone(qwen, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    model = qwen.fresh()
    attach_case(qwen, "pissa", model)
    perturb(model)
    ll.save(model, tmp_path / "a.safetensors")
    res = cli("export-peft", tmp_path / "a.safetensors", tmp_path / "out", without_peft=True)
    assert res.returncode == 0, res.stderr
    assert "PEFT LORA, r=8 on 14 modules" in res.stdout
    pm = peft.PeftModel.from_pretrained(qwen.fresh(), tmp_path / "out").eval()
    assert rel_err(qwen.out(pm), qwen.out(model)) <= 1e-5
    assert main(["export-peft", str(tmp_path / "out" / "adapter_model.safetensors"), str(tmp_path / "x")]) == 1
    assert "not a lora-lite checkpoint" in capsys.readouterr().err


def test_import_peft(qwen, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    qwen.model.save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(qwen.fresh(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"]))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.05)
    pm.eval().save_pretrained(tmp_path / "peft")
    res = cli("import-peft", tmp_path / "peft", tmp_path / "a.safetensors", "--base-model", tmp_path / "base")
    assert res.returncode == 0, res.stderr
    assert "lora on 4 modules" in res.stdout
    model = qwen.fresh()
    ll.load(model, tmp_path / "a.safetensors")  # same base: no fingerprint warning
    assert rel_err(qwen.out(model), qwen.out(pm)) <= 1e-5

    for nowhere in ("nowhere/", "./nowhere", str(tmp_path / "nowhere")):  # a folder, not a hub id
        assert main(["import-peft", str(tmp_path / "peft"), str(tmp_path / "b.safetensors"), "--base-model", nowhere]) == 1
        err = capsys.readouterr().err
        assert f"--base-model {nowhere}: no such folder" in err and "repo" not in err.lower(), err

    res = cli("import-peft", tmp_path / "peft", tmp_path / "b.safetensors", "--base-model", tmp_path / "nonexistent")
    assert res.returncode == 1
    assert res.stderr.startswith("lora-lite import-peft: ") and "nonexistent" in res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr

    conf = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    conf["bias"] = "all"
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(conf))
    args = ["import-peft", str(tmp_path / "peft"), str(tmp_path / "b.safetensors"), "--base-model", str(tmp_path / "base")]
    capsys.readouterr()  # drop save_pretrained's progress bars
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "PEFT option bias='all' is not supported" in err and err.count("\n") == 1
    assert not (tmp_path / "b.safetensors").exists()


def test_deploy_doc_examples_run(tmp_path, monkeypatch):
    """docs/deploy.md is one script; run it as written and look at what it computed."""
    pytest.importorskip("peft")
    text = (Path(SRC).parent / "docs" / "deploy.md").read_text()
    blocks = [b.split("\n```", 1)[0] for b in text.split("```python\n")[1:]]
    assert len(blocks) == 6
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile("\n".join(blocks), "docs/deploy.md", "exec"), namespace)
    # the script's own objects: its disabled output is the pristine base, and scaled(-1) is the
    # opposite edit of the loaded adapter at every target (compared on the layer it adapts)
    ids = namespace["ids"]
    with torch.no_grad():
        assert torch.equal(namespace["y_base"], namespace["tiny"]()(ids).logits)
        layer = namespace["tiny"]().model.layers[0].self_attn.q_proj
        fresh = namespace["tiny"]()
        ll.load(fresh, tmp_path / "adapter.safetensors")
        target = fresh.model.layers[0].self_attn.q_proj
        x = torch.randn(3, layer.in_features)
        y_base, y_adapted = layer(x), target(x)
        with ll.scaled(fresh, -1.0):
            assert torch.allclose(target(x), 2 * y_base - y_adapted, atol=1e-6)
    assert not torch.equal(namespace["y_opposite"], namespace["y_base"])
    # the coefficient tensors' block: the example at c = 0 is the pristine base's
    with torch.no_grad():
        assert torch.equal(namespace["rows"][1], namespace["tiny"]()(namespace["ids3"]).logits[1])
    assert not torch.equal(namespace["steered"], namespace["rows"])
