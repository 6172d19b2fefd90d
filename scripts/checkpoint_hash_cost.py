"""What checkpoint integrity costs: save and load of the largest checkpoint we write (AntiPaSTO
r=256 on every encoder linear of the embedded MiniLM, ~43 MB), with and without hashing.

"Without" replaces the per-tensor sha256 by a constant on save and skips verification
(hashes and the NaN/Inf scan) on load; everything else (fingerprints, checks, install) runs
as usual. Medians of REPEATS runs, warm page cache. Usage:

    PYTHONPATH=src python scripts/checkpoint_hash_cost.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from unittest import mock

import torch

import lora_lite as ll
import lora_lite.checkpoint as ckpt
from lora_lite.demo import load_minilm


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def paired_ms(with_fn, without_fn, patch, repeats: int) -> tuple[float, float]:
    """Medians of with/without runs, interleaved so that load drift hits both alike."""
    a, b = [], []
    for _ in range(repeats):
        a.append(median_ms(with_fn, 1))
        with patch:
            b.append(median_ms(without_fn, 1))
    return statistics.median(a), statistics.median(b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    base, _ = load_minilm()
    model = copy.deepcopy(base)
    ll.attach(model, ll.AntiPaSTOConfig(r=256, target_names=(r"^encoder\.",)), progress=False)
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "antipasto.safetensors")
    ll.save(model, path)
    _, tensors = ckpt._read(path)
    mb = os.path.getsize(path) / 1e6

    def load():
        fresh = copy.deepcopy(base)
        ll.load(fresh, path)

    copy_ms = median_ms(lambda: copy.deepcopy(base), args.repeats)  # subtracted from load times
    rows = {
        "sha256 of every tensor": median_ms(lambda: [ckpt._digest(t) for t in tensors.values()], args.repeats),
        "NaN/Inf scan of every tensor": median_ms(lambda: [ckpt._finite(t) for t in tensors.values()], args.repeats),
    }
    save = lambda: ll.save(model, path)  # noqa: E731
    rows["save, with hashes"], rows["save, without hashes"] = paired_ms(
        save, save, mock.patch.object(ckpt, "_digest", lambda t: ""), args.repeats)
    ll.save(model, path)  # with hashes again, for the loads
    w, wo = paired_ms(load, load, mock.patch.object(ckpt, "_verify", lambda *a: None), args.repeats)
    rows["load, with verification"], rows["load, without verification"] = w - copy_ms, wo - copy_ms
    print(f"checkpoint: {mb:.1f} MB, {len(tensors)} tensors; torch threads {torch.get_num_threads()}; "
          f"median of {args.repeats}")
    for name, ms in rows.items():
        print(f"  {name:32s} {ms:8.1f} ms")


if __name__ == "__main__":
    main()
