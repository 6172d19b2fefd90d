"""C2 quality, offline: does each adapter learn?

    lora-lite bench quality --sweep     learning-rate sweep: one seed, fewer steps, every row
    lora-lite bench quality             3 seeds per row at the lr the sweep chose
    lora-lite bench quality --quick     a smoke run (tiny budget, three rows)

The real pretrained MiniLM-L6 (mean-pooled embedding + a linear head that trains in every row)
is fine-tuned on the seeded "comparison" task ("thirty-one is more than 29", true/false) and
scored on held-out sentences whose operand pairs never occur in training. Rows: head-only
(lower anchor), full fine-tune (upper anchor), HF PEFT LoRA, and every lora-lite variant
(adapters on every encoder linear). Calibrated variants get batches from the training split.
Same steps, batch and data for every row; AdamW, constant lr, no weight decay (demo.train),
the head at a fixed `--head-lr`, the adapter (or encoder) at the row's lr. A "peft:<method>"
row starts from the same initial adapter tensors as our row of that method (copied in), so the
two differ only by implementation.

Learning rates: each row is swept over its family's grid (FAMILY_GRID) on seed 100 and
--sweep-steps steps, scored on a held-out set re-sampled with that seed; the final run uses
the lr with the best mean accuracy over the rows of each family (`best_lrs`). Runs are appended to the JSON as they finish,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from lora_lite.interop.peft import PEFT_METHODS, copy_to_peft

from . import adapters
from .common import environment, parse_list, read_json, write_json

FAMILY_GRID = {
    "head": (1e-3, 3e-3, 1e-2),
    "full": (2e-5, 5e-5, 1e-4),
    "lora": (3e-4, 5e-4, 1e-3, 3e-3),
    "pissa": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),  # principal-subspace init: updates are large from step 0
    "lora_xs": (1e-4, 3e-4, 1e-3, 4e-3, 1e-2),
    "delora": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
    "hra": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3),
    "gain": (1e-3, 5e-3, 2e-2, 5e-2),
    "road": (1e-3, 3e-3, 5e-3, 1e-2, 2e-2),  # rotation angles: unstable where IA3 gates are best
    "svd": (1e-3, 5e-3, 2e-2, 5e-2),  # r scalar gains per layer: large steps
    "dplr": (1e-4, 3e-4, 1e-3, 3e-3),
}
ANCHORS = {"head": "head", "full": "full", "peft:lora": "lora"}  # row -> family
SWEEP_SEED = 100


def rows(names: list[str] | None = None) -> list[str]:
    """The requested rows (default: anchors, then every registered variant) in order; a
    "peft:<variant>" row runs PEFT's implementation of that variant's method."""
    wanted = names or [*ANCHORS, *adapters.SETTINGS]
    peft_rows = [n for n in wanted if n.startswith("peft:") and n not in ANCHORS]
    for n in peft_rows:
        if adapters.SETTINGS.get(n[5:]) is None or adapters.peft_method(n[5:]) is None:
            raise KeyError(f"{n}: PEFT has no method for {n[5:]!r}")
    variants = adapters.available([n for n in wanted if n not in ANCHORS and n not in peft_rows])
    return [n for n in wanted if n in ANCHORS or n in peft_rows or n in variants]


def family(row: str) -> str:
    return ANCHORS.get(row) or adapters.SETTINGS[row.removeprefix("peft:")].family


def prepare(row: str, encoder, calibration: list, rank: int) -> int:
    """Make `encoder` trainable the way `row` says; returns the number of encoder trainables.
    Rows "peft:<method>" attach HF PEFT's implementation of <method> with our settings."""
    from .models import TARGETS

    if row == "head":
        encoder.requires_grad_(False)
    elif row != "full":
        name = row.removeprefix("peft:")
        targets = TARGETS["minilm"]
        cfg = adapters.make_config(name, rank, targets, adapters.geometry(encoder, targets))
        if row.startswith("peft:"):
            # Start PEFT from the very tensors our row starts from (same seed), so the two rows
            # differ only by implementation, not by how each library draws its random init.
            # Data-driven PEFT inits (EVA) keep their own.
            ours = copy.deepcopy(encoder)
            adapters.attach_ours(ours, cfg, calibration)
            rng = torch.random.get_rng_state()  # where our row's RNG stands after attach
            method = adapters.peft_method(name)
            pm = adapters.attach_peft(encoder, method, cfg, adapters.target_names(encoder, cfg), calibration)
            if method in PEFT_METHODS and method != "eva":
                copy_to_peft(ours, pm)
            torch.random.set_rng_state(rng)
        else:
            adapters.attach_ours(encoder, cfg, calibration)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def run_one(base, row: str, seed: int, lr: float, p: dict) -> dict:
    """Train one row for one seed at one lr; accuracy on the held-out split."""
    from lora_lite.bench.tasks import make_split
    from lora_lite.demo import Classifier, evaluate, train

    encoder0, tok = base
    train_set = make_split(p["task"], "train", p["n_train"], seed=seed)
    test_set = make_split(p["task"], "test", p["n_test"], seed=seed)
    calibration = [
        dict(tok([t for t, _ in train_set[i: i + p["batch_size"]]], padding=True, return_tensors="pt"))
        for i in range(0, p["calib_batches"] * p["batch_size"], p["batch_size"])
    ]
    torch.manual_seed(seed)
    encoder = copy.deepcopy(encoder0)
    t0 = time.perf_counter()
    n_encoder = prepare(row, encoder, calibration, p["rank"])
    init_s = time.perf_counter() - t0
    clf = Classifier(encoder)
    secs = train(clf, tok, train_set, steps=p["steps"], batch_size=p["batch_size"], lr=lr, seed=seed,
                 head_lr=lr if row == "head" else p["head_lr"])
    acc, logits = evaluate(clf, tok, test_set)
    return {
        "row": row, "family": family(row), "seed": seed, "lr": lr, "steps": p["steps"],
        "acc": acc, "train_s": round(secs, 2), "init_s": round(init_s, 3),
        "params": n_encoder, "head_params": sum(q.numel() for q in clf.head.parameters()),
        "finite": bool(torch.isfinite(logits).all()),
    }


