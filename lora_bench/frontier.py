"""C2 quality against trainable parameters: where each adapter sits relative to a LoRA frontier.

    python -m lora_bench frontier               the grid below, resumable, into results/frontier.json
    python -m lora_bench frontier --jobs 2      runs in 2 worker processes (--device cuda on a GPU)
    python -m lora_bench frontier --quick       a smoke run: 3 arms, 2 seeds, a few steps
    python -m lora_bench report                 results/frontier.md, results/frontier.png

The C2 setup of `lora_bench.quality` (pretrained MiniLM-L6, mean-pooled, a linear head that
trains in every arm, the seeded "comparison" task, adapters on all 36 encoder linears), with a
600-step linear warm-up + cosine schedule and this protocol:

  * Arms (`grid`, from results/frontier_grid.json): the frontier row at its ranks, further rows
    at their sizes, and every member of a listed lr family (`arms.members`) at the family's
    sizes. An arm is its variant's benchmark setting (`BenchSetting.knobs`) with r set to its
    rank, so LoRA keeps alpha = 2r.
  * Learning rate: the three lrs of the arm's family (the grid file's "lrs") run on the first
    seed; the one with the best VALIDATION accuracy (ties: the smaller lr) is the arm's lr (`arms.chosen_lr`), and
    the remaining seeds run at it. When the best is the grid's top or bottom lr, one lr
    arms.EDGE_FACTOR past that edge runs first (`arms.first_seed_sweep`, at most arms.MAX_EDGE_STEPS
    times). The test split never enters the choice.
  * Validation split: `lora_lite.tasks` with val_fraction = VAL_FRACTION sets aside the operand
    pairs whose hash lies just above the test band, out of the training pool, so validation
    pairs occur neither in training nor in test: choosing on it is the same kind of
    generalisation as the test score measures, without reading test. Training sentences are
    drawn from the remaining pairs; the test split is the C2 test split unchanged. Every run
    scores both splits (the test score of a run at a rejected lr is stored but never read:
    the table shows test accuracy at the chosen lr only).
  * Numbers: test accuracy mean ± std over the seeds at the chosen lr, against the adapter's
    trainable parameters (the 770-parameter head trains in every arm and is not counted).

The report (`lora_bench.report`, section "C2 against trainable params") interpolates the LoRA
frontier's mean and seed std linearly in log10 params and says, for every other arm, whether it
sits above, on or below it at equal params, seed by seed (`report.frontier_position`: a seed
more than `report.seed_tolerance` from the frontier's mean is above or below it; the arm is
above / below when every seed is, on when none is below, else mixed). An arm outside the
frontier's param range is compared with the nearest end and said to be outside. "LoRA quality
at a fraction of the parameters" holds for an arm with fewer than report.FRACTION of the
largest LoRA's params that is on or above that LoRA by the same rule.

Runs are appended to the JSON as they finish, so an interrupted grid resumes where it stopped;
each (arm, lr, steps, schedule, seed) is one run with the run id of `lora_bench.arms`.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from . import adapters
from .arms import arm_id, first_seed_sweep, frontier_run, lr_of, members, run_id
from .common import environment, parse_list, read_json, write_json

# Which arms, at which sizes and lrs: data (it names variants), read by `grid`
GRID = Path(__file__).resolve().parents[1] / "results" / "frontier_grid.json"
VAL_FRACTION = 0.1
PROTOCOL_KEYS = ("task", "batch_size", "n_train", "n_val", "n_test", "val_fraction", "rank", "head_lr",
                 "calib_batches")


# ---- the grid -----------------------------------------------------------------------------------

def _wanted(spec: list[dict]) -> list[tuple[str, int | None]]:
    """(row, size) of every arm a grid spec lists: a row at its sizes (or none: no rank), or every
    member of a family (`arms.members`) at the family's sizes."""
    out = []
    for entry in spec:
        rows = [entry["row"]] if "row" in entry else members(entry["family"])
        out += [(row, size) for row in rows for size in entry.get("sizes", [None])]
    return out


