"""Attach time of the SVD-initialised variants on the Qwen3-0.6B-shaped decoder, with
`top_r_svd` as it is (a randomized top-r sketch where r is small against the layer) and with
the full SVD it replaced, in the same process; one torch thread, the benchmark's configs
(r = 16 for pissa / lora_xs, r = 256 for the AntiPaSTO family, calibrated as in C1). Usage:

    python scripts/svd_init_cost.py [--layers 1] [--variants pissa,lora_xs,antipasto,antipasto_corda]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_bench import cost  # noqa: E402
from lora_bench.common import environment  # noqa: E402
from lora_lite.variants import _antipasto, antipasto_ablate, lora_xs, pissa  # noqa: E402

USERS = (pissa, lora_xs, _antipasto, antipasto_ablate)  # modules that call top_r_svd


def full_svd(W, r):
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    return U[:, :r], S[:r], Vh[:r]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--variants", default="pissa,lora_xs,antipasto,antipasto_corda")
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    setup = cost.Setup("qwen", a.layers, 2, 128, 4, 16)
    rows = []
    for name in a.variants.split(","):
        cfg = setup.config(name)
        times = {}
        for label in ("full SVD", "now"):
            patches = [mock.patch.object(m, "top_r_svd", full_svd) for m in USERS] if label == "full SVD" else []
            for p in patches:
                p.start()
            t0 = time.perf_counter()
            model = setup.build("ours", name)
            times[label] = time.perf_counter() - t0
            for p in patches:
                p.stop()
            del model
        rows.append(f"| `{name}` | {cfg.r} | {times['full SVD']:.1f} | {times['now']:.1f} |")
    env = environment()
    text = (f"Attach (incl. calibration where C1 uses it) on the Qwen3-0.6B-shaped decoder, {a.layers} "
            f"layer(s) = {7 * a.layers} targets, 1 thread, {env['cpu_count']}-core {env['cpu']}, torch "
            f"{env['torch']}, {env['date']} (`python scripts/svd_init_cost.py`). One run each.\n\n"
            "| variant | r | attach s, full SVD | attach s, now |\n| --- | ---: | ---: | ---: |\n" + "\n".join(rows) + "\n")
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
