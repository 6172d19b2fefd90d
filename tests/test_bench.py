"""The benchmarks: settings cover the registry, analytic MACs agree with a FLOP counter, the
quick cost and quality runs produce well-formed JSON, the README tables are what report.py
renders from the committed JSON. (The GSM8K harness has its own file.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lora_lite as ll
from lora_lite.bench import adapters, cost, models, quality, report
from lora_lite.runtime import state_of
from lora_lite.variant import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return cost.Setup("tiny", layers=2, batch_size=2, seq_len=12, n_calib=2, rank=4)


def test_every_registered_variant_has_a_setting():
    assert set(REGISTRY) <= set(adapters.SETTINGS)
    assert set(quality.FAMILY_GRID) >= {s.family for s in adapters.SETTINGS.values()}


def test_unregistered_variants_are_skipped_with_a_note():
    notes = []
    names = adapters.available(None, log=notes.append)
    assert names == [n for n in adapters.SETTINGS if n in REGISTRY]
    assert bool(notes) == any(n not in REGISTRY for n in adapters.SETTINGS)
    with pytest.raises(KeyError, match="unknown variants"):
        adapters.available(["no_such_variant"])


@pytest.mark.parametrize("name", [n for n in adapters.SETTINGS if n in REGISTRY])
def test_setting_attaches_on_both_benchmark_geometries(tiny, minilm, name):
    model = tiny.build("ours", name)  # attach (with calibration where the variant takes it)
    assert state_of(model).cfg.variant == name
    targets = models.TARGETS["minilm"]
    cfg = adapters.make_config(name, 16, targets, adapters.geometry(minilm.model, targets))
    from lora_lite.targets import find_targets

    ll.runtime.validate(minilm.model, REGISTRY[name], cfg, find_targets(minilm.model, cfg))


@pytest.mark.parametrize("name", ["lora", "pissa", "lora_xs", "hra"])
def test_analytic_macs_per_token_match_the_flop_counter(name):
    """Matmul-only adapters: FLOPs / 2 per extra token equals the analytic per-token MACs
    (the counter reports 2·MACs; differencing two sequence lengths removes per-call work)."""
    from torch.utils.flop_counter import FlopCounterMode

    base = models.qwen_like(layers=1, vocab=64, tiny=True)
    adapted = models.qwen_like(layers=1, vocab=64, tiny=True)
    targets = models.TARGETS["tiny"]
    cfg = adapters.make_config(name, 4, targets, adapters.geometry(base, targets))
    ll.attach(adapted, cfg)

    def flops(model, seq):
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            model(input_ids=torch.zeros(1, seq, dtype=torch.long))
        return fc.get_total_flops()

    extra = [(flops(adapted, t) - flops(base, t)) for t in (8, 24)]
    per_token_macs = (extra[1] - extra[0]) / 2 / 16
    expected, _ = adapters.added_macs(name, cfg, state_of(adapted).targets.values())
    assert per_token_macs == expected


def test_cost_quick_run_writes_well_formed_results(tmp_path):
    assert cost.main(["--quick", "--models", "tiny", "--no-memory", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "cost_quick.json").read_text())
    assert {"torch", "threads", "cpu", "date", "peft"} <= set(data["env"])
    (m,) = data["models"]
    libs = [(r["lib"], r["variant"]) for r in m["rows"]]
    assert libs == [("base", None), ("full", None), ("ours", "lora"), ("peft", "lora"),
                    ("ours", "ia3"), ("peft", "ia3")]
    for r in m["rows"]:
        assert r["params"] >= 0 and r["fwd_ms"] > 0 and r["step_ms"] > 0
        if r["lib"] in ("ours", "peft"):
            assert r["macs_per_token"] > 0 and r["attach_s"] >= 0
            assert r["bytes"] > 0 and r["save_ms"] > 0 and r["load_ms"] > 0
            assert r["reload_err"] <= 1e-5
        if r["lib"] == "ours":
            for k in ("ratio_vs_peft", "ratio_q1", "ratio_q3", "fwd_ratio_vs_peft"):
                assert math.isfinite(r[k]) and r[k] > 0
    ours_lora = next(r for r in m["rows"] if r["lib"] == "ours" and r["variant"] == "lora")
    peft_lora = next(r for r in m["rows"] if r["lib"] == "peft" and r["variant"] == "lora")
    assert ours_lora["params"] == peft_lora["params"]
    md = (tmp_path / "cost_quick.md").read_text()
    assert "ours / PEFT" in md and "`lora`" in md


def test_peak_memory_is_measured_in_a_fresh_process():
    spec = {"kind": "tiny", "layers": 2, "batch_size": 2, "seq_len": 8, "n_calib": 1, "rank": 4,
            "threads": 1, "lib": "ours", "name": "lora"}
    out = cost.peak_memory(spec)
    assert "memory_error" not in out, out
    assert out["peak_rss_mb"] >= out["rss_model_mb"] > 50


def test_quality_smoke_run_and_report(tmp_path):
    args = ["--rows", "head,peft:lora,lora", "--seeds", "0", "--steps", "2", "--n-train", "64",
            "--n-test", "32", "--calib-batches", "1", "--batch-size", "8", "--out", str(tmp_path)]
    assert quality.main(args) == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    assert [r["row"] for r in data["runs"]] == ["head", "peft:lora", "lora"]
    head, peft_lora, lora = data["runs"]
    assert head["params"] == 0 and peft_lora["params"] == lora["params"] > 0
    assert peft_lora["acc"] == lora["acc"]  # same initial tensors, same math: same training
    assert all(0 <= r["acc"] <= 1 and r["finite"] for r in data["runs"])
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert "PEFT LoRA" in (tmp_path / "quality.md").read_text()
    # a second call resumes: nothing left to run, the JSON is unchanged
    assert quality.main(args) == 0
    assert json.loads((tmp_path / "quality.json").read_text())["runs"] == data["runs"]


def test_best_lr_is_chosen_per_family_by_mean_accuracy():
    runs = [{"row": "lora", "lr": 1e-3, "acc": 0.5}, {"row": "peft:lora", "lr": 1e-3, "acc": 0.9},
            {"row": "lora", "lr": 3e-4, "acc": 0.7}, {"row": "peft:lora", "lr": 3e-4, "acc": 0.6},
            {"row": "peft:lora", "lr": 3e-3, "acc": 0.95},  # not run by every lora-family row
            {"row": "ia3", "lr": 5e-3, "acc": 0.7}, {"row": "ia3_ff", "lr": 5e-3, "acc": 0.7},
            {"row": "ia3", "lr": 1e-3, "acc": 0.7}, {"row": "ia3_ff", "lr": 1e-3, "acc": 0.7}]
    best = quality.best_lrs({"runs": runs})
    assert best == {"lora": 1e-3, "gain": 1e-3}  # lora: mean 0.7 > 0.65; gain: tie -> smaller
    assert quality.family("dora") == quality.family("peft:lora") == "lora"


def test_readme_tables_are_generated_from_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    generated = report.blocks(ROOT / "results")
    assert {"cost", "quality", "quality-sweep"} <= set(generated), "results JSON missing"
    assert report.render_readme(readme, generated) == readme, "run `lora-lite bench report`"


def test_cli_lists_the_benchmarks(capsys):
    from lora_lite.cli import main

    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("cost", "quality", "gsm8k", "report"))