def _trainable(variant, d_in: int, d_out: int, cfg) -> int:
    """Trainable parameters per target: as the variant counts them, else as its specs create them."""
    if variant.params_per_layer is not None:
        return variant.params_per_layer(d_in, d_out, cfg)
    return sum(math.prod(s.shape) for s in variant.param_specs(d_in, d_out, cfg).values() if s.trainable)


def grid(model, rows: list[str] | None = None, quick: bool = False) -> list[dict]:
    """Every arm: {"label", "row", "size", "knobs" (config fields), "params", "lrs"}, the LoRA
    frontier first. `params` counts the trainable adapter tensors the variant declares
    (params_per_layer) over `model`'s targets; `rows` keeps only those variants."""
    from lora_lite.kinds import dims
    from lora_lite.targets import find_targets
    from lora_lite.variant import REGISTRY

    from .models import TARGETS

    spec = read_json(GRID)
    wanted = _wanted(spec["quick" if quick else "arms"])
    if rows:
        unknown = sorted(set(rows) - {row for row, _ in wanted})
        if unknown:
            raise ValueError(f"--rows {','.join(unknown)}: not in the grid; its rows are "
                             f"{', '.join(dict.fromkeys(row for row, _ in wanted))}")
        wanted = [(row, size) for row, size in wanted if row in rows]
    targets = TARGETS["minilm"]
    geom = adapters.geometry(model, targets)
    out = []
    for row, size in wanted:
        setting = adapters.settings()[row]
        # the setting's other fields at this rank, r itself as asked: the SVD family's setting
        # pins r to its benchmark default (256) whatever rank it is given
        knobs = {**setting.knobs(size, geom), "r": size} if size is not None else {}
        cfg = adapters.make_config(row, size or 1, targets, geom, knobs)
        params = sum(_trainable(REGISTRY[row].at_target(name, cfg), *dims(layer), cfg)
                     for name, layer in find_targets(model, cfg))
        out.append({"label": f"{row}" + (f" r={size}" if size is not None else ""), "row": row, "size": size,
                    "knobs": knobs, "params": params, "lrs": list(spec["lrs"][setting.family])})
    return out


def pending(arms: list[dict], runs: list[dict], seeds: list[int], steps: int, warmup: int) -> list[dict]:
    """Runs still to do: first every lr of every arm on seeds[0] (edge extensions included,
    `arms.first_seed_sweep`); an arm whose lrs are all done gets seeds[1:] at its chosen lr.
    Those follow-ups come first, so arms complete early."""
    done = {run_id(r) for r in runs}
    follow, sweep = [], []
    for arm in arms:
        lrs, scores = first_seed_sweep(arm, runs, seeds[0], steps, warmup)
        lr = lr_of(lrs, scores)
        if lr is None:
            sweep += [s for x in lrs if run_id(s := frontier_run(arm, x, seeds[0], steps, warmup)) not in done]
            continue
        follow += [s for seed in seeds[1:] if run_id(s := frontier_run(arm, lr, seed, steps, warmup)) not in done]
    return follow + sweep


def unsteered(arms: list[dict], runs: list[dict], seeds: list[int], steps: int, warmup: int) -> list[dict]:
    """The specs of the runs at each arm's chosen lr (every seed) that finished without a steering
    record (they predate it, or ran with --no-steer): `--steer-missing` trains them again and
    adds the record to the stored run."""
    by_id = {run_id(r): r for r in runs}
    out = []
    for arm in arms:
        lr = lr_of(*first_seed_sweep(arm, runs, seeds[0], steps, warmup))
        if lr is None:
            continue
        specs = [frontier_run(arm, lr, seed, steps, warmup) for seed in seeds]
        out += [s for s in specs if (r := by_id.get(run_id(s))) is not None and "steer" not in r]
    return out


