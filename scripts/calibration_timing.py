"""Calibrated variants on the embedded MiniLM: identity error, reload error and attach time per
variant, and calibration time against HF PEFT's own EVA and CorDA preprocessing.

    python scripts/calibration_timing.py [--rank 16] [--repeats 3] [--threads N] [--json PATH]
    (--json results/calibration_timing.json also writes the markdown next to it)

Same model (all 36 encoder linears of all-MiniLM-L6-v2, fp32), same rank and the same 16
calibration batches of 16 sentences (padded; attention_mask drops the padding) for every row.
Errors are max-abs over real tokens of a held-out batch divided by max |y|. Times are medians of
interleaved repeats in this one process, so the ratios are side by side; absolute seconds on a
shared 2-core machine are noise.

PEFT's CorDA hook assumes batch size 1 without padding, so PEFT gets the same tokens as 256
single-sequence batches; ours is timed both on the 16 padded batches and on those 256.
PEFT EVA: `get_peft_model` + `initialize_lora_eva_weights` with rho=1, whiten=False,
use_label_mask=False (default tau=0.99: its incremental PCA stops once components settle).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lora_lite as ll
from lora_lite.tasks import make_split
from lora_lite.demo import load_minilm
from lora_lite.runtime import state_of
from lora_lite.targets import find_targets
from lora_bench.adapters import geometry

TARGETS = (r"^encoder\.",)


def variants(r: int, geometry) -> dict:
    """Every variant that reads calibration statistics, in its benchmark setting at rank r, with
    its calibrated path (optional-data variants get data too)."""
    out = {}
    for name, v in ll.REGISTRY.items():
        knobs = {**v.bench.knobs(r, geometry), "r": r}
        cfg = ll.AdapterConfig.from_dict({"variant": name, **knobs, "target_names": list(TARGETS)})
        if v.calibration_needs(cfg)[0] is not None:
            out[name] = cfg
    return out




def rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    m = mask.bool()
    return float((a[m] - b[m]).abs().max() / b[m].abs().max())


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import peft
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    base, tok = load_minilm()
    base.eval()
    texts = [t for t, _ in make_split("comparison", "train", 256, seed=0)]
    batches = [dict(tok(texts[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, 256, 16)]
    singles = [dict(tok([t], return_tensors="pt")) for t in texts]  # the same tokens, unpadded
    held_out = dict(tok([t for t, _ in make_split("comparison", "test", 32, seed=1)], padding=True, return_tensors="pt"))
    mask = held_out["attention_mask"][..., None].expand(-1, -1, base.config.hidden_size)

    def out(model):
        with torch.no_grad():
            return model(**held_out).last_hidden_state

    y0 = out(base)
    cfgs = variants(args.rank, geometry(base, TARGETS))
    rows = {}
    for name, cfg in cfgs.items():  # errors (one attach each)
        model = copy.deepcopy(base)
        ll.attach(model, cfg, calibration_data=batches, progress=False)
        row = {"identity": rel(out(model), y0, mask)}
        neutral = ll.REGISTRY[cfg.variant].neutral  # tensors of the deliberate init offsets
        if neutral:
            with torch.no_grad():
                for layer in state_of(model).targets.values():
                    for pname in neutral:
                        getattr(layer, pname).zero_()
            row["identity_neutral"] = rel(out(model), y0, mask)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
        y1 = out(model)
        with tempfile.TemporaryDirectory() as d:
            ll.save(model, Path(d) / "a.safetensors")
            fresh = copy.deepcopy(base)
            ll.load(fresh, Path(d) / "a.safetensors")
        row["reload"] = rel(out(fresh), y1, mask)
        row["adapter_vs_base"] = rel(y1, y0, mask)
        rows[name] = row
        print(name, {k: f"{v:.2e}" for k, v in row.items()}, flush=True)

    names = [n for n, _ in find_targets(base, next(iter(cfgs.values())))]
    lora_kw = dict(r=args.rank, lora_alpha=2 * args.rank, target_modules=names, lora_dropout=0.0)
    eva_cfg = peft.LoraConfig(**lora_kw, init_lora_weights="eva",
                              eva_config=peft.EvaConfig(rho=1.0, whiten=False, use_label_mask=False))
    corda_cfg = peft.LoraConfig(**lora_kw, init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))

    def peft_eva(model):
        pm = peft.get_peft_model(model, eva_cfg)
        initialize_lora_eva_weights(pm, batches, show_progress_bar=False)
        return pm

    def peft_corda(model):
        def run_model():
            with torch.no_grad():
                for b in singles:
                    model(**b)

        preprocess_corda(model, corda_cfg, run_model=run_model)
        return peft.get_peft_model(model, corda_cfg)

    jobs = {f"ours {n}": (lambda m, c=c: ll.attach(m, c, calibration_data=batches, progress=False)) for n, c in cfgs.items()}
    jobs["ours antipasto_corda, 256 single sequences"] = lambda m: ll.attach(
        m, cfgs["antipasto_corda"], calibration_data=singles, progress=False)
    jobs["peft eva (get_peft_model + initialize_lora_eva_weights)"] = peft_eva
    jobs["peft corda (preprocess_corda on 256 single sequences + get_peft_model)"] = peft_corda
    times = {k: [] for k in jobs}
    kept = {}
    for _ in range(args.repeats):  # interleaved
        for k, fn in jobs.items():
            model = copy.deepcopy(base)
            times[k].append(timed(lambda: kept.__setitem__(k, fn(model) or model)))
    medians = {k: statistics.median(v) for k, v in times.items()}
    for name in cfgs:
        rows[name]["attach_s"] = medians[f"ours {name}"]

    ratios = {
        "ours eva / peft eva": medians["ours eva"] / medians["peft eva (get_peft_model + initialize_lora_eva_weights)"],
        "ours corda (16 padded batches) / peft corda": medians["ours antipasto_corda"]
        / medians["peft corda (preprocess_corda on 256 single sequences + get_peft_model)"],
        "ours corda (256 single sequences) / peft corda": medians["ours antipasto_corda, 256 single sequences"]
        / medians["peft corda (preprocess_corda on 256 single sequences + get_peft_model)"],
    }
    eva_dist = _eva_agreement(kept["ours eva"], kept["peft eva (get_peft_model + initialize_lora_eva_weights)"], names)
    result = {
        "environment": {"torch": torch.__version__, "peft": peft.__version__, "threads": torch.get_num_threads(),
                        "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "setup": {"model": "all-MiniLM-L6-v2", "targets": len(names), "rank": args.rank, "batches": len(batches),
                  "tokens": int(sum(b["attention_mask"].sum() for b in batches)), "repeats": args.repeats},
        "variants": rows, "times_s": times, "median_s": medians, "ratios": ratios,
        "eva_subspace_vs_peft": eva_dist,
    }
    print(_markdown(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        args.json.with_suffix(".md").write_text(_markdown(result) + "\n")


def _eva_agreement(ours, theirs, names) -> dict:
    """Per target, ours vs PEFT's EVA A: the spectral distance of the row-space projectors
    (0 = same subspace, 1 = some direction orthogonal) and the overlap ‖A Bᵀ‖²_F / r (mean cos²)."""
    res = {}
    for n in names:
        A = ours.get_submodule(n).lora_A.double()
        B = theirs.base_model.model.get_submodule(n).lora_A["default"].weight.double()
        res[n] = {"distance": float(torch.linalg.matrix_norm(A.T @ A - B.T @ B, ord=2)),
                  "overlap": float((A @ B.T).square().sum() / A.shape[0])}
    return res


def _markdown(res: dict) -> str:
    s = res["setup"]
    lines = [
        f"MiniLM-L6, {s['targets']} targets, r={s['rank']}, {s['batches']} calibration batches "
        f"({s['tokens']} tokens), median of {s['repeats']}, torch threads {res['environment']['threads']}",
        "",
        "| variant | identity error | reload error | attach s (incl. calibration) |",
        "|---|---:|---:|---:|",
    ]
    for name, row in res["variants"].items():
        ident = f"{row['identity']:.1e}"
        if "identity_neutral" in row:
            ident += f" (offset zeroed: {row['identity_neutral']:.1e})"
        lines.append(f"| {name} | {ident} | {row['reload']:.1e} | {row['attach_s']:.2f} |")
    lines += ["", "| timing (median s) | s |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in res["median_s"].items()]
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v:.2f} |" for k, v in res["ratios"].items()]
    lines.append("")
    for key in ("distance", "overlap"):
        v = sorted(x[key] for x in res["eva_subspace_vs_peft"].values())
        lines.append(f"EVA subspace ours vs PEFT, {key}: median {statistics.median(v):.2f}, "
                     f"min {v[0]:.2f}, max {v[-1]:.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