def best_lrs(sweep: dict | None) -> dict[str, float]:
    """family -> lr: the lr with the best mean sweep accuracy over the family's rows, among the
    lrs every swept row of the family ran (ties: the smaller lr). One choice per family keeps a
    single unlucky seed from handicapping one row (ours and PEFT's LoRA, the same math, get the
    same lr), and rows added later inherit their family's lr."""
    acc: dict[str, dict[str, dict[float, float]]] = {}
    for r in (sweep or {}).get("runs", []):
        acc.setdefault(family(r["row"]), {}).setdefault(r["row"], {})[r["lr"]] = r["acc"]
    chosen = {}
    for fam, per_row in acc.items():
        common = set.intersection(*(set(v) for v in per_row.values()))
        if common:
            chosen[fam] = max(sorted(common), key=lambda lr: statistics.fmean(v[lr] for v in per_row.values()))
    return chosen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lora-lite bench quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="run the learning-rate sweep instead")
    ap.add_argument("--rows", help="comma-separated rows (head, full, peft:lora, variant names)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--sweep-steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--task", default="comparison")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--out", default="results")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared 2-core machine more threads oversubscribe)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rows, 1 seed, 20 steps")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in the JSON")
    a = ap.parse_args(argv)

    if a.quick:
        a.rows, a.seeds, a.steps, a.sweep_steps, a.n_test = a.rows or "head,peft:lora,lora", "0", 20, 20, 200
    p = {"task": a.task, "steps": a.sweep_steps if a.sweep else a.steps, "batch_size": a.batch_size,
         "n_train": a.n_train, "n_test": a.n_test, "rank": a.rank, "head_lr": a.head_lr,
         "calib_batches": a.calib_batches}
    out = Path(a.out)
    suffix = "_quick" if a.quick else ""
    path = out / f"quality{'_sweep' if a.sweep else ''}{suffix}.json"
    chosen = {} if a.sweep else best_lrs(read_json(out / f"quality_sweep{suffix}.json"))

    torch.set_num_threads(a.threads)
    from lora_lite.demo import load_minilm

    base = load_minilm()
    base[0].eval()
    todo = []  # seed-major, so an interrupted final run still has every row for the first seeds
    for seed in [SWEEP_SEED] if a.sweep else [int(s) for s in parse_list(a.seeds)]:
        for row in rows(parse_list(a.rows)):
            grid = FAMILY_GRID[family(row)]
            lrs = grid if a.sweep else [chosen.get(family(row), grid[(len(grid) - 1) // 2])]
            todo += [(row, seed, lr) for lr in lrs]

    old = None if a.fresh else read_json(path)
    data = old if old and old.get("protocol") == p else {"protocol": p, "runs": []}
    data["env"] = environment()
    data["lr_source"] = "sweep" if a.sweep else ("quality_sweep.json" if chosen else "family default")
    done = {(r["row"], r["seed"], r["lr"]) for r in data["runs"]}
    for i, (row, seed, lr) in enumerate(todo):
        if (row, seed, lr) in done:
            continue
        res = run_one(base, row, seed, lr, p)
        data["runs"].append(res)
        write_json(path, data)
        print(f"[{i + 1}/{len(todo)}] {row:18s} seed {seed:3d} lr {lr:.0e}: acc {res['acc']:.3f} "
              f"({res['train_s']:.0f} s, {res['params']:,} params)", flush=True)

    from . import report

    report.write_quality(out, sweep=a.sweep, suffix=suffix)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
