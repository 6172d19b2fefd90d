"""The benchmarks: settings cover the registry, analytic MACs agree with a FLOP counter, the
quick cost and quality runs produce well-formed JSON, the docs/benchmarks.md tables are what report.py
renders from the committed JSON. (The GSM8K harness has its own file.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_bench import adapters, cost, models, quality, report
from lora_lite.runtime import state_of
from lora_lite.variant import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # the benchmark, not the library


@pytest.fixture(scope="module")
def tiny():
    return cost.Setup("tiny", layers=2, batch_size=2, seq_len=12, n_calib=2, rank=4)


def test_every_variant_family_has_an_lr_grid():
    families = {s.family for s in adapters.settings().values()}
    assert families and set(quality.FAMILY_GRID) >= families


def test_available_lists_the_registry_and_refuses_unknown_names():
    assert adapters.available(None) == list(REGISTRY)
    assert adapters.available(["ia3", "lora"]) == ["ia3", "lora"]
    with pytest.raises(KeyError, match=r"unknown variants \['no_such_variant'\]"):
        adapters.available(["lora", "no_such_variant"])


@pytest.mark.parametrize("name", list(REGISTRY))
def test_setting_attaches_on_both_benchmark_geometries(tiny, minilm, name):
    model = tiny.build("ours", name)  # attach (with calibration where the variant takes it)
    assert state_of(model).cfg.variant == name
    targets = models.TARGETS["minilm"]
    cfg = adapters.make_config(name, 16, targets, adapters.geometry(minilm.model, targets))
    from lora_lite.targets import find_targets

    ll.runtime.validate(minilm.model, REGISTRY[name], cfg, find_targets(minilm.model, cfg))


@pytest.mark.parametrize("name", [n for n in REGISTRY if adapters.peft_method(n)])
def test_every_peft_row_builds_and_trains(tiny, name):
    """C1's (and C2's) PEFT row of each variant builds and has the same targets trainable; a
    config field a variant drops (antipasto_corda's alpha) broke `bench cost` mid-run without it."""
    from peft import PeftModel

    model = tiny.build("peft", name)
    assert isinstance(model, PeftModel)
    trained = {n.split(".base_layer")[0].split(".lora_")[0].split(".ia3_")[0].split(".hra_")[0]
               .split(".road_")[0].split(".delora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert len(trained) == len(tiny.target_layers(tiny.config(name)))


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
        assert r["saved_mb"] > 0
        if r["lib"] in ("ours", "peft"):
            assert r["macs_per_token"] > 0 and r["attach_s"] >= 0
            assert r["saved_over_base_mb"] >= 0
            assert r["bytes"] > 0 and r["save_ms"] > 0 and r["load_ms"] > 0
            assert r["reload_err"] <= 1e-5
        if r["lib"] == "ours":
            for k in ("ratio_vs_peft", "ratio_q1", "ratio_q3", "fwd_ratio_vs_peft"):
                assert math.isfinite(r[k]) and r[k] > 0
        if r["lib"] in ("ours", "peft"):  # per hooked layer: 7 targets per block, 2 blocks
            assert r["targets"] == 14
            assert math.isfinite(r["step_us_per_target"]) and math.isfinite(r["fwd_us_per_target"])
    ours_lora = next(r for r in m["rows"] if r["lib"] == "ours" and r["variant"] == "lora")
    peft_lora = next(r for r in m["rows"] if r["lib"] == "peft" and r["variant"] == "lora")
    assert ours_lora["params"] == peft_lora["params"]
    md = (tmp_path / "cost_quick.md").read_text()
    assert "ours / PEFT" in md and "`lora`" in md
    assert "Per-target overhead" in md and "ours µs/target (fwd)" in md


class _Chain(nn.Module):
    """x (fixed input) -> Linear -> ReLU -> Linear, read like a model output by cost.step."""

    def __init__(self, trainable: bool):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16, bias=False), nn.Linear(16, 4, bias=False)
        self.requires_grad_(trainable)
        self.x = torch.randn(5, 8)

    def forward(self, input_ids, attention_mask=None):
        from types import SimpleNamespace

        return SimpleNamespace(last_hidden_state=self.b(torch.relu(self.a(self.x))))


def test_saved_activation_bytes_count_each_saved_storage_once():
    """Independent count for a trainable Linear-ReLU-Linear chain and the loss mean(out²):
    autograd keeps x (for ∇W_a), relu(h) (ReLU's result and ∇W_b's input: one storage, counted
    once) and out (for the square); the weights it saves are parameters and are left out."""
    torch.manual_seed(0)
    chain = _Chain(trainable=True)
    batch = {"input_ids": torch.zeros(5, 1, dtype=torch.long)}
    with torch.no_grad():
        hidden = torch.relu(chain.a(chain.x))
        out = chain.b(hidden)
    expected = sum(t.numel() * t.element_size() for t in (chain.x, hidden, out))
    assert cost.saved_activation_bytes(chain, batch) == expected
    # freeze the first layer: its input x is no longer needed for any gradient
    chain.a.requires_grad_(False)
    assert cost.saved_activation_bytes(chain, batch) == expected - chain.x.numel() * 4


def test_peak_memory_is_measured_in_a_fresh_process():
    """A full fine-tune's step holds gradients and two AdamW moments of every parameter (12
    bytes each in fp32) that a LoRA step does not: the measured peaks must show at least most
    of that difference. The base is large enough (vocab 2048 x hidden 1024 embeddings and head,
    one Qwen3-shaped block: ~19M parameters, ~220 MB of state) to stand out of allocator noise."""
    spec = {"kind": "qwen", "layers": 1, "batch_size": 1, "seq_len": 8, "n_calib": 1, "rank": 4,
            "threads": 1, "lib": "ours", "name": "lora"}
    lora = cost.peak_memory(spec)
    full = cost.peak_memory({**spec, "lib": "full", "name": None})
    assert "memory_error" not in lora and "memory_error" not in full, (lora, full)
    n = sum(p.numel() for p in models.qwen_like(layers=1).parameters())
    state_mb = 12 * n / 2**20
    assert full["peak_over_model_mb"] - lora["peak_over_model_mb"] > 0.5 * state_mb, (full, lora, state_mb)
    assert lora["peak_rss_mb"] >= lora["rss_model_mb"]


def test_quality_smoke_run_and_report(tmp_path):
    args = ["--rows", "head,peft:lora,lora", "--seeds", "0", "--steps", "2", "--n-train", "64",
            "--n-test", "32", "--calib-batches", "1", "--batch-size", "8", "--eval-every", "1",
            "--eval-n", "16", "--out", str(tmp_path)]
    assert quality.main(args) == 0
    data = json.loads((tmp_path / "quality.json").read_text())
    assert [r["row"] for r in data["runs"]] == ["head", "peft:lora", "lora"]
    head, peft_lora, lora = data["runs"]
    assert head["params"] == 0 and peft_lora["params"] == lora["params"] > 0
    assert peft_lora["acc"] == lora["acc"]  # same initial tensors, same math: same training
    assert all(0 <= r["acc"] <= 1 and r["finite"] for r in data["runs"])
    assert all(len(r["curve"]["loss"]) == 2 and r["curve"]["eval_steps"] == [0, 1] for r in data["runs"])
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert (tmp_path / "quality_curves.png").stat().st_size > 0
    assert "PEFT LoRA" in (tmp_path / "quality.md").read_text()
    # a second call resumes: nothing left to run, the JSON is unchanged
    assert quality.main(args) == 0
    assert json.loads((tmp_path / "quality.json").read_text())["runs"] == data["runs"]


def test_steering_evaluation_is_stored_and_reported(tmp_path):
    """Every lora-lite row gets accuracy at c = −1 … 1 through ll.scaled, a variant with a run-time
    coeff also through it; c = 1 is the trained model and c = 0 the base encoder with the trained
    head, whichever knob turns it; anchors get none; the report writes the table and the plot."""
    args = ["--rows", "head,lora,antipasto", "--seeds", "0", "--steps", "2", "--n-train", "64",
            "--n-test", "32", "--calib-batches", "8", "--batch-size", "8", "--eval-every", "0",
            "--name", "steer", "--out", str(tmp_path)]
    assert quality.main(args) == 0
    head, lora, anti = json.loads((tmp_path / "steer.json").read_text())["runs"]
    assert "steer" not in head
    assert lora["steer"]["coeffs"] == [-1.0, -0.5, 0.0, 0.5, 1.0] and "coeff" not in lora["steer"]
    for r in (lora, anti):
        assert r["steer"]["scaled"][4] == r["acc"]
    assert anti["steer"]["coeff"][4] == anti["acc"]
    assert anti["steer"]["coeff"][2] == anti["steer"]["scaled"][2]
    md = (tmp_path / "steer_steering.md").read_text()
    assert "| `antipasto` | 5e-3 | `coeff` | 1 |" in md and "| `lora` | 5e-4 | `ll.scaled` | 1 |" in md
    assert (tmp_path / "steer_steering.png").stat().st_size > 0


def test_knob_sweeps_and_lrs_are_separate_arms_that_resume_by_run_id(tmp_path):
    """--set gives the cartesian product of knob values for the rows that have the field (the
    others run once), --lr ROW=... overrides one row's lr, every arm gets its own id, the
    diagnostics are saved, and a rerun with more seeds only adds the missing runs."""
    args = ["--rows", "head,delora", "--set", "lambda0=0.5,2", "--lr", "delora=1e-3,3e-3", "--seeds", "0",
            "--steps", "2", "--n-train", "32", "--n-test", "16", "--calib-batches", "1", "--batch-size", "4",
            "--eval-every", "1", "--eval-n", "8", "--diagnose", "--schedule", "cosine",
            "--name", "arms", "--out", str(tmp_path)]
    assert quality.main(args) == 0
    runs = json.loads((tmp_path / "arms.json").read_text())["runs"]
    assert [(r["row"], r["knobs"], r["lr"]) for r in runs] == [
        ("head", {}, 3e-3), ("delora", {"lambda0": 0.5}, 1e-3), ("delora", {"lambda0": 0.5}, 3e-3),
        ("delora", {"lambda0": 2.0}, 1e-3), ("delora", {"lambda0": 2.0}, 3e-3)]
    assert len({r["id"] for r in runs}) == 5 and all("cosine" in r["id"] and "seed=0" in r["id"] for r in runs)
    delora = runs[1]["diag"]
    assert delora["steps"] == [0, 1] and set(delora["grad"]) == {"lora_A", "lora_B", "lora_lambda"}
    assert delora["scalars"]["lambda"][0] == pytest.approx(0.5)
    assert delora["dw"] and all(v[0] == 0 for v in delora["dw"].values())  # B = 0 before the first step
    assert (tmp_path / "arms_curves.png").exists()
    assert quality.main([*args[:-6], "--seeds", "0,1", *args[-6:]]) == 0
    runs2 = json.loads((tmp_path / "arms.json").read_text())["runs"]
    assert runs2[:5] == runs and len(runs2) == 10
    with pytest.raises(ValueError, match="no requested row has a config field 'lamda0'"):
        quality.main([*args[:4], "--set", "lamda0=1", *args[6:]])


def test_lr_schedules():
    f = quality.lr_factor
    assert [f(s, 10, "constant", 0) for s in (0, 9)] == [1.0, 1.0]
    assert f(0, 10, "cosine", 0) == 1.0 and f(5, 10, "cosine", 0) == pytest.approx(0.5)
    assert f(10, 10, "cosine", 0) == pytest.approx(0.0)
    assert [f(s, 12, "warmup_cosine", 4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(8, 12, "warmup_cosine", 4) == pytest.approx(0.5)


def test_training_loop_matches_the_demo_loop(minilm):
    """quality.train with the constant schedule is demo.train (same data order, same updates),
    so runs made before schedules existed stay comparable."""
    from lora_lite.tasks import make_split
    from lora_lite.demo import Classifier, load_minilm, train

    _, tok = load_minilm()
    data = make_split("comparison", "train", 16, seed=0)
    heads = []
    for loop in ("demo", "quality"):
        torch.manual_seed(0)
        encoder = minilm.fresh()
        ll.attach(encoder, ll.LoRAConfig(r=2, target_names=(r"layer\.0\.attention\.self\.query$",)))
        clf = Classifier(encoder)
        kw = dict(steps=2, batch_size=4, lr=1e-3, seed=0, head_lr=1e-2)
        train(clf, tok, data, **kw) if loop == "demo" else quality.train(clf, tok, data, **kw)
        heads.append([t.detach().clone() for t in clf.parameters() if t.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*heads))


def test_probe_measures_the_relative_weight_change():
    """‖W_eff − W‖/‖W‖ per layer against s·B A computed here, and the gradient norm per family."""
    from lora_bench.diagnose import Probe

    base = models.qwen_like(layers=1, vocab=64, tiny=True)
    model = models.qwen_like(layers=1, vocab=64, tiny=True)
    cfg = ll.LoRAConfig(r=2, alpha=4, target_names=(r"q_proj$",))
    ll.attach(model, cfg)
    (name, layer), = state_of(model).targets.items()
    with torch.no_grad():
        layer.lora_B.normal_()
    model(input_ids=torch.zeros(1, 3, dtype=torch.long)).logits.square().mean().backward()
    probe = Probe(model, base, rank=2)
    probe.log(0)
    W = base.get_submodule(name).weight
    expected = float((2.0 * layer.lora_B @ layer.lora_A).detach().norm() / W.norm())
    assert probe.record["dw"][name] == [pytest.approx(expected, rel=1e-3)]
    assert probe.record["grad"]["lora_B"] == [pytest.approx(float(layer.lora_B.grad.norm()), rel=1e-3)]


def test_ablation_report_pairs_arms_by_seed():
    runs = [{"row": "antipasto_rot", "knobs": {"rotate_basis": b}, "seed": s, "lr": 1e-2, "steps": 5,
             "acc": acc, "family": "svd", "params": 1, "head_params": 1, "train_s": 1.0, "init_s": 0.5}
            for b, accs in (("V", (0.6, 0.7, 0.8)), ("U", (0.7, 0.7, 0.9))) for s, acc in zip((0, 1, 2), accs)]
    data = {"protocol": {"batch_size": 4, "rank": 16, "task": "comparison"}, "env": {"cpu": "x", "cuda": None},
            "runs": runs, "arms": []}
    md = report.ablation_markdown("rot", data)
    diffs = [0.1, 0.0, 0.1]  # U − V per seed
    m, sd = sum(diffs) / 3, torch.tensor(diffs).std().item()
    assert f"{m:+.3f} ± {sd:.3f} (n=3)" in md
    assert "| `antipasto_rot` (rotate_basis=V) | 0.700 ± 0.100 | 3 | (reference)" in md
    # the seed's GSM8K numbers (SPEC B6.2: V 57.2, U 56.5) sit on their own arm's row
    rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| `antipasto_rot`")}
    assert "57.2" in rows["| `antipasto_rot` (rotate_basis=V)"] and "56.5" not in rows["| `antipasto_rot` (rotate_basis=V)"]
    assert "56.5" in rows["| `antipasto_rot` (rotate_basis=U)"] and "57.2" not in rows["| `antipasto_rot` (rotate_basis=U)"]


def test_rerun_report_puts_each_arm_beside_its_rows_c2_result():
    def run(row, seed, acc, lr, steps, knobs=None, dw=None):
        r = {"row": row, "knobs": knobs or {}, "seed": seed, "lr": lr, "steps": steps, "acc": acc,
             "family": "x", "params": 1, "head_params": 1, "train_s": 1.0, "init_s": 0.5,
             "schedule": "constant" if steps == 5 else "warmup_cosine", "warmup_steps": 0 if steps == 5 else 2}
        if dw is not None:  # two target layers, three logged steps
            r["diag"] = {"steps": [0, 5, 9], "grad": {}, "topr": [None, 0.1, 0.1], "scalars": {},
                         "dw": {"a": [0.0, 0.5, dw - 0.01], "b": [0.0, 0.5, dw + 0.01]}}
        return r

    env = {"cpu": "x", "cuda": None}
    proto = {"batch_size": 4, "rank": 16, "task": "comparison"}
    before = {"protocol": proto, "env": env, "arms": [], "runs": [
        run(row, s, acc, lr, 5) for row, lr, accs in (("head", 1e-3, (0.5, 0.52)), ("delora", 1e-3, (0.6, 0.8)))
        for s, acc in zip((0, 1), accs)]}
    after = {"protocol": proto, "env": env, "arms": [], "runs": [
        run("head", 1, 0.52, 1e-3, 10), run("head", 0, 0.50, 1e-3, 10),
        *(run("delora", s, acc, 1e-3, 10, {"lambda0": lam}, dw)
          for lam, accs, dw in ((1.0, (0.95, 0.97), 0.02), (15.0, (0.5, 0.52), 0.2)) for s, acc in zip((1, 0), accs))]}
    md = report.rerun_markdown(before, after)
    lines = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
    # the C2 result appears once per row, on its first arm; per-seed values in seed order
    assert lines["| `delora` (lambda0=1.0)"].split(" | ")[1:] == [
        "0.700 ± 0.141 (lr 1e-3)", "1e-3", "0.960 ± 0.014 (2)", "0.970, 0.950", "0.020", "yes |"]
    assert lines["| `delora` (lambda0=15.0)"].split(" | ")[1:] == [
        "", "1e-3", "0.510 ± 0.014 (2)", "0.520, 0.500", "0.200", "**no** |"]
    assert lines["| head-only"].split(" | ")[1:4] == ["0.510 ± 0.014 (lr 1e-3)", "1e-3", "0.510 ± 0.014 (2)"]


def test_cost_coefficients_times_float_and_tensor_strengths(tmp_path):
    """`cost --coefficients`: per variant, c = 1, a float c and the same value as (batch,) and
    (batch, seq) tensors (and coeff for the gain family), with paired ratios to the float."""
    assert cost.main(["--coefficients", "--models", "tiny", "--variants", "lora,antipasto", "--repeats", "2",
                      "--warmup", "0", "--out", str(tmp_path)]) == 0
    (m,) = json.loads((tmp_path / "cost_coefficients.json").read_text())["models"]
    lora, anti = m["rows"]
    assert list(lora["members"]) == ["c=1", "c=0.5", "c (batch,)", "c (batch, seq)"]
    assert list(anti["members"])[4:] == ["coeff=0.5", "coeff (batch,)"]
    for key in ("c (batch,)", "c (batch, seq)"):
        assert math.isfinite(lora["members"][key]["step_ratio_vs_c=0.5"])
    assert math.isfinite(anti["members"]["coeff (batch,)"]["step_ratio_vs_coeff=0.5"])


def test_cost_summary_reads_each_shared_method_per_model():
    def row(group, lib, ratio=None, us=None):
        r = {"group": group, "lib": lib, "method": {"lora": "LoRA", "lora_xs": "—"}[group]}
        if ratio is not None:
            r["ratio_vs_peft"] = ratio
        if us is not None:
            r["step_us_per_target"] = us
        return r

    data = {"env": {"date": "2026-12-07 11:00 UTC"}, "models": [
        {"kind": "minilm", "rows": [row("lora", "base"), row("lora", "ours", 0.97, 2580.0), row("lora", "peft", None, 3065.0),
                                    row("lora_xs", "ours")]},
        {"kind": "tiny64", "rows": [row("lora", "ours", 0.92, 105.4), row("lora", "peft", None, 133.2)]}]}
    md = report.cost_summary_markdown(data)
    (line,) = [x for x in md.splitlines() if x.startswith("| `")]
    assert line == "| `lora` ↔ LoRA | **0.97** | 105 / 133 (**0.92**) |"  # lora_xs has no PEFT row: left out
    assert "measured 2026-12-07" in md
    assert report.cost_summary_markdown({"env": {"date": "x"}, "models": [{"kind": "minilm", "rows": [
        row("lora_xs", "ours")]}]}) is None


def test_rerun_report_without_diagnostics_has_no_dw_column():
    env, proto = {"cpu": "x", "cuda": None}, {"batch_size": 4, "rank": 16, "task": "comparison"}
    run = {"row": "lora", "knobs": {}, "lr": 1e-3, "family": "x", "params": 1, "head_params": 1, "train_s": 1.0,
           "init_s": 0.5}
    before = {"protocol": proto, "env": env, "runs": [{**run, "seed": s, "acc": a, "steps": 5, "schedule": "constant",
                                                       "warmup_steps": 0} for s, a in ((0, 0.6), (1, 0.8))]}
    after = {"protocol": proto, "env": env, "runs": [{**run, "seed": s, "acc": a, "steps": 10,
                                                      "schedule": "warmup_cosine", "warmup_steps": 2}
                                                     for s, a in ((0, 0.9), (1, 0.95))]}
    md = report.rerun_markdown(before, after, "quality_600")
    assert "`results/quality_600.md`" in md and "ΔW/W" not in md
    (line,) = [x for x in md.splitlines() if x.startswith("| `lora`")]
    assert line.split(" | ")[1:] == ["0.700 ± 0.141 (lr 1e-3)", "1e-3", "0.925 ± 0.035 (2)", "0.900, 0.950", " |"]


def test_no_head_only_verdict_from_a_single_seed():
    run = {"knobs": {}, "lr": 1e-3, "family": "x", "params": 1, "head_params": 1, "train_s": 1.0, "init_s": 0.5,
           "steps": 10, "schedule": "constant", "warmup_steps": 0}
    one = {"runs": [{**run, "row": "head", "seed": 0, "acc": 0.5}, {**run, "row": "lora", "seed": 0, "acc": 0.55}]}
    assert [s["beats_head"] for s in report.quality_rows(one)] == [None, None]
    two = {"runs": one["runs"] + [{**run, "row": "head", "seed": 1, "acc": 0.52},
                                  {**run, "row": "lora", "seed": 1, "acc": 0.57}]}
    assert [s["beats_head"] for s in report.quality_rows(two)] == [None, True]


def test_rows_all_is_every_variant_and_each_peft_row_of_the_same_method():
    from lora_bench import adapters
    from lora_lite.variant import REGISTRY

    got = quality.rows(["all"])
    assert set(REGISTRY) <= set(got) and {"head", "full", "peft:lora"} <= set(got)
    peft_rows = [r for r in got if r.startswith("peft:")]
    assert len(peft_rows) == len(set(peft_rows))
    assert all(adapters.peft_method(r[5:]) == r[5:] for r in peft_rows)
    assert "peft:antipasto_corda" not in got and "peft:pissa" in got and "peft:ia3_ff" in got


def test_best_lr_is_chosen_per_family_by_mean_accuracy():
    runs = [{"row": "lora", "lr": 1e-3, "acc": 0.5}, {"row": "peft:lora", "lr": 1e-3, "acc": 0.9},
            {"row": "lora", "lr": 3e-4, "acc": 0.7}, {"row": "peft:lora", "lr": 3e-4, "acc": 0.6},
            {"row": "peft:lora", "lr": 3e-3, "acc": 0.95},  # not run by every lora-family row
            {"row": "ia3", "lr": 5e-3, "acc": 0.7}, {"row": "ia3_ff", "lr": 5e-3, "acc": 0.7},
            {"row": "ia3", "lr": 1e-3, "acc": 0.7}, {"row": "ia3_ff", "lr": 1e-3, "acc": 0.7}]
    best = quality.best_lrs({"runs": runs})
    assert best == {"lora": 1e-3, "gain": 1e-3}  # lora: mean 0.7 > 0.65; gain: tie -> smaller
    assert quality.family("dora") == quality.family("peft:lora") == "lora"


def test_the_benchmark_doc_tables_are_generated_from_the_committed_results():
    texts = {str(d): d.read_text() for d in report.DOCS}
    generated = report.blocks(ROOT / "results")
    assert {"cost", "quality", "quality-sweep"} <= set(generated), "results JSON missing"
    if list((ROOT / "results").glob("ablation_*.json")):
        assert "ablations" in generated
    if (ROOT / "results" / "quality_rerun.json").exists():
        assert "quality-rerun" in generated
    if (ROOT / "results" / "frontier.json").exists():
        assert "<!-- bench:frontier-claim:start -->" in texts[str(ROOT / "README.md")]
    assert report.render_docs(texts, generated) == texts, "run `python -m lora_bench report`"


def test_the_cost_block_shows_the_64_wide_model_as_per_target_overhead(tmp_path):
    """C1 run with --models minilm,qwen,tiny64: the ratio columns cover MiniLM and the decoder;
    the 64-wide model follows as the µs-per-hooked-layer table."""
    cost = json.loads((ROOT / "results" / "cost.json").read_text())
    big = [m for m in cost["models"] if m["kind"] != "tiny64"]
    small = ([m for m in cost["models"] if m["kind"] == "tiny64"]
             or json.loads((ROOT / "results" / "cost_tiny64.json").read_text())["models"])
    (tmp_path / "cost.json").write_text(json.dumps({**cost, "models": big + small}))
    block = report.blocks(tmp_path)["cost"]
    ratio, per_target = block.split("Per-target overhead:")
    assert "MiniLM-L6: ours / PEFT step" in ratio and "64-wide" not in ratio
    assert "**64-wide Qwen3 (per-target overhead)" in per_target and "| `lora` | 56 |" in per_target
    (tmp_path / "cost.json").write_text(json.dumps({**cost, "models": big}))  # no tiny64: ratios only
    assert report.blocks(tmp_path)["cost"] == report.ratio_markdown({**cost, "models": big})


def test_cost_update_keeps_the_other_models_in_column_order(tmp_path, monkeypatch):
    """--update re-measures only --models; the kept and new models come out minilm, qwen, tiny64."""
    (tmp_path / "cost.json").write_text(json.dumps({"models": [{"kind": "qwen", "old": True},
                                                               {"kind": "minilm", "old": True}]}))

    def fake_run_model(kind, shape, p, save):
        save({"kind": kind, "old": False})

    monkeypatch.setattr(cost, "run_model", fake_run_model)
    monkeypatch.setattr(report, "write_cost_file", lambda out, name: None)
    assert cost.main(["--models", "tiny64,minilm", "--update", "--out", str(tmp_path)]) == 0
    got = json.loads((tmp_path / "cost.json").read_text())["models"]
    assert [(m["kind"], m["old"]) for m in got] == [("minilm", False), ("qwen", True), ("tiny64", False)]


def test_cli_lists_the_benchmarks(capsys):
    from lora_bench.__main__ import main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(f"\n  {name} " in out for name in ("cost", "quality", "gsm8k", "report"))
    assert main(["frobnicate"]) == 2
    assert "unknown benchmark 'frobnicate'" in capsys.readouterr().err


def test_cost_console_line_labels_every_number():
    from lora_bench.cost import _summary

    line = _summary("minilm", {"lib": "ours", "variant": "ia3", "step_ms": 56.2, "step_overhead_pct": 8.0,
                               "ratio_vs_peft": 0.93, "saved_over_base_mb": 1.5})
    assert "median step     56.2 ms" in line
    assert "over base +8% (paired ratio)" in line and "ours/PEFT step 0.93 (paired ratio)" in line
    assert "saved for backward +1.5 MiB over base" in line
    assert _summary("minilm", {"lib": "base", "variant": None, "step_ms": 122.8}).count(";") == 0


def test_peft_pairs_set_each_peft_row_beside_ours_seed_by_seed():
    env, proto = {"cpu": "x", "cuda": None}, {"batch_size": 4, "rank": 16, "task": "comparison"}
    base = {"knobs": {}, "family": "x", "params": 1, "head_params": 1, "train_s": 1.0, "init_s": 0.5, "steps": 4,
            "schedule": "warmup_cosine", "warmup_steps": 1}
    loss = [0.7, 0.6, 0.5, 0.4]

    def run(row, seed, acc, curve, lr=1e-3):
        return {**base, "row": row, "seed": seed, "acc": acc, "lr": lr, "curve": {"loss": curve}}

    data = {"protocol": proto, "env": env, "runs": [
        run("lora", 0, 0.9, loss), run("peft:lora", 0, 0.9, loss),
        run("lora", 1, 0.8, loss), run("peft:lora", 1, 0.8, [0.7, 0.6, 0.5, 0.4009]),
        run("pissa", 0, 0.9, loss), run("peft:pissa", 0, 0.85, [0.7, 0.6005, 0.52, 0.4]),
        run("dora", 0, 0.9, loss), run("peft:dora", 0, 0.9, loss, lr=5e-4),  # another lr: no pair
        run("peft:hra", 0, 0.7, loss)]}  # no row of ours: no pair
    md = report.peft_pairs_markdown(data)
    lines = {x.split(" | ")[0]: x.split(" | ")[1:] for x in md.splitlines() if x.startswith("| `")}
    assert lines == {"| `lora`": ["1e-3", "0.900, 0.800", "0.900, 0.800", "+0.000", "2 of 2", "all 4, all 4 |"],
                     "| `pissa`": ["1e-3", "0.900", "0.850", "+0.050", "0 of 1", "2 |"]}
    assert report.peft_pairs_markdown({**data, "runs": data["runs"][-2:]}) is None
