"""The quality-against-params benchmark (lora_bench.frontier): the grid it plans, the validation
split its lr choice reads (and only that), the frontier verdicts, and a quick end-to-end run."""

from __future__ import annotations

import json
import math
import zlib

import pytest

from lora_bench import arms, frontier, quality, report
from lora_lite.tasks import make_split, number_words
from lora_lite.variant import REGISTRY

# ---- the grid -----------------------------------------------------------------------------------


def _minilm_linears(model) -> list[tuple[int, int]]:
    """(d_in, d_out) of the 6 linears of each encoder block, from the model's config alone."""
    h, i = model.config.hidden_size, model.config.intermediate_size
    per_block = [(h, h)] * 4 + [(h, i), (i, h)]  # query, key, value, attention.output; intermediate; output
    return per_block * model.config.num_hidden_layers


def test_grid_is_the_arms_of_its_data_file_with_the_papers_param_counts(minilm):
    spec = json.loads(frontier.GRID.read_text())
    expected = []
    for entry in spec["arms"]:  # a row at its sizes, or every member of a family at the family's
        rows = [entry["row"]] if "row" in entry else [n for n, v in REGISTRY.items() if v.bench.family == entry["family"]]
        assert rows, entry
        expected += [(row, size) for row in rows for size in entry.get("sizes", [None])]
    arms = frontier.grid(minilm.model)
    assert [(a["row"], a["size"]) for a in arms] == expected
    shapes = _minilm_linears(minilm.model)
    assert len(shapes) == 36
    for a in arms:
        variant = REGISTRY[a["row"]]
        if variant.params_per_layer is None:
            continue
        cfg = variant.config(**a["knobs"])  # an arm's knobs are its config fields
        want = sum(variant.params_per_layer(i, o, cfg) for i, o in shapes)
        assert a["params"] == want, a["label"]
        assert len(a["lrs"]) == 3 and a["lrs"] == sorted(a["lrs"])
        assert a["lrs"] == spec["lrs"][variant.bench.family]
    assert next(a for a in arms if a["label"] == "lora r=1")["params"] == 41_472  # Σ (d_in + d_out)
    assert next(a for a in arms if a["label"] == "lora r=4")["knobs"] == {"r": 4, "alpha": 8.0}  # alpha = 2r


def test_an_svd_arm_attaches_at_its_own_rank_not_the_settings_default(minilm):
    """The SVD family's benchmark setting pins r = 256; the r = 32 arm must train 36·32 gains."""
    arm = next(a for a in frontier.grid(minilm.model, rows=["antipasto"]) if a["size"] == 32)
    encoder = minilm.fresh()
    assert quality.prepare("antipasto", encoder, minilm.calibration, 16, arm["knobs"]) == 36 * 32 == arm["params"]


def test_grid_refuses_a_row_it_does_not_have(minilm):
    with pytest.raises(ValueError, match=r"--rows dora: not in the grid"):
        frontier.grid(minilm.model, rows=["lora", "dora"])


# ---- the validation split -----------------------------------------------------------------------

_NUMBER = {number_words(n): n for n in range(100)} | {str(n): n for n in range(100)}


def _pairs(split) -> set[tuple[int, int]]:
    """Unordered operand pairs of "A is more/less than B" sentences."""
    out = set()
    for text, _ in split:
        words = text.split(" ")
        a, b = _NUMBER[words[0]], _NUMBER[words[-1]]
        out.add((min(a, b), max(a, b)))
    return out


def _hash(pair) -> float:
    return zlib.crc32(f"{pair[0]},{pair[1]}".encode()) / 2**32


def test_validation_pairs_are_disjoint_from_training_and_test():
    kw = dict(val_fraction=frontier.VAL_FRACTION)
    train = _pairs(make_split("comparison", "train", 3000, seed=0, **kw))
    val = _pairs(make_split("comparison", "val", 1000, seed=0, **kw))
    test = _pairs(make_split("comparison", "test", 1000, seed=0))
    assert val and not val & train and not val & test and not train & test
    # carved out of the training pool: the hash band just above the test band
    assert all(0.3 <= _hash(p) < 0.3 + frontier.VAL_FRACTION for p in val)
    assert all(_hash(p) >= 0.3 + frontier.VAL_FRACTION for p in train)
    # the test split is the C2 one whatever the validation fraction
    assert make_split("comparison", "test", 200, seed=3, **kw) == make_split("comparison", "test", 200, seed=3)


def test_validation_split_needs_a_fraction():
    with pytest.raises(ValueError, match="split 'val' needs val_fraction > 0"):
        make_split("comparison", "val", 10, seed=0)
    with pytest.raises(ValueError, match="their sum < 1"):
        make_split("comparison", "train", 10, seed=0, val_fraction=0.8)


