"""How far one Adam step moves each layer, per parametrization (issue 19, item 5).

    python scripts/update_size.py [--lr 1e-3] [--rows lora,lora_xs,...] [--json results/update_size.json]
    (--json also writes the markdown table next to it)

The C2 setting of `python -m lora_bench quality` (real MiniLM-L6, task "comparison", batch 32,
seed 0, rank 16, the bench's per-variant config, head at lr 1e-3, AdamW without weight decay,
constant lr) with every row at the SAME adapter lr, so the rows differ only by parametrization.
After 1, 10 and 100 optimizer steps, per target layer:

    ratio = ‖W_eff − W‖_F / ‖W‖_F      W_eff from the variant's effective_weight, W the base

and, over the 36 layers, the least-squares slope of log ratio on log S_max(W) and on log ‖W‖_F
(0: the relative step does not depend on the layer's spectrum; −1: the absolute step does not,
so layers with small weights move relatively more), with R². A row "name:key=value" overrides a
config field (e.g. delora:lambda0=15).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lora_bench runs from the checkout

CHECKPOINTS = (1, 10, 100)
ROWS = "lora,lora_xs,antipasto,antipasto_corda,delora,delora:lambda0=15"


def _slope(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares slope of log y on log x, and R²."""
    lx, ly = [math.log(v) for v in x], [math.log(v) for v in y]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    sxy = sum((a - mx) * (b - my) for a, b in zip(lx, ly))
    syy = sum((b - my) ** 2 for b in ly)
    slope = sxy / sxx if sxx > 0 else float("nan")
    r2 = sxy * sxy / (sxx * syy) if sxx > 0 and syy > 0 else float("nan")
    return round(slope, 3), round(r2, 3)


def measure(base, row: str, lr: float, seed: int = 0) -> dict:
    from lora_bench import quality
    from lora_lite.demo import Classifier
    from lora_lite.tasks import make_split
    from lora_lite.variant import REGISTRY

    name, _, knob = row.partition(":")
    knobs = {}
    if knob:
        key, _, value = knob.partition("=")
        knobs[key] = quality.coerce_knob(name, key, value)
    encoder0, tok = base
    p = {"task": "comparison", "batch_size": 32, "n_train": 4000, "rank": 16, "head_lr": 1e-3, "calib_batches": 8}
    train_set = make_split(p["task"], "train", p["n_train"], seed=seed)
    calibration = [quality._batch(tok, [t for t, _ in train_set[i: i + 32]], "cpu") for i in range(0, 8 * 32, 32)]
    torch.manual_seed(seed)
    encoder = copy.deepcopy(encoder0)
    quality.prepare(name, encoder, calibration, p["rank"], knobs)
    state = encoder.__dict__["_lora_lite"]
    effective = REGISTRY[state.cfg.variant].effective_weight
    base_layers = dict(encoder0.named_modules())
    W0 = {n: base_layers[n].weight.detach().float() for n in state.targets}
    s_max = {n: float(torch.linalg.matrix_norm(W, ord=2)) for n, W in W0.items()}
    w_norm = {n: float(W.norm()) for n, W in W0.items()}
    clf = Classifier(encoder)
    out = {"row": row, "lr": lr, "seed": seed, "params": sum(q.numel() for q in encoder.parameters() if q.requires_grad),
           "steps": {}}

    @torch.no_grad()
    def on_step(step):  # after `step` optimizer steps (on_step runs before the step's update)
        if step not in CHECKPOINTS:
            return
        ratio = {n: float((effective(layer, state.cfg)[0].float() - W0[n]).norm()) / w_norm[n]
                 for n, layer in state.targets.items()}
        names = [n for n in ratio if ratio[n] > 0]
        vals = [ratio[n] for n in names]
        out["steps"][step] = {
            "mean": statistics.fmean(ratio.values()), "max": max(ratio.values()),
            "slope_smax": _slope([s_max[n] for n in names], vals),
            "slope_wnorm": _slope([w_norm[n] for n in names], vals),
            "per_layer": {n: round(v, 6) for n, v in ratio.items()},
        }

    t0 = time.perf_counter()
    _, losses = quality.train(clf, tok, train_set, steps=max(CHECKPOINTS) + 1, batch_size=32, lr=lr, seed=seed,
                              head_lr=p["head_lr"], on_step=on_step)
    out["train_s"] = round(time.perf_counter() - t0, 1)
    out["loss_last10"] = round(statistics.fmean(losses[-10:]), 4)
    out["layers"] = {n: {"s_max": round(s_max[n], 4), "w_norm": round(w_norm[n], 4)} for n in W0}
    return out


def table(data: dict) -> str:
    runs = data["runs"]
    lora = next((r for r in runs if r["row"] == "lora" and r["lr"] == data["lr"]), None)
    lines = [f"Adapter lr {data['lr']:g} for every row (constant, AdamW), C2 on MiniLM, seed 0. "
             "ΔW/W = ‖W_eff − W‖_F/‖W‖_F, mean over the 36 layers (max); × LoRA = mean / LoRA's mean "
             "at the same step; slope = d log(ΔW/W) / d log S_max over layers (R²).", "",
             "| row | params | ΔW/W after 1 | after 10 | after 100 | × LoRA (1 / 10 / 100) "
             "| slope on S_max at 1 / 100 (R²) | slope on ‖W‖_F at 100 (R²) | loss, steps 92-101 |",
             "| --- | ---: | --- | --- | --- | --- | --- | --- | ---: |"]
    for r in runs:
        st = {int(k): v for k, v in r["steps"].items()}
        cells = [f"{st[k]['mean']:.2e} ({st[k]['max']:.1e})" for k in CHECKPOINTS]
        rel = " / ".join(f"{st[k]['mean'] / {int(a): b for a, b in lora['steps'].items()}[k]['mean']:.2g}"
                         for k in CHECKPOINTS) if lora else "—"
        s1, s100 = st[1]["slope_smax"], st[100]["slope_smax"]
        w100 = st[100]["slope_wnorm"]
        lines.append(f"| `{r['row']}` | {r['params']:,} | {' | '.join(cells)} | {rel} | "
                     f"{s1[0]:+.2f} ({s1[1]:.2f}) / {s100[0]:+.2f} ({s100[1]:.2f}) | {w100[0]:+.2f} ({w100[1]:.2f}) | "
                     f"{r['loss_last10']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--rows", default=ROWS)
    ap.add_argument("--json", help="write results here (and the markdown table beside it)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from lora_bench.common import environment, write_json
    from lora_lite.demo import load_minilm

    base = load_minilm()
    base[0].eval()
    old = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).exists() else None
    data = old if old and old.get("lr") == a.lr else {"lr": a.lr, "runs": []}
    done = {r["row"] for r in data["runs"]}
    for row in a.rows.split(","):
        if row in done:
            continue
        res = measure(base, row, a.lr)
        data["runs"].append(res)
        st = res["steps"]
        print(f"{row:24s} ΔW/W after 1/10/100: " + " / ".join(f"{st[k]['mean']:.2e}" for k in CHECKPOINTS)
              + f"  slope(S_max) at 100: {st[100]['slope_smax']}  ({res['train_s']} s)", flush=True)
        if a.json:
            data["env"] = environment()
            write_json(a.json, data)
    print(table(data))
    if a.json:
        Path(a.json).with_suffix(".md").write_text("# Update size per Adam step (scripts/update_size.py)\n\n" + table(data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
