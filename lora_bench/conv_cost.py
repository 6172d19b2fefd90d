"""LoRA on convolutions: lora-lite's conv kind against PEFT's conv LoRA, CPU step time.

    python -m lora_bench.conv_cost [--repeats 15] [--out results/conv_cost.json]

Two models built from code, random init, fp32, one CPU thread: the tiny diffusers
UNet2DConditionModel of tests/test_diffusers.py (LoRA r=4 on its ResNet convs and attention
projections; batch 2 of 4×16×16 latents) and the ResNet/ConvNeXt-style net of tests/test_conv.py
with its grouped and depthwise convs left out (PEFT's conv LoRA computes another function on
those; batch 16 of 3×32×32). Both libraries hold the same adapter tensors (copy_to_peft; checked:
same outputs). A step is one training forward and the backward of the mean squared output, down
to the input image (so the frozen base has a backward too, the same for all three); the
frozen base, ours and PEFT's run interleaved with the order rotating every repeat, and the
ratios are the medians of the per-repeat paired ratios (lora_bench.cost's measure).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

import lora_lite as ll

from .cost import _median_ratio

UNET_TARGETS = (r"resnets\.\d+\.conv[12]$", r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
CNN_TARGETS = (r"^(stem|reduce|expand|shortcut|pwconv1|pwconv2)$",)


def unet_case():
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    inputs = (torch.randn(2, 4, 16, 16), torch.tensor([1, 10]), torch.randn(2, 5, 32))
    return unet, inputs, UNET_TARGETS, lambda m, x: m(*x).sample


def cnn_case():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_conv import TinyConvNet

    torch.manual_seed(0)
    return TinyConvNet(), (torch.randn(16, 3, 32, 32),), CNN_TARGETS, lambda m, x: m(*x)


def _step(model, inputs, output) -> float:
    for p in model.parameters():
        p.grad = None
    t0 = time.perf_counter()
    output(model, inputs).square().mean().backward()
    return time.perf_counter() - t0


def measure(case, repeats: int, warmup: int = 3) -> dict:
    import peft

    from lora_lite.interop.peft import copy_to_peft, peft_config

    base, inputs, targets, output = case()
    cfg = ll.LoRAConfig(r=4, alpha=8.0, target_names=targets)
    ours = copy.deepcopy(base)
    ll.attach(ours, cfg)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    names = ll.describe(ours).targets
    kinds = {n: "conv" if isinstance(ours.get_submodule(n), torch.nn.Conv2d) else "linear" for n in names}
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg, names, kinds))
    copy_to_peft(ours, theirs)
    with torch.no_grad():
        assert torch.allclose(output(ours, inputs), output(theirs, inputs), atol=1e-4)
    members = {"base": base.requires_grad_(False), "ours": ours, "peft": theirs}
    inputs = (inputs[0].requires_grad_(True), *inputs[1:])
    for m in members.values():
        m.train()
    times = {k: [] for k in members}
    keys = list(members)
    for rep in range(warmup + repeats):
        for k in keys[rep % 3:] + keys[: rep % 3]:
            t = _step(members[k], inputs, output)
            if rep >= warmup:
                times[k].append(t)
    ratio, lo, hi = _median_ratio(times["ours"], times["peft"])
    return {"targets": len(names), "conv_targets": sum(k == "conv" for k in kinds.values()),
            **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
            "ours_over_peft": ratio, "ours_over_peft_q1": lo, "ours_over_peft_q3": hi}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out", default="results/conv_cost.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = {name: measure(case, args.repeats) for name, case in (("unet", unet_case), ("cnn", cnn_case))}
    for name, r in rows.items():
        print(f"{name}: {r['targets']} targets ({r['conv_targets']} convs); step base {r['base_ms']:.1f} ms, "
              f"ours {r['ours_ms']:.1f} ms, PEFT {r['peft_ms']:.1f} ms; ours/PEFT {r['ours_over_peft']:.3f} "
              f"[{r['ours_over_peft_q1']:.3f}, {r['ours_over_peft_q3']:.3f}]")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"repeats": args.repeats, "threads": 1, "rows": rows}, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
