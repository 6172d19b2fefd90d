"""Arms of the C2 quality benchmark: learning-rate families, the anchor rows, run ids and the
lr choice from a sweep (and, for `frontier`, from each arm's validation scores). Shared by
`quality` and `frontier` (which run arms) and `report` (which tabulates them).
"""

from __future__ import annotations

import statistics

from . import adapters

# The anchor rows are no variants: their lr grids are the benchmark's own. A variant row's grid
# is what its file declares (`BenchSetting.lrs`); a PEFT row "peft:<variant>" takes its twin's.
ANCHOR_GRID = {"head": (1e-3, 3e-3, 1e-2), "full": (2e-5, 5e-5, 1e-4)}
ANCHORS = ("head", "full", "peft:lora")  # the reference rows, listed first
SWEEP_SEED = 100
SCHEDULES = ("constant", "cosine", "warmup_cosine")
FRONTIER_SCHEDULE = "warmup_cosine"


def members(family_: str) -> list[str]:
    """Variants whose benchmark setting is in lr family `family_`, in registry order."""
    return [name for name, s in adapters.settings().items() if s.family == family_]


def family(row: str) -> str:
    """The lr family of a row: an anchor's own name, else its variant's (`BenchSetting.family`)."""
    return row if row in ANCHOR_GRID else adapters.settings()[row.removeprefix("peft:")].family


def grid(row: str) -> tuple[float, ...]:
    """The lrs the sweep runs for a row (`ANCHOR_GRID`, else its variant's `BenchSetting.lrs`)."""
    return ANCHOR_GRID.get(row) or adapters.settings()[row.removeprefix("peft:")].lrs


def schedule_label(schedule: str, warmup: int) -> str:
    return f"{schedule}({warmup})" if schedule == "warmup_cosine" else schedule


def arm_id(row: str, knobs: dict, lr: float, steps: int, schedule: str = "constant", warmup: int = 0) -> str:
    """Everything that defines an arm except the seed: row[k=v,...] lr steps schedule."""
    k = "[" + ",".join(f"{key}={val}" for key, val in knobs.items()) + "]" if knobs else ""
    return f"{row}{k} lr={lr:g} steps={steps} {schedule_label(schedule, warmup)}"


def run_id(r: dict) -> str:
    """A run's id: its arm and its seed (older records without knobs/schedule read as constant)."""
    return (arm_id(r["row"], r.get("knobs") or {}, r["lr"], r["steps"], r.get("schedule", "constant"),
                   r.get("warmup_steps", 0)) + f" seed={r['seed']}")


def best_lrs(sweep: dict | None) -> dict[str, float]:
    """family -> lr: the lr with the best mean sweep accuracy over the family's rows, among the
    lrs every swept row of the family ran (ties: the smaller lr). One choice per family keeps a
    single unlucky seed from handicapping one row (ours and PEFT's LoRA, the same math, get the
    same lr), and rows added later inherit their family's lr. Only lrs on the family's current
    grid count."""
    acc: dict[str, dict[str, dict[float, float]]] = {}
    for r in (sweep or {}).get("runs", []):
        if r["lr"] in grid(r["row"]):  # a row whose grid changed keeps only its current lrs
            acc.setdefault(family(r["row"]), {}).setdefault(r["row"], {})[r["lr"]] = r["acc"]
    chosen = {}
    for fam, per_row in acc.items():
        common = set.intersection(*(set(v) for v in per_row.values()))
        if common:
            chosen[fam] = max(sorted(common), key=lambda lr: statistics.fmean(v[lr] for v in per_row.values()))
    return chosen


# ---- the frontier (lora_bench.frontier): one lr per arm, chosen on validation ------------------

def frontier_run(arm: dict, lr: float, seed: int, steps: int, warmup: int) -> dict:
    """The run spec of one frontier arm (lora_bench.frontier.grid) at one lr and seed."""
    return {"row": arm["row"], "knobs": arm["knobs"], "seed": seed, "lr": lr, "steps": steps,
            "schedule": FRONTIER_SCHEDULE, "warmup_steps": warmup}


EDGE_FACTOR = 2.0  # an lr one doubling (or halving) past the grid's edge
MAX_EDGE_STEPS = 2


def first_seed_sweep(arm: dict, runs: list[dict], seed: int, steps: int,
                     warmup: int) -> tuple[list[float], dict[float, float]]:
    """(lrs, {lr: validation accuracy of the runs done}) of the arm's first seed. The lrs are
    ascending: the grid's, and while every one of them is done and the best validation score
    sits at an edge, one more lr EDGE_FACTOR past that edge (at most MAX_EDGE_STEPS times), so a
    chosen lr is never the grid's edge unless the extension lost or the cap was reached."""
    by_id = {run_id(r): r for r in runs}

    def scores_of(lrs):
        found = {lr: by_id.get(run_id(frontier_run(arm, lr, seed, steps, warmup))) for lr in lrs}
        return {lr: r["val_acc"] for lr, r in found.items() if r is not None}

    lrs = sorted(arm["lrs"])
    scores = scores_of(lrs)
    for _ in range(MAX_EDGE_STEPS):
        if len(scores) < len(lrs):
            break
        best = choose_lr(scores)
        if best == lrs[-1]:
            lrs.append(lrs[-1] * EDGE_FACTOR)
        elif best == lrs[0]:
            lrs.insert(0, lrs[0] / EDGE_FACTOR)
        else:
            break
        scores = scores_of(lrs)
    return lrs, scores


def arm_lrs(arm: dict, runs: list[dict], seed: int, steps: int, warmup: int) -> list[float]:
    """The lrs the arm runs on its first seed (`first_seed_sweep`)."""
    return first_seed_sweep(arm, runs, seed, steps, warmup)[0]


def val_scores(arm: dict, runs: list[dict], seed: int, steps: int, warmup: int) -> dict[float, float]:
    """{lr: validation accuracy} of the arm's first-seed runs that are done, over `arm_lrs`."""
    return first_seed_sweep(arm, runs, seed, steps, warmup)[1]


def lr_of(lrs: list[float], scores: dict[float, float]) -> float | None:
    """The chosen lr of a sweep (`choose_lr`), or None while one of its lrs is still to run."""
    return choose_lr(scores) if len(scores) == len(lrs) else None


def chosen_lr(arm: dict, runs: list[dict], seed: int, steps: int, warmup: int) -> float | None:
    """The arm's lr (`choose_lr` over `val_scores`), or None while a first-seed lr is still to run."""
    return lr_of(*first_seed_sweep(arm, runs, seed, steps, warmup))


def choose_lr(scores: dict[float, float]) -> float:
    """The lr with the best validation accuracy; ties go to the smaller lr."""
    return max(sorted(scores), key=lambda lr: scores[lr])
