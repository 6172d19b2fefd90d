"""LoRA on fused MoE expert parameters: lora-lite's `target_parameters` against PEFT's.

    python -m lora_bench.moe_experts [--repeats 15] [--out results/moe_experts.json]

A random-init Qwen3-MoE (transformers 5: each block's experts are fused parameters gate_up_proj
(E, 2I, H) and down_proj (E, H, I)); LoRA r=8, alpha=16 on both expert parameters of every
block, in lora-lite (pre/post hooks swap W + sBA in for the experts' forward) and in PEFT 0.21
(`target_parameters`, a ParamWrapper registering a parametrization per forward), with the same
adapter tensors (checked: same logits). CPU, one thread, fp32.

Step time: one training step (forward, loss, backward), the two models interleaved with the
order alternating every repeat; reported as the median of the paired per-repeat ratios ours /
PEFT (and each one's median time). Memory: the bytes autograd saves for backward in one training
forward (deterministic), and the peak resident memory of one training step (forward, backward,
AdamW step) in a fresh process per library, over the base model's resident size (median of
interleaved repeats).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import lora_lite as ll

from .cost import _status_mb, saved_activation_bytes  # the C1 measures, the same loss

SHAPE = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             num_experts=8, num_experts_per_tok=2)
BATCH, SEQ, RANK = 4, 128, 8
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def base_model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**SHAPE, attn_implementation="eager")).eval()


def batch():
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=g)}


def ours(base, fresh=True):
    model = copy.deepcopy(base) if fresh else base
    ll.attach(model, ll.LoRAConfig(r=RANK, alpha=2.0 * RANK, target_parameters=tuple(rf"{e}$" for e in EXPERTS)))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # off init, so B != 0 and both libraries do the full work
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def theirs(base, like=None, fresh=True):
    import peft

    pcfg = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=[], target_parameters=list(EXPERTS))
    model = peft.get_peft_model(copy.deepcopy(base) if fresh else base, pcfg)
    if like is not None:
        from lora_lite.interop.peft import copy_to_peft

        copy_to_peft(like, model)
    return model


def loss_of(model, b):
    return model(**b).logits.float().square().mean()


def step(model, b) -> float:
    for p in model.parameters():
        p.grad = None
    t0 = time.perf_counter()
    loss_of(model, b).backward()
    return time.perf_counter() - t0


def memory_child(lib: str) -> dict:
    """In a fresh process: build the base, reset the resident high-water mark, attach, one step
    (forward, backward, AdamW step), read the peak."""
    torch.set_num_threads(1)
    base = base_model()
    b = batch()
    rss = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    model = ours(base, fresh=False) if lib == "lora-lite" else theirs(base, fresh=False)
    model.train()
    loss_of(model, b).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        torch.optim.AdamW(params, lr=1e-4).step()
    return {"peak_over_model_mb": _status_mb("VmHWM") - rss}


def peak_memory(lib: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "lora_bench.moe_experts", "--memory-child", lib],
                          capture_output=True, text=True, env=env, timeout=1800, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_over_model_mb"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--memory-repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child)))
        return {}
    torch.set_num_threads(1)
    base, b = base_model(), batch()
    mine = ours(base)
    peft_model = theirs(base, like=mine)
    with torch.no_grad():
        parity = float((mine(**b).logits - peft_model(**b).logits).abs().max())
    members = {"lora-lite": mine, "peft": peft_model}
    for m in members.values():
        m.train()
    times = {k: [] for k in members}
    keys = list(members)
    for rep in range(args.warmup + args.repeats):
        for k in keys[rep % 2:] + keys[: rep % 2]:
            t = step(members[k], b)
            if rep >= args.warmup:
                times[k].append(t)
    ratios = sorted(a / c for a, c in zip(times["lora-lite"], times["peft"]))
    saved = {k: saved_activation_bytes(m, b) for k, m in members.items()}
    peaks = {k: [] for k in keys}
    for rep in range(args.memory_repeats):
        for k in keys[rep % 2:] + keys[: rep % 2]:
            peaks[k].append(peak_memory(k))
    peak = {k: statistics.median(v) for k, v in peaks.items()}
    result = {
        "shape": {**SHAPE, "batch": BATCH, "seq": SEQ, "rank": RANK, "threads": 1, "dtype": "float32"},
        "parity_max_abs_logits": parity,
        "step_s_median": {k: statistics.median(v) for k, v in times.items()},
        "step_ratio_vs_peft": {"median": statistics.median(ratios), "q1": statistics.quantiles(ratios, n=4)[0],
                               "q3": statistics.quantiles(ratios, n=4)[2], "repeats": args.repeats},
        "saved_mb": {k: v / 2**20 for k, v in saved.items()},
        "saved_ratio_vs_peft": saved["lora-lite"] / saved["peft"],
        "peak_over_model_mb": peak,
        "peak_ratio_vs_peft": peak["lora-lite"] / peak["peft"],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
