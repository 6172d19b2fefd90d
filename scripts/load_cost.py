"""ll.load against PEFT's PeftModel.from_pretrained for the same LoRA adapter, side by side,
and where ll.load's time goes (file read, hash + NaN/Inf check, base fingerprints).

The Qwen3-0.6B-shaped decoder of the benchmark (random init, q/k/v/o + MLP targets, r = 16),
one torch thread; every repeat loads both onto fresh copies of the base in alternating order,
and the ratio is the median of the per-repeat ratios. Usage (from the checkout):

    python scripts/load_cost.py [--layers 2] [--repeats 5] [--out results/load.md]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lora_lite as ll  # noqa: E402
from lora_bench import cost  # noqa: E402
from lora_bench.common import environment  # noqa: E402
from lora_lite import checkpoint as ckpt  # noqa: E402
from lora_lite.fingerprint import fingerprint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    import peft

    setup = cost.Setup("qwen", a.layers, 2, 16, 1, 16)
    ours, theirs = setup.build("ours", "lora"), setup.build("peft", "lora")
    tmp = tempfile.mkdtemp()
    path, folder = os.path.join(tmp, "a.safetensors"), os.path.join(tmp, "peft")
    ll.save(ours, path)
    theirs.save_pretrained(folder)
    names = ll.read(path).targets
    t = {k: [] for k in ("ours", "peft", "read", "verify", "fingerprint")}
    for i in range(a.repeats + 1):  # the first round warms the page cache and the allocator
        for lib in ("ours", "peft") if i % 2 else ("peft", "ours"):
            fresh = copy.deepcopy(setup.base)
            t0 = time.perf_counter()
            ll.load(fresh, path) if lib == "ours" else peft.PeftModel.from_pretrained(fresh, folder)
            if i:
                t[lib].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        meta, stored = ckpt._read(path)
        t1 = time.perf_counter()
        ckpt._verify(path, meta, stored)
        t2 = time.perf_counter()
        for n in names:
            fingerprint(setup.base.get_submodule(n))
        t3 = time.perf_counter()
        if i:
            t["read"].append(t1 - t0), t["verify"].append(t2 - t1), t["fingerprint"].append(t3 - t2)
    ms = {k: 1e3 * statistics.median(v) for k, v in t.items()}
    ratio = statistics.median(x / y for x, y in zip(t["ours"], t["peft"]))
    env = environment()
    text = (f"ll.load vs PEFT from_pretrained, LoRA r=16 on the Qwen3-0.6B-shaped decoder, {a.layers} "
            f"layers ({len(names)} targets, {os.path.getsize(path) / 1e6:.2f} MB), {a.repeats} alternating "
            f"repeats, 1 thread, {env['cpu_count']}-core {env['cpu']}, torch {env['torch']}, PEFT "
            f"{env['peft']}, {env['date']} (`python scripts/load_cost.py`).\n\n"
            "| step | ms (median) |\n| --- | ---: |\n"
            f"| `ll.load` | {ms['ours']:.1f} |\n| PEFT `PeftModel.from_pretrained` | {ms['peft']:.1f} |\n"
            f"| ours / PEFT (paired) | **{ratio:.2f}** |\n"
            f"| of which: read the file once | {ms['read']:.1f} |\n"
            f"| of which: sha256 of every tensor + NaN/Inf scan | {ms['verify']:.1f} |\n"
            f"| of which: fingerprint every target's base weight | {ms['fingerprint']:.1f} |\n")
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