# ---- the lr choice ------------------------------------------------------------------------------

ARM = {"label": "lora r=1", "row": "lora", "size": 1, "knobs": {"r": 1, "alpha": 2.0}, "params": 41_472,
       "lrs": [2e-4, 5e-4, 1e-3]}


def _run(lr, seed, val_acc, acc, arm=ARM):
    return {**arms.frontier_run(arm, lr, seed, 600, 30), "val_acc": val_acc, "acc": acc, "params": arm["params"]}


def test_lr_choice_reads_only_validation_scores():
    """Seed 0's test scores would pick 2e-4; its validation scores pick 5e-4, and so does the
    benchmark: the follow-up seeds run at 5e-4 and the reported lr is 5e-4."""
    runs = [_run(2e-4, 0, val_acc=0.70, acc=0.99), _run(5e-4, 0, val_acc=0.80, acc=0.60),
            _run(1e-3, 0, val_acc=0.75, acc=0.70)]
    assert max(runs, key=lambda r: r["acc"])["lr"] == 2e-4  # the planted test score
    assert arms.choose_lr(arms.val_scores(ARM, runs, 0, 600, 30)) == 5e-4
    todo = frontier.pending([ARM], runs, [0, 1, 2], 600, 30)
    assert [(s["lr"], s["seed"]) for s in todo] == [(5e-4, 1), (5e-4, 2)]
    runs += [_run(5e-4, 1, 0.81, 0.62), _run(5e-4, 2, 0.79, 0.64)]
    data = {"grid": [ARM], "runs": runs, "seeds": [0, 1, 2], "steps": 600, "warmup_steps": 30}
    (s,) = report.frontier_summary(data)
    assert s["lr"] == 5e-4 and s["accs"] == [0.60, 0.62, 0.64]


def test_follow_up_seeds_wait_for_every_lr_and_ties_go_to_the_smaller_lr():
    runs = [_run(2e-4, 0, 0.7, 0.5), _run(5e-4, 0, 0.8, 0.5)]
    todo = frontier.pending([ARM], runs, [0, 1], 600, 30)
    assert [(s["lr"], s["seed"]) for s in todo] == [(1e-3, 0)]
    runs.append(_run(1e-3, 0, 0.8, 0.5))
    assert [(s["lr"], s["seed"]) for s in frontier.pending([ARM], runs, [0, 1], 600, 30)] == [(5e-4, 1)]


def test_an_edge_lr_extends_the_grid_until_it_is_beaten():
    """Seed 0 is best at the grid's top lr 1e-3: 2e-3 runs before any follow-up seed; it wins,
    so 4e-3 runs; that loses, and seeds 1, 2 run at 2e-3."""
    runs = [_run(2e-4, 0, 0.70, 0.5), _run(5e-4, 0, 0.80, 0.5), _run(1e-3, 0, 0.85, 0.5)]
    todo = frontier.pending([ARM], runs, [0, 1, 2], 600, 30)
    assert [(s["lr"], s["seed"]) for s in todo] == [(2e-3, 0)]
    assert arms.chosen_lr(ARM, runs, 0, 600, 30) is None
    runs.append(_run(2e-3, 0, 0.90, 0.5))
    assert [(s["lr"], s["seed"]) for s in frontier.pending([ARM], runs, [0, 1, 2], 600, 30)] == [(4e-3, 0)]
    runs.append(_run(4e-3, 0, 0.60, 0.5))
    assert arms.arm_lrs(ARM, runs, 0, 600, 30) == [2e-4, 5e-4, 1e-3, 2e-3, 4e-3]
    assert [(s["lr"], s["seed"]) for s in frontier.pending([ARM], runs, [0, 1, 2], 600, 30)] == [(2e-3, 1), (2e-3, 2)]


def test_edge_extension_goes_down_and_stops_at_the_cap():
    runs = [_run(2e-4, 0, 0.90, 0.5), _run(5e-4, 0, 0.80, 0.5), _run(1e-3, 0, 0.70, 0.5),
            _run(1e-4, 0, 0.91, 0.5), _run(5e-5, 0, 0.92, 0.5)]
    assert arms.arm_lrs(ARM, runs, 0, 600, 30) == [5e-5, 1e-4, 2e-4, 5e-4, 1e-3]  # 2 steps: the cap
    assert arms.chosen_lr(ARM, runs, 0, 600, 30) == 5e-5
    data = {"grid": [ARM], "runs": runs, "seeds": [0], "steps": 600, "warmup_steps": 30}
    (s,) = report.frontier_summary(data)
    assert s["lr"] == 5e-5 and sorted(s["scores"]) == [5e-5, 1e-4, 2e-4, 5e-4, 1e-3] and s["capped"]
    runs[-1] = _run(5e-5, 0, 0.90, 0.5)  # the second extension loses: 1e-4 is chosen, not at the cap
    (s,) = report.frontier_summary({**data, "runs": runs})
    assert s["lr"] == 1e-4 and not s["capped"]


