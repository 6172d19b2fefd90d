"""One adapter config per test case, for a given test model. Every registered variant must
appear here (test_variants checks), so a new variant cannot land untested."""

from __future__ import annotations

import lora_lite as ll

# RoAd's group size must divide every target's d_out: 32, 64, 128 (qwen); 384, 1536 (minilm).
CASES = {
    "lora": lambda t: ll.LoRAConfig(r=4, alpha=8, target_names=t),
    "pissa": lambda t: ll.PiSSAConfig(r=4, alpha=8, target_names=t),
    "dora": lambda t: ll.DoRAConfig(r=4, alpha=8, target_names=t),
    "delora": lambda t: ll.DeLoRAConfig(r=4, lambda0=2.0, target_names=t),
    "hra": lambda t: ll.HRAConfig(r=4, target_names=t),
    "ia3": lambda t: ll.IA3Config(target_names=t),
    "ia3_ff": lambda t: ll.IA3FFConfig(target_names=t),
    "road_1": lambda t: ll.RoadConfig(road_variant="road_1", group_size=16, target_names=t),
    "road_2": lambda t: ll.RoadConfig(road_variant="road_2", group_size=16, target_names=t),
    "road_4": lambda t: ll.RoadConfig(road_variant="road_4", group_size=16, target_names=t),
    "lora_xs": lambda t: ll.LoRAXSConfig(r=4, alpha=4, target_names=t),
}

# Non-identity-at-init variants: tensors to zero for an exact identity (the deliberate offset).
NEUTRAL = {"lora_xs": ("lora_R",)}


# Trainable parameters per target layer, written from the papers (README table), independent of
# the variants' ParamSpecs: d_in, d_out, cfg -> count.
def _road(din, dout, c):
    return {"road_1": 1, "road_2": 2, "road_4": 4}[c.road_variant] * dout


TRAINABLE = {
    "lora": lambda din, dout, c: c.r * (din + dout),
    "pissa": lambda din, dout, c: c.r * (din + dout),
    "dora": lambda din, dout, c: c.r * (din + dout) + dout,
    "delora": lambda din, dout, c: c.r * (din + dout) + 1,
    "hra": lambda din, dout, c: c.r * din,
    "ia3": lambda din, dout, c: dout,
    "ia3_ff": lambda din, dout, c: din,
    "road": _road,
    "lora_xs": lambda din, dout, c: c.r * c.r,
}
