"""One adapter config per test case, for a given test model. Every registered variant must
appear here (test_variants checks), so a new variant cannot land untested."""

from __future__ import annotations

import torch

import lora_lite as ll


def _two(targets):
    return {"target_names": targets, "layers": (0, 1)}


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
    # SVD/calibrated variants on blocks 0 and 1 only (all of the tiny Qwen3; a third of MiniLM,
    # where each target costs an SVD or eigh): block 1's targets sit downstream of block 0's.
    "eva": lambda t: ll.EVAConfig(r=4, alpha=8, **_two(t)),
    "antipasto": lambda t: ll.AntiPaSTOConfig(r=4, **_two(t)),
    "antipasto_suppress": lambda t: ll.AntiPaSTOConfig(r=4, suppress_only=True, coeff=0.5, **_two(t)),
    "antipasto_rot": lambda t: ll.AntiPaSTORotConfig(r=8, block_size=4, **_two(t)),
    "antipasto_rot_U": lambda t: ll.AntiPaSTORotConfig(r=4, block_size=2, rotate_basis="U", **_two(t)),
    "antipasto_rot_both": lambda t: ll.AntiPaSTORotConfig(r=8, block_size=4, rotate_basis="both", **_two(t)),
    "antipasto_rot_none": lambda t: ll.AntiPaSTORotConfig(r=4, rotate_basis="none", **_two(t)),
    "antipasto_corda": lambda t: ll.AntiPaSTOCorDAConfig(r=4, **_two(t)),
    "antipasto_asvd": lambda t: ll.AntiPaSTOASVDConfig(r=4, **_two(t)),
    "antipasto_ablate": lambda t: ll.AntiPaSTOAblateConfig(r=4, k=2, **_two(t)),
    "antipasto_ablate_orient": lambda t: ll.AntiPaSTOAblateConfig(r=4, cov_orient=True, **_two(t)),
    "antipasto_dplr": lambda t: ll.AntiPaSTODPLRConfig(r=8, lora_rank=2, **_two(t)),
}

# Cases of optional-calibration variants that attach without data (the others get
# bench.calibration whenever the variant has a calibration kind).
NO_DATA = {"antipasto_suppress", "antipasto_rot_U", "antipasto_rot_none", "antipasto_ablate"}

# Cases that only change the hook math of a case run on both models: tiny Qwen3 only (cost).
QWEN_ONLY = {"antipasto_rot_U", "antipasto_rot_both", "antipasto_rot_none"}

# Non-identity-at-init variants: tensors to zero for an exact identity (the deliberate offset).
NEUTRAL = {
    "lora_xs": ("lora_R",),
    **{c: ("lora_delta_s",) for c in CASES if c.startswith("antipasto_rot")},
    **{c: ("lora_alpha",) for c in CASES if c.startswith("antipasto_ablate")},
}


# Identity at init: max |y − y0| / max |y0| allowed, per variant and base dtype; absent = 0 (bit
# for bit). Every variant adds a change Δ that is exactly 0 at init (B = 0, g − 1 = 0, gain − 1 =
# ELU(0) = 0, PiSSA's two equal products, R − I = 0), so only HRA needs a tolerance:
IDENTITY_TOL = {
    # its paired reflections cancel in exact arithmetic only; Δx is rounding of the (…, r) product
    "hra": {torch.float32: 1e-5, torch.bfloat16: 1e-4},
}


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
    "eva": lambda din, dout, c: c.r * (din + dout),
    "antipasto": lambda din, dout, c: c.r,
    "antipasto_rot": lambda din, dout, c: c.r
    + {"none": 0, "V": 1, "U": 1, "both": 2}[c.rotate_basis] * c.r * (c.block_size - 1) // 2,
    "antipasto_corda": lambda din, dout, c: c.r,
    "antipasto_asvd": lambda din, dout, c: c.r,
    "antipasto_ablate": lambda din, dout, c: c.r * c.k + c.k,
    "antipasto_dplr": lambda din, dout, c: c.r + 2 * c.r * c.lora_rank,
}