def test_the_steering_table_reads_only_runs_at_the_chosen_lr():
    steer = {"coeffs": [-1.0, 0.0, 1.0], "scaled": [0.4, 0.5, 0.9]}
    runs = [{**_run(2e-4, 0, 0.70, 0.5), "steer": steer}, {**_run(5e-4, 0, 0.80, 0.6), "steer": steer},
            {**_run(1e-3, 0, 0.75, 0.7), "steer": steer}, {**_run(5e-4, 1, 0.8, 0.6), "steer": steer}]
    data = {"grid": [ARM], "runs": runs, "seeds": [0, 1], "steps": 600, "warmup_steps": 30, "protocol": {"n_test": 10}}
    kept = report.frontier_steering_data(data)["runs"]
    assert [(r["lr"], r["seed"]) for r in kept] == [(5e-4, 0), (5e-4, 1)]
    (row,) = report.steering_rows(report.frontier_steering_data(data))
    assert row["lr"] == 5e-4 and row["n"] == 2 and row["accs"] == [0.4, 0.5, 0.9]


def test_steer_missing_reruns_only_chosen_lr_runs_without_a_record():
    """Seed 0 at 2e-4 lost the lr choice: never rerun. At the chosen 5e-4, seed 0 has its record
    and seed 1 does not: only seed 1 is listed, and the rerun's record lands on the stored run."""
    steer = {"coeffs": [-1.0, 0.0, 1.0], "scaled": [0.4, 0.5, 0.9]}
    runs = [_run(2e-4, 0, 0.70, 0.5), {**_run(5e-4, 0, 0.80, 0.6), "steer": steer},
            _run(1e-3, 0, 0.75, 0.7), _run(5e-4, 1, 0.8, 0.61)]
    for r in runs:
        r["id"] = arms.run_id(r)
    (spec,) = frontier.unsteered([ARM], runs, [0, 1], 600, 30)
    assert (spec["lr"], spec["seed"]) == (5e-4, 1)
    assert frontier.pending([ARM], runs, [0, 1], 600, 30) == []  # nothing new to train
    rerun = {**_run(5e-4, 1, 0.8, 0.61), "train_s": 12.0, "steer": steer}
    stored = frontier.add_steering(runs, rerun)
    assert stored is runs[3] and stored["steer"] == steer and stored["steer_rerun"]["acc"] == 0.61
    assert len(runs) == 4 and frontier.unsteered([ARM], runs, [0, 1], 600, 30) == []


def test_steer_missing_and_no_steer_contradict():
    with pytest.raises(SystemExit):
        frontier.main(["--quick", "--steer-missing", "--no-steer", "--list"])


# ---- frontier verdicts --------------------------------------------------------------------------

LORA = [(1_000, 0.80, 0.01), (10_000, 0.90, 0.01)]  # at log10 params 3 and 4: a seed may sit ±0.02 away


@pytest.mark.parametrize("params, accs, verdict, side, f_mean", [
    (10 ** 3.5, [0.88, 0.90, 0.92], "above", None, 0.85),  # halfway in log10: the frontier reads 0.85
    (10 ** 3.5, [0.85, 0.86, 0.90], "on", None, 0.85),     # no seed more than 0.02 below
    (10 ** 3.5, [0.80, 0.81, 0.82], "below", None, 0.85),
    (10 ** 3.25, [0.80, 0.80], "below", None, 0.825),      # a quarter of the way; −0.025 is beyond 0.02
    (10_000, [0.90], "on", None, 0.90),                    # at a LoRA point: that point
    (100, [0.81, 0.80], "on", "fewer", 0.80),              # outside: the nearest end, r = smallest
    (100, [0.70, 0.72], "below", "fewer", 0.80),
    (100_000, [0.95, 0.96], "above", "more", 0.90),
    # one collapsed seed: its mean is within the combined std (0.85 ± 0.26 against 0.90 ± 0.01),
    # which the old rule called "on"; here the seed counts on its own
    (10_000, [0.95, 0.95, 0.50], "mixed", None, 0.90),
])
def test_frontier_position_on_hand_made_numbers(params, accs, verdict, side, f_mean):
    pos = report.frontier_position(LORA, params, accs)
    assert pos["frontier_mean"] == pytest.approx(f_mean)
    assert (pos["verdict"], pos["side"]) == (verdict, side)
    assert pos["tol"] == pytest.approx(0.02)