def add_steering(runs: list[dict], res: dict) -> dict:
    """Put a rerun's steering record on the stored run it repeats, with the rerun's scores under
    "steer_rerun" (seeded training on one CPU thread repeats the run to the bit; the report
    reads the stored scores, the steering table the rerun's); returns the stored run."""
    (old,) = [r for r in runs if run_id(r) == run_id(res)]
    old["steer"] = res["steer"]
    old["steer_rerun"] = {k: res[k] for k in ("acc", "val_acc", "train_s") if k in res}
    return old


# ---- running ------------------------------------------------------------------------------------

def _line(res: dict, left: int) -> str:
    knobs = "".join(f" {k}={v}" for k, v in res["knobs"].items())
    return (f"[{left} queued] {res['row']:16s}{knobs} seed {res['seed']} lr {res['lr']:.0e}: val "
            f"{res['val_acc']:.3f} ({res['train_s']:.0f} s, {res['params']:,} params)")


def run_grid(arms: list[dict], data: dict, path: Path, base, run_p: dict, *, jobs: int, threads: int,
             steer_missing: bool = False) -> None:
    """Run everything `pending` lists for `arms`, appending each result to data["runs"] (and the
    file) as it finishes. With jobs > 1 at most `jobs` runs are in flight, so an arm's follow-up seeds
    start as soon as its lr is chosen instead of queueing behind the whole sweep. steer_missing:
    then the `unsteered` runs again, their steering records added to the stored runs."""
    from . import quality

    args = data["seeds"], data["steps"], data["warmup_steps"]

    def todo():
        return pending(arms, data["runs"], *args) + (unsteered(arms, data["runs"], *args) if steer_missing else [])

    def finished(res):
        known = {run_id(r) for r in data["runs"]}
        if run_id(res) in known:
            stored = add_steering(data["runs"], res)
            if stored["acc"] != res["acc"]:
                print(f"warning: {run_id(res)} trained again scores {res['acc']:.4f}, stored {stored['acc']:.4f}",
                      flush=True)
        else:
            data["runs"].append(res)
        write_json(path, data)
        print(_line(res, len(todo())), flush=True)

    if jobs <= 1:
        while left := todo():
            finished(quality.run_one(base, left[0], run_p))
        return
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=quality._worker_init,
                             initargs=(threads,)) as pool:
        inflight: dict[str, object] = {}
        while True:
            for s in todo():
                if len(inflight) >= jobs:
                    break
                if run_id(s) not in inflight:
                    inflight[run_id(s)] = pool.submit(quality._worker_run, s, run_p)
            if not inflight:
                return
            done, _ = wait(inflight.values(), return_when=FIRST_COMPLETED)
            for f in done:
                res = f.result()
                del inflight[run_id(res)]
                finished(res)


