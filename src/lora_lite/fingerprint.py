"""Base-weight fingerprints: does this model have the base an adapter was saved from?

A fingerprint is a sketch of a target layer in float64: its Frobenius norm and k bilinear
probes uᵀ W v with fixed Gaussian vectors (and the same for the bias). Equal bases give equal
sketches; the comparison tolerates a few ulps of the layer's dtype per entry (a base that went
through a lossless cast and back), and any larger change of relative size ≳ 1e-6 (fp32) moves
some probe, since E[(uᵀ ΔW v)²] = ‖ΔW‖_F². The sketch holds k + 1 numbers per tensor, nothing of W itself.
"""

from __future__ import annotations

import torch
from torch import nn

from .quant import dense_weight, is_quantized

PROBES = 4
_BLOCK = 1 << 16  # entries of W per float64 block on the CPU (512 KiB)
_SLACK = 8.0  # rounding noise of a ±1-ulp restore is ~0.6·eps·‖W‖_F; 8 gives > 10 sigma


def _probe_vectors(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((PROBES, n), generator=g, dtype=torch.float64)


def _sketch(t: torch.Tensor) -> dict:
    """Norm and probes in float64 on t's device (only the k + 1 numbers leave it). On the CPU
    the rows go through one reused float64 buffer of ~_BLOCK entries: fresh float64 pages cost
    more than the arithmetic (3072 x 1024, CPU time: a new block per step 6.3 ms, one reused
    block 4.9 ms; a whole-matrix copy is slower still), and `ll.load` sketches every target."""
    t = t.detach()
    m = t.reshape(t.shape[0], -1) if t.dim() > 1 else t[None]
    u = _probe_vectors(m.shape[0], 1).to(m.device)
    v = _probe_vectors(m.shape[1], 2).to(m.device)
    uw = torch.zeros((PROBES, m.shape[1]), dtype=torch.float64, device=m.device)
    if m.device.type != "cpu" or m.dtype == torch.float64:
        m = m.to(torch.float64)
        uw.addmm_(u, m)
        sq = torch.linalg.vector_norm(m).square()
    else:
        rows = max(1, _BLOCK // m.shape[1])
        buf = torch.empty((min(rows, m.shape[0]), m.shape[1]), dtype=torch.float64)
        sq = torch.zeros((), dtype=torch.float64)
        for i in range(0, m.shape[0], rows):
            block = buf[: min(rows, m.shape[0] - i)]
            block.copy_(m[i:i + rows])
            uw.addmm_(u[:, i:i + rows], block)
            flat = block.view(-1)
            sq += torch.dot(flat, flat)
    return {"norm": float(sq.sqrt()), "probes": (uw * v).sum(1).tolist(), "shape": list(t.shape)}


def fingerprint(layer: nn.Module) -> dict:
    """JSON-ready sketch of a layer's weight and bias. A quantized weight is sketched as the
    fp32 matrix it dequantizes to (the same stored bytes give the same sketch)."""
    bias = getattr(layer, "bias", None)
    weight = dense_weight(layer) if is_quantized(layer) else layer.weight
    dtype = weight.dtype
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "eps": torch.finfo(dtype).eps if dtype.is_floating_point else 0.0,
        "weight": _sketch(weight),
        "bias": None if bias is None else _sketch(bias),
    }


def same_base(saved: object, now: dict) -> bool:
    """Whether a saved fingerprint matches `now` (a layer's fingerprint) up to the rounding of
    the layer's dtype."""
    if not isinstance(saved, dict):
        return False
    eps = now["eps"]
    for key in ("weight", "bias"):
        a, b = saved.get(key), now[key]
        if (a is None) != (b is None):
            return False
        if a is None:
            continue
        try:
            if list(a["shape"]) != b["shape"] or len(a["probes"]) != PROBES:
                return False
            tol = _SLACK * eps * b["norm"] + 1e-30
            if abs(float(a["norm"]) - b["norm"]) > tol:
                return False
            if any(abs(float(p) - q) > tol for p, q in zip(a["probes"], b["probes"])):
                return False
        except (KeyError, TypeError, ValueError, OverflowError):  # saved is untrusted JSON
            return False
    return True