def test_seed_tolerance_is_floored_by_the_test_set_size():
    # a frontier std of 0.001 would allow a seed ±0.002; 1000 test sentences at 0.9 have a
    # binomial standard error of √(0.9·0.1/1000) = 0.0095
    assert report.seed_tolerance(0.9, 0.001, None) == pytest.approx(0.002)
    assert report.seed_tolerance(0.9, 0.001, 1000) == pytest.approx(2 * math.sqrt(0.09 / 1000))
    assert report.seed_tolerance(0.9, 0.05, 1000) == pytest.approx(0.10)


def _arm(label, row, params, accs):
    import statistics

    return {"label": label, "row": row, "params": params, "mean": statistics.fmean(accs),
            "std": statistics.stdev(accs), "accs": accs}


def test_statements_and_the_fraction_claim():
    lora = [_arm("lora r=1", "lora", 1_000, [0.79, 0.80, 0.81]), _arm("lora r=16", "lora", 16_000, [0.89, 0.90, 0.91])]
    inside = _arm("hra r=4", "hra", 4_000, [0.95, 0.96, 0.97])
    tiny = _arm("antipasto r=256", "antipasto", 500, [0.88, 0.89, 0.90])
    big = _arm("x", "x", 100_000, [0.60, 0.61, 0.62])
    v, text = report.frontier_statement(inside, lora)
    assert v == "above" and "between `lora r=1` and `lora r=16`" in text and "outside" not in text
    assert "3 of 3 seeds more than 0.020 above (highest 0.970)" in text
    v, text = report.frontier_statement(tiny, lora)
    assert v == "outside; above vs `lora r=1`" and "outside the frontier's range (fewer params than `lora r=1`" in text
    assert "with 50.0% of its params" in text
    v, text = report.frontier_statement(big, lora)
    assert v == "outside; below vs `lora r=16`" and "more params than `lora r=16`" in text and "6.2x its params" in text
    # 500 < 10% of 16,000 and no seed of 0.88-0.90 is more than 0.02 below 0.90; lora r=1 (6.2%) is
    claim = report.fraction_claim([inside, tiny, big], lora)
    assert "holds for `antipasto r=256` (3.1% of the params" in claim
    assert "`lora r=1` (6.2% of the params, 0.800 ± 0.010) does not" in claim
    claim = report.fraction_claim([inside, _arm("antipasto r=256", "antipasto", 500, [0.78, 0.80, 0.82])], lora)
    assert "holds for no arm; the best under 10% is `antipasto r=256`" in claim


def test_one_collapsed_seed_does_not_carry_the_fraction_claim():
    """IA3 on C2: two seeds at LoRA r=16's level and one at chance. Its mean ± std (0.80 ±
    0.27) contains LoRA's 0.973, so a within-the-combined-std rule let it hold the claim."""
    lora = [_arm("lora r=1", "lora", 41_472, [0.955, 0.966, 0.971]),
            _arm("lora r=16", "lora", 663_552, [0.970, 0.973, 0.976])]
    ia3 = _arm("ia3", "ia3", 20_736, [0.960, 0.965, 0.500])
    v, text = report.frontier_statement(ia3, lora, n_test=1000)
    assert v == "outside; mixed (1 of 3 seeds below) vs `lora r=1`"
    assert "1 of 3 seeds more than" in text and "(lowest 0.500)" in text
    claim = report.fraction_claim([ia3], lora, n_test=1000)
    assert claim.count("holds for no arm") == 1 and "Some seeds but not all: `ia3`" in claim
    assert "lowest seed 0.500" in claim