# ---- CLI ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_bench frontier", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", help="comma-separated variants: run only their arms of the grid")
    ap.add_argument("--seeds", default="0,1,2", help="the first one chooses the lr; the others run at it")
    ap.add_argument("--steps", type=int, help="optimizer steps (default 600; --quick: 4)")
    ap.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default: 5%% of --steps, at least 1)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--head-lr", type=float, default=1e-3)
    ap.add_argument("--task", default="comparison")
    ap.add_argument("--n-train", type=int, default=4000)
    ap.add_argument("--n-val", type=int, default=500)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--calib-batches", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=0,
                    help="validation accuracy on --eval-n sentences every K steps, for the curves (0: off)")
    ap.add_argument("--eval-n", type=int, default=250)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--name", help="JSON file stem under --out (default frontier; --quick: frontier_quick)")
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: lora r=1, r=2 and ia3, seeds 0,1, 4 steps, 64 validation/test sentences")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in the JSON")
    ap.add_argument("--list", action="store_true",
                    help="print the runs that would start now and record the grid in the JSON; run nothing")
    ap.add_argument("--no-steer", action="store_true",
                    help="skip the steering evaluation (test accuracy at coefficients -1 ... 1) after training")
    ap.add_argument("--steer-missing", action="store_true",
                    help="also train again the chosen-lr runs stored without a steering record, and add it")
    a = ap.parse_args(argv)
    if a.steer_missing and a.no_steer:
        ap.error("--steer-missing needs the steering evaluation: drop --no-steer")

    if a.quick:
        a.seeds = "0,1" if a.seeds == "0,1,2" else a.seeds
        a.steps, a.n_val, a.n_test = a.steps or 4, min(a.n_val, 64), min(a.n_test, 64)
        a.batch_size, a.calib_batches = min(a.batch_size, 8), min(a.calib_batches, 1)
    a.steps = a.steps or 600
    warmup = a.warmup_steps if a.warmup_steps is not None else max(1, a.steps // 20)
    if a.steps < 2 or not 0 < warmup < a.steps:
        ap.error(f"--warmup-steps {warmup}: need 0 < warm-up < --steps {a.steps} (and --steps >= 2)")
    seeds = [int(s) for s in parse_list(a.seeds) or []]
    if not seeds or len(set(seeds)) != len(seeds):
        ap.error(f"--seeds {a.seeds!r}: need distinct integers, e.g. 0,1,2")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    p = {"task": a.task, "batch_size": a.batch_size, "n_train": a.n_train, "n_val": a.n_val, "n_test": a.n_test,
         "val_fraction": VAL_FRACTION, "rank": 16, "head_lr": a.head_lr, "calib_batches": a.calib_batches}
    run_p = {**p, "device": a.device, "eval_every": a.eval_every, "eval_n": a.eval_n, "steer": not a.no_steer}

    torch.set_num_threads(a.threads)
    from lora_lite.demo import load_minilm

    base = load_minilm()
    base[0].eval()
    full = grid(base[0], quick=a.quick)
    rows = parse_list(a.rows)
    arms = grid(base[0], rows, quick=a.quick) if rows else full

    out = Path(a.out)
    name = a.name or ("frontier_quick" if a.quick else "frontier")
    path = out / f"{name}.json"
    old = None if a.fresh else read_json(path)
    same = old and {k: v for k, v in old.get("protocol", {}).items() if k in PROTOCOL_KEYS} == p
    data = old if same else {"runs": []}
    # the report covers the whole grid (an arm --rows leaves out shows as not run) and every
    # arm an earlier grid ran into this file
    known = {arm_id(arm["row"], arm["knobs"], 0, 0) for arm in full}
    kept = [arm for arm in data.get("grid", []) if arm_id(arm["row"], arm["knobs"], 0, 0) not in known]
    data.update(bench="frontier", protocol=p, env=environment(), grid=[*full, *kept], seeds=seeds, steps=a.steps,
                warmup_steps=warmup, jobs=a.jobs, threads_per_job=a.threads)
    todo = pending(arms, data["runs"], seeds, a.steps, warmup)
    if a.steer_missing:
        todo += unsteered(arms, data["runs"], seeds, a.steps, warmup)
    print(f"{len(arms)} arms; {len(todo)} runs to start now (more follow as lrs are chosen)", flush=True)
    if a.list:
        for s in todo:
            print(f"  {arm_id(s['row'], s['knobs'], s['lr'], s['steps'], s['schedule'], s['warmup_steps'])} "
                  f"seed {s['seed']}")
        write_json(path, data)
        return 0
    t0 = time.perf_counter()
    run_grid(arms, data, path, base, run_p, jobs=a.jobs, threads=a.threads, steer_missing=a.steer_missing)
    write_json(path, data)
    print(f"done in {time.perf_counter() - t0:.0f} s; {path}", flush=True)
    from .report import write_frontier_file

    write_frontier_file(out, name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
