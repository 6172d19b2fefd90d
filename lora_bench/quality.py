"""C2 quality, offline: does each adapter learn?

    python -m lora_bench quality --sweep     learning-rate sweep: one seed, fewer steps, every row
    python -m lora_bench quality             3 seeds per row at the lr the sweep chose
    python -m lora_bench quality --quick     a smoke run (tiny budget, three rows)

The real pretrained MiniLM-L6 (mean-pooled embedding + a linear head that trains in every row)
is fine-tuned on the seeded "comparison" task ("thirty-one is more than 29", true/false) and
scored on held-out sentences whose operand pairs never occur in training. Rows: head-only
(lower anchor), full fine-tune (upper anchor), HF PEFT LoRA, and every lora-lite variant
(adapters on every encoder linear). Calibrated variants get batches from the training split.
Same steps, batch and data for every row; AdamW, no weight decay, the head at a fixed
`--head-lr`, the adapter (or encoder) at the row's lr, times the schedule (`--schedule`:
constant by default, cosine to 0, or linear warm-up then cosine). A "peft:<method>" row starts
from the same initial adapter tensors as our row of that method (copied in), so the two differ
only by implementation.

Arms: every (row, knob values, lr, steps, schedule, seed) is one run with its own id, so sweeps
never overwrite each other. `--set KEY=V1,V2` (repeatable) runs the cartesian product of knob
values as config fields on top of the row's settings (e.g. `--set rotate_basis=V,U,both`);
`--lr 1e-3,3e-3` or `--lr ROW=LR` override the swept lr; `--name` picks the JSON file
(results/NAME.json), e.g. one per ablation. Runs with the same seed share the data order and the
adapter's random init, so arms are paired.

Curves: the loss of every step and the accuracy on the first `--eval-n` held-out sentences every
`--eval-every` steps go into each run's record. `--diagnose` adds per-step gradient norms per
trainable family and ‖ΔW‖/‖W‖ per layer (bench/diagnose.py). `--device cuda` runs on a GPU;
`--jobs N` runs independent runs in N worker processes with `--threads` torch threads each.

Steering: after training, every lora-lite row is scored on the held-out split at coefficients
STEER_COEFFS through `ll.scaled(model, c)` (y + c·Δy at every target; 0 is the base encoder with
the trained head) and, where the variant has a run-time `coeff`, through `ll.reconfigure(model,
coeff=c·coeff)`; stored as the run's "steer" record (`--no-steer` skips it).

Learning rates: each row is swept over its lr grid (`arms.grid`: the variant's
`BenchSetting.lrs`) on seed 100 and
--sweep-steps steps, scored on a held-out set re-sampled with that seed; the final run uses
the lr with the best mean accuracy over the rows of each family (`best_lrs`) unless `--lr`
says otherwise. Runs are appended
to the JSON as they finish, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
import time
import typing
from pathlib import Path

import torch
from torch import nn

from lora_lite.interop.peft import copy_to_peft, peft_methods

from . import adapters
from .arms import (  # noqa: F401  (re-exported: the run ids and lr choice live in arms.py)
    ANCHORS, SCHEDULES, SWEEP_SEED, arm_id, best_lrs, family, grid, run_id, schedule_label,
)
from .common import environment, parse_list, read_json, write_json

PROTOCOL_KEYS = ("task", "batch_size", "n_train", "n_test", "rank", "head_lr", "calib_batches")


def rows(names: list[str] | None = None) -> list[str]:
    """The requested rows (default: anchors, then every registered variant) in order; a
    "peft:<variant>" row runs PEFT's implementation of that variant's method; ["all"]: the
    default rows, then a PEFT row for every variant PEFT implements as the same method (not
    antipasto_corda: its PEFT counterpart, CorDA-initialised LoRA, is C1's attach-cost reference)."""
    if names == ["all"]:
        peft = [f"peft:{n}" for n in adapters.settings() if adapters.peft_method(n) == n and f"peft:{n}" not in ANCHORS]
        names = [*ANCHORS, *adapters.settings(), *peft]
    wanted = names or [*ANCHORS, *adapters.settings()]
    peft_rows = [n for n in wanted if n.startswith("peft:") and n not in ANCHORS]
    for n in peft_rows:
        if adapters.settings().get(n[5:]) is None or adapters.peft_method(n[5:]) is None:
            raise KeyError(f"{n}: PEFT has no method for {n[5:]!r}")
    variants = adapters.available([n for n in wanted if n not in ANCHORS and n not in peft_rows])
    return [n for n in wanted if n in ANCHORS or n in peft_rows or n in variants]


# ---- arms and run ids ---------------------------------------------------------------------------

def parse_knobs(specs: list[str] | None) -> dict[str, list[str]]:
    """["rotate_basis=V,U,both", "coeff=1"] -> {"rotate_basis": ["V", "U", "both"], "coeff": ["1"]}."""
    out: dict[str, list[str]] = {}
    for spec in specs or []:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not parse_list(values):
            raise ValueError(f"--set {spec!r}: expected KEY=V1[,V2,...], e.g. rotate_basis=V,U,both")
        out[key.strip()] = parse_list(values)
    return out


def _config_fields(row: str) -> dict[str, object]:
    """{field: type hint} of the config `row` builds (empty for head / full)."""
    import lora_lite as ll

    if row in ("head", "full"):
        return {}
    cls = ll.config.CONFIGS[row.removeprefix("peft:")]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def coerce_knob(row: str, key: str, text: str):
    """Knob text -> the config field's type for `row` (bool, int, float, or the string)."""
    hint = _config_fields(row)[key]
    if hint is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--set {key}={text}: expected true or false")
        return text.lower() in ("true", "1")
    if hint is int:
        return int(text)
    if hint is float:
        return float(text)
    return text


def knob_arms(row: str, knobs: dict[str, list[str]]) -> list[dict]:
    """The cartesian product of the knob values that `row`'s config has ([{}] when none: anchors
    and rows without those fields run once, with their settings)."""
    own = {k: v for k, v in knobs.items() if k in _config_fields(row)}
    if not own:
        return [{}]
    keys = list(own)
    return [dict(zip(keys, (coerce_knob(row, k, v) for k, v in zip(keys, combo))))
            for combo in itertools.product(*(own[k] for k in keys))]


def check_knobs(knobs: dict[str, list[str]], row_names: list[str]) -> None:
    """Every --set key must be a config field of at least one requested row."""
    for key in knobs:
        if not any(key in _config_fields(r) for r in row_names):
            raise ValueError(f"--set {key}: no requested row has a config field {key!r} "
                             f"(rows: {', '.join(row_names)})")


def lr_factor(step: int, steps: int, schedule: str, warmup: int) -> float:
    """Multiplier of every group's lr at optimizer step `step` (0-based)."""
    if schedule == "constant":
        return 1.0
    if schedule == "warmup_cosine" and step < warmup:
        return (step + 1) / warmup
    start = warmup if schedule == "warmup_cosine" else 0
    return 0.5 * (1.0 + math.cos(math.pi * (step - start) / max(1, steps - start)))


# ---- one run ------------------------------------------------------------------------------------

def prepare(row: str, encoder, calibration: list, rank: int, knobs: dict | None = None) -> int:
    """Make `encoder` trainable the way `row` says; returns the number of encoder trainables.
    Rows "peft:<method>" attach HF PEFT's implementation of <method> with our settings."""
    from .models import TARGETS

    if row == "head":
        encoder.requires_grad_(False)
    elif row != "full":
        name = row.removeprefix("peft:")
        targets = TARGETS["minilm"]
        cfg = adapters.make_config(name, rank, targets, adapters.geometry(encoder, targets), knobs)
        if row.startswith("peft:"):
            # Start PEFT from the very tensors our row starts from (same seed), so the two rows
            # differ only by implementation, not by how each library draws its random init.
            # Data-driven PEFT inits (EVA) keep their own.
            ours = copy.deepcopy(encoder)
            adapters.attach_ours(ours, cfg, calibration)
            rng = torch.random.get_rng_state()  # where our row's RNG stands after attach
            method = adapters.peft_method(name)
            pm = adapters.attach_peft(encoder, method, cfg, adapters.target_names(encoder, cfg), calibration)
            if method in peft_methods() and method != "eva":
                copy_to_peft(ours, pm)
            torch.random.set_rng_state(rng)
        else:
            adapters.attach_ours(encoder, cfg, calibration)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def _batch(tok, texts, device):
    return {k: v.to(device) for k, v in tok(texts, padding=True, return_tensors="pt").items()}


@torch.no_grad()
def evaluate(clf, tok, data, device, batch_size: int = 128) -> tuple[float, torch.Tensor]:
    """Accuracy and logits on `data` (demo.evaluate's batching, on `device`); leaves train mode."""
    was_training = clf.training
    clf.eval()
    logits = torch.cat([clf(**_batch(tok, [t for t, _ in data[i: i + batch_size]], device)).float().cpu()
                        for i in range(0, len(data), batch_size)])
    clf.train(was_training)
    labels = torch.tensor([y for _, y in data])
    return float((logits.argmax(-1) == labels).float().mean()), logits


def train(clf, tok, data, *, steps: int, batch_size: int, lr: float, seed: int, head_lr: float,
          schedule: str = "constant", warmup: int = 0, device: str = "cpu",
          on_step=None) -> tuple[float, list[float]]:
    """AdamW (no weight decay) on the adapter (or encoder) at `lr` and the head at `head_lr`,
    both times the schedule; batches drawn with replacement from a generator seeded by `seed`
    (the same data order as lora_lite.demo.train). `on_step(step)` runs after each backward,
    before the optimizer step. Returns (seconds, per-step losses)."""
    head = [p for p in clf.head.parameters() if p.requires_grad]
    body = [p for n, p in clf.named_parameters() if p.requires_grad and not n.startswith("head.")]
    groups = [{"params": body}] if body else []
    groups.append({"params": head, "lr": head_lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, schedule, warmup))
    rng = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    losses = []
    clf.train()
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(len(data), (batch_size,), generator=rng)
        labels = torch.tensor([data[i][1] for i in idx], device=device)
        loss = loss_fn(clf(**_batch(tok, [data[i][0] for i in idx], device)), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if on_step is not None:
            on_step(step)
        opt.step()
        sched.step()
        losses.append(loss.item())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, losses


STEER_COEFFS = (-1.0, -0.5, 0.0, 0.5, 1.0)


def steer(encoder, clf, tok, data, device) -> dict:
    """Held-out accuracy at each of STEER_COEFFS: "scaled" through ll.scaled (every variant),
    "coeff" through the config's run-time coeff (variants that have one; None where the config
    refuses the value, e.g. suppress_only at c < 0). The adapter is left as it was."""
    import lora_lite as ll
    from lora_lite.runtime import state_of

    out = {"coeffs": list(STEER_COEFFS), "scaled": []}
    for c in STEER_COEFFS:
        with ll.scaled(encoder, c):
            out["scaled"].append(evaluate(clf, tok, data, device)[0])
    state = state_of(encoder)
    if "coeff" in state.variant.runtime_fields:
        trained = state.cfg.coeff
        out["coeff"] = []
        for c in STEER_COEFFS:
            try:
                ll.reconfigure(encoder, coeff=c * trained)
            except ValueError:
                out["coeff"].append(None)
                continue
            out["coeff"].append(evaluate(clf, tok, data, device)[0])
        ll.reconfigure(encoder, coeff=trained)
    return out


def run_one(base, spec: dict, p: dict) -> dict:
    """Train one run (row, knobs, lr, steps, schedule, seed); accuracy on the held-out split,
    the training curve and, with p["diagnose"], the diagnostics. With p["val_fraction"] > 0
    also "val_acc" on p["n_val"] validation sentences (lora_bench.frontier chooses lrs on it),
    and the curve is scored on those instead of the test split."""
    from lora_lite.tasks import make_split
    from lora_lite.demo import Classifier

    encoder0, tok = base
    row, seed, device = spec["row"], spec["seed"], p.get("device", "cpu")
    # p["val_fraction"] > 0 sets a validation split's operand pairs aside, out of the training
    # pool (lora_lite.tasks); the test split is the same either way
    val_fraction = p.get("val_fraction", 0.0)
    train_set = make_split(p["task"], "train", p["n_train"], seed=seed, val_fraction=val_fraction)
    test_set = make_split(p["task"], "test", p["n_test"], seed=seed)
    val_set = make_split(p["task"], "val", p["n_val"], seed=seed, val_fraction=val_fraction) if val_fraction else None
    calibration = [
        _batch(tok, [t for t, _ in train_set[i: i + p["batch_size"]]], device)
        for i in range(0, p["calib_batches"] * p["batch_size"], p["batch_size"])
    ]
    torch.manual_seed(seed)
    encoder = copy.deepcopy(encoder0).to(device)
    t0 = time.perf_counter()
    n_encoder = prepare(row, encoder, calibration, p["rank"], spec["knobs"])
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    init_s = time.perf_counter() - t0
    clf = Classifier(encoder).to(device)  # the head is drawn here, after attach, as before
    every, curve_set = p.get("eval_every", 0), (val_set or test_set)[: p.get("eval_n", 250)]
    curve = {"eval_steps": [], "eval_acc": []}
    probe = None
    if p.get("diagnose") and not row.startswith("peft:") and row != "head":
        from .diagnose import Probe

        probe = Probe(encoder, encoder0, p["rank"])

    def on_step(step):
        if every and (step % every == 0 or step == spec["steps"] - 1):
            curve["eval_steps"].append(step)
            curve["eval_acc"].append(evaluate(clf, tok, curve_set, device)[0])
            if probe is not None:
                probe.log(step)

    secs, losses = train(clf, tok, train_set, steps=spec["steps"], batch_size=p["batch_size"], lr=spec["lr"],
                         seed=seed, head_lr=spec["lr"] if row == "head" else p["head_lr"],
                         schedule=spec["schedule"], warmup=spec["warmup_steps"], device=device, on_step=on_step)
    acc, logits = evaluate(clf, tok, test_set, device)
    out = {
        "row": row, "family": family(row), "knobs": spec["knobs"], "seed": seed, "lr": spec["lr"],
        "steps": spec["steps"], "schedule": spec["schedule"], "warmup_steps": spec["warmup_steps"],
        "acc": acc, **({"val_acc": evaluate(clf, tok, val_set, device)[0]} if val_set else {}),
        "train_s": round(secs, 2), "init_s": round(init_s, 3),
        "params": n_encoder, "head_params": sum(q.numel() for q in clf.head.parameters()),
        "finite": bool(torch.isfinite(logits).all()), "device": device,
        "curve": {"loss": [round(x, 4) for x in losses], **curve},
    }
    if probe is not None:
        out["diag"] = probe.record
    if p.get("steer", True) and row not in ANCHORS and not row.startswith("peft:"):
        out["steer"] = steer(encoder, clf, tok, test_set, device)
    out["id"] = run_id(out)
    return out


# ---- parallel workers ---------------------------------------------------------------------------

_WORKER: dict = {}


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)
    from lora_lite.demo import load_minilm

    base = load_minilm()
    base[0].eval()
    _WORKER["base"] = base


def _worker_run(spec: dict, p: dict) -> dict:
    return run_one(_WORKER["base"], spec, p)


# ---- lr choice and CLI ----------------------------------------------------------------------------

def parse_lrs(specs: list[str] | None) -> tuple[list[float] | None, dict[str, list[float]]]:
    """--lr values: "1e-3,3e-3" for every row, "ROW=1e-3[,3e-3]" for one row."""
    every, per_row = None, {}
    for spec in specs or []:
        key, sep, values = spec.rpartition("=")
        lrs = [float(v) for v in parse_list(values) or []]
        if not lrs:
            raise ValueError(f"--lr {spec!r}: expected LR[,LR...] or ROW=LR[,LR...]")
        if sep:
            per_row[key.strip()] = lrs
        else:
            every = lrs
    return every, per_row


def plan(a, chosen: dict[str, float]) -> list[dict]:
    """Every run to do, seed-major (an interrupted run still has every arm for the first seeds)."""
    knobs = parse_knobs(a.set)
    every, per_row = parse_lrs(a.lr)
    todo, row_names = [], rows(parse_list(a.rows))
    check_knobs(knobs, row_names)
    for seed in [SWEEP_SEED] if a.sweep else [int(s) for s in parse_list(a.seeds)]:
        for row in row_names:
            lrs_ = grid(row)
            default = chosen.get(family(row), lrs_[(len(lrs_) - 1) // 2])
            lrs = per_row.get(row) or every or (list(lrs_) if a.sweep else [default])
            for k in knob_arms(row, knobs):
                for lr in lrs:
                    todo.append({"row": row, "knobs": k, "seed": seed, "lr": lr, "steps": a.steps,
                                 "schedule": a.schedule, "warmup_steps": a.warmup_steps})
    return todo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_bench quality", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="run the learning-rate sweep instead")
    ap.add_argument("--rows", help="comma-separated rows (head, full, peft:lora, variant names, peft:<variant>); "
                                   "all: every variant and every PEFT row")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, help="optimizer steps (default 150; --sweep: --sweep-steps)")
    ap.add_argument("--sweep-steps", type=int, default=100)
    ap.add_argument("--schedule", choices=SCHEDULES, default="constant",
                    help="lr schedule: constant, cosine to 0, or linear warm-up then cosine")
    ap.add_argument("--warmup-steps", type=int, default=0, help="warm-up steps of warmup_cosine")
    ap.add_argument("--set", action="append", metavar="KEY=V1,V2",
                    help="config knob values (repeatable; cartesian product), e.g. rotate_basis=V,U,both")
    ap.add_argument("--lr", action="append", metavar="[ROW=]LR1,LR2",
                    help="override the swept lr: for every row, or ROW=... for one row (repeatable)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--task", default="comparison")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=50,
                    help="accuracy on --eval-n held-out sentences every K steps for the curves (0: off)")
    ap.add_argument("--eval-n", type=int, default=250)
    ap.add_argument("--diagnose", action="store_true",
                    help="log gradient norms per trainable family and ‖ΔW‖/‖W‖ per layer every --eval-every steps")
    ap.add_argument("--no-steer", action="store_true",
                    help="skip the steering evaluation (accuracy at coefficients -1 ... 1) after training")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes")
    ap.add_argument("--name", help="JSON file stem under --out (default quality / quality_sweep)")
    ap.add_argument("--out", default="results")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (1 by default: on a shared 2-core machine more "
                         "threads oversubscribe)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 rows, 1 seed, 20 steps")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in the JSON")
    a = ap.parse_args(argv)

    if a.quick:
        a.rows, a.seeds, a.steps, a.sweep_steps = a.rows or "head,peft:lora,lora", "0", a.steps or 20, 20
        a.n_test, a.eval_every, a.eval_n = min(a.n_test, 200), a.eval_every and 10, min(a.eval_n, 100)
    a.steps = a.sweep_steps if a.sweep else (a.steps or 150)
    if a.warmup_steps and a.schedule != "warmup_cosine" or a.schedule == "warmup_cosine" and not (
            0 < a.warmup_steps < a.steps):
        ap.error("--warmup-steps N (0 < N < --steps) goes with --schedule warmup_cosine, and only with it")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    p = {"task": a.task, "batch_size": a.batch_size, "n_train": a.n_train, "n_test": a.n_test,
         "rank": a.rank, "head_lr": a.head_lr, "calib_batches": a.calib_batches}
    run_p = {**p, "device": a.device, "eval_every": a.eval_every, "eval_n": a.eval_n, "diagnose": a.diagnose,
             "steer": not a.no_steer}
    out = Path(a.out)
    suffix = "_quick" if a.quick else ""
    name = a.name or f"quality{'_sweep' if a.sweep else ''}{suffix}"
    path = out / f"{name}.json"
    chosen = {} if a.sweep else best_lrs(read_json(out / f"quality_sweep{suffix}.json"))
    todo = plan(a, chosen)

    old = None if a.fresh else read_json(path)
    same = old and {k: v for k, v in old.get("protocol", {}).items() if k in PROTOCOL_KEYS} == p
    data = old if same else {"protocol": p, "runs": []}
    data.update(bench="quality", protocol=p, env=environment(), threads_per_job=a.threads, jobs=a.jobs)
    data["lr_source"] = "sweep" if a.sweep else ("quality_sweep.json" if chosen else "family default")
    order = list(dict.fromkeys(arm_id(s["row"], s["knobs"], s["lr"], s["steps"], s["schedule"], s["warmup_steps"])
                               for s in todo))
    data["arms"] = list(dict.fromkeys([*data.get("arms", []), *order]))
    done = {run_id(r) for r in data["runs"]}
    todo = [s for s in todo if run_id(s) not in done]

    def finished(i, res):
        data["runs"].append(res)
        write_json(path, data)
        knobs = "".join(f" {k}={v}" for k, v in res["knobs"].items())
        print(f"[{i}/{len(todo)}] {res['row']:18s}{knobs} seed {res['seed']:3d} lr {res['lr']:.0e}: "
              f"acc {res['acc']:.3f} ({res['train_s']:.0f} s, {res['params']:,} params)", flush=True)

    if a.jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(a.threads,)) as pool:
            futures = [pool.submit(_worker_run, s, run_p) for s in todo]
            for i, f in enumerate(as_completed(futures), 1):
                finished(i, f.result())
    elif todo:
        torch.set_num_threads(a.threads)
        from lora_lite.demo import load_minilm

        base = load_minilm()
        base[0].eval()
        for i, spec in enumerate(todo, 1):
            finished(i, run_one(base, spec, run_p))
    write_json(path, data)

    from . import report

    report.write_quality_file(out, name, sweep=a.sweep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