# ---- end to end ---------------------------------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_list_records_the_whole_grid_and_runs_nothing(tmp_path, capsys):
    """--rows narrows what runs, not what the report covers: the JSON's grid is every arm."""
    assert frontier.main(["--quick", "--rows", "ia3", "--list", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "frontier_quick.json").read_text())
    assert [a["label"] for a in data["grid"]] == ["lora r=1", "lora r=2", "ia3"] and data["runs"] == []
    listed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert len(listed) == 3 and all(line.strip().startswith("ia3 lr=") for line in listed)


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_quick_run_writes_json_and_report_and_resumes(tmp_path):
    args = ["--quick", "--steps", "2", "--n-train", "64", "--n-val", "16", "--n-test", "16", "--out", str(tmp_path)]
    assert frontier.main(args) == 0
    data = json.loads((tmp_path / "frontier_quick.json").read_text())
    assert data["bench"] == "frontier" and data["seeds"] == [0, 1]
    assert [a["label"] for a in data["grid"]] == ["lora r=1", "lora r=2", "ia3"]
    runs = data["runs"]
    assert len({r["id"] for r in runs}) == len(runs)
    for arm in data["grid"]:
        mine = [r for r in runs if r["row"] == arm["row"] and r["knobs"] == arm["knobs"]]
        first = {r["lr"]: r["val_acc"] for r in mine if r["seed"] == 0}
        assert sorted(first) == arms.arm_lrs(arm, runs, 0, data["steps"], data["warmup_steps"])
        assert set(arm["lrs"]) <= set(first) and len(first) <= len(arm["lrs"]) + arms.MAX_EDGE_STEPS
        assert len(mine) == len(first) + 1
        (second,) = [r for r in mine if r["seed"] == 1]
        assert second["lr"] == max(sorted(first), key=first.get)  # validation picks the lr
        assert all(r["params"] == arm["params"] and 0 <= r["acc"] <= 1 and 0 <= r["val_acc"] <= 1 for r in mine)
    assert report.main(["--results", str(tmp_path), "--no-doc"]) == 0
    md = (tmp_path / "frontier_quick.md").read_text()
    for label in ("lora r=1", "lora r=2", "ia3"):
        assert f"| `{label}` |" in md
    assert "**Against the LoRA frontier**" in md and "`ia3` (20.7K params" in md
    assert "LoRA quality at a fraction of the parameters" in md
    assert (tmp_path / "frontier_quick.png").stat().st_size > 0
    steering = (tmp_path / "frontier_quick_steering.md").read_text()  # seed 1 ran at the chosen lr, with steering
    assert "| `lora` (r=1" in steering and "| `ia3` |" in steering
    assert frontier.main(args) == 0  # resumes: nothing left to run
    assert json.loads((tmp_path / "frontier_quick.json").read_text())["runs"] == runs


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_steer_missing_trains_the_same_run_again_and_adds_its_record(tmp_path):
    """Runs stored without steering get it from a rerun, which repeats the stored scores to the bit."""
    args = ["--quick", "--rows", "lora", "--steps", "2", "--n-train", "64", "--n-val", "16", "--n-test", "16",
            "--out", str(tmp_path)]
    assert frontier.main([*args, "--no-steer"]) == 0
    before = json.loads((tmp_path / "frontier_quick.json").read_text())["runs"]
    assert before and not any("steer" in r for r in before)
    assert frontier.main([*args, "--steer-missing"]) == 0
    after = json.loads((tmp_path / "frontier_quick.json").read_text())["runs"]
    assert [r["id"] for r in after] == [r["id"] for r in before]  # no run added
    data = json.loads((tmp_path / "frontier_quick.json").read_text())
    chosen = {r["id"] for r in report.frontier_steering_data(data)["runs"]}
    assert len(chosen) == 4  # 2 arms x 2 seeds at their chosen lrs
    for r in after:
        assert ("steer" in r) == (r["id"] in chosen)
        if r["id"] in chosen:
            assert r["steer_rerun"]["acc"] == r["acc"] and r["steer_rerun"]["val_acc"] == r["val_acc"]
            assert r["steer"]["scaled"][r["steer"]["coeffs"].index(1.0)] == r["acc"]  # c = 1 is the trained adapter


def test_optional_report_block_renders_only_where_its_markers_are():
    body = {"frontier": "table\n"}
    assert report.render_doc("no markers here\n", body) == "no markers here\n"
    doc = "a\n<!-- bench:frontier:start -->\nold\n<!-- bench:frontier:end -->\nb\n"
    assert report.render_doc(doc, body) == doc.replace("old", "table")
    with pytest.raises(ValueError, match="no doc has <!-- bench:cost:start/end"):
        report.render_doc("no markers\n", {"cost": "x\n"})


def test_a_block_renders_into_every_doc_that_holds_it():
    a = "<!-- bench:cost:start -->\nold\n<!-- bench:cost:end -->\n"
    b = "intro\n<!-- bench:frontier-claim:start -->\nold\n<!-- bench:frontier-claim:end -->\n"
    out = report.render_docs({"a": a, "b": b}, {"cost": "c\n", "frontier-claim": "f\n", "frontier": "x\n"})
    assert out == {"a": a.replace("old", "c"), "b": b.replace("old", "f")}
    with pytest.raises(ValueError, match="bench:quality:start/end"):
        report.render_docs({"a": a, "b": b}, {"quality": "q\n"})
