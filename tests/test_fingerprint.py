"""Base fingerprints: equal up to rounding passes, any real change is caught."""

import torch
from torch import nn

from lora_lite.fingerprint import fingerprint, same_base


def _layer(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Linear(256, 512).to(dtype)


def _ulp_noise(t: torch.Tensor) -> torch.Tensor:
    """Move every entry by -1, 0 or +1 ulp, as W_res + Δ0 after W - Δ0 can."""
    direction = torch.randint(-1, 2, t.shape).to(t.dtype) * float("inf")
    return torch.nextafter(t, direction).where(direction != 0, t)


def test_identical_and_rounding_level_bases_match():
    for dtype in (torch.float32, torch.bfloat16):
        layer = _layer(dtype)
        saved = fingerprint(layer)
        assert same_base(saved, fingerprint(layer))
        with torch.no_grad():
            layer.weight.copy_(_ulp_noise(layer.weight))
        assert same_base(saved, fingerprint(layer)), dtype


def test_real_changes_are_caught():
    layer = _layer()
    saved = fingerprint(layer)
    cases = {
        "one row scaled by 1 + 1e-4": lambda w, b: w[7].mul_(1 + 1e-4),
        "all weights scaled by 1 + 1e-5": lambda w, b: w.mul_(1 + 1e-5),
        "one entry moved by 1e-3": lambda w, b: w[3, 5].add_(1e-3),
        "bias changed": lambda w, b: b[0].add_(1e-3),
        "two rows swapped": lambda w, b: w.index_copy_(0, torch.tensor([0, 1]), w[[1, 0]].clone()),
    }
    for what, change in cases.items():
        changed = _layer()
        with torch.no_grad():
            change(changed.weight, changed.bias)
        assert not same_base(saved, fingerprint(changed)), what
    assert not same_base(saved, fingerprint(nn.Linear(256, 512, bias=False)))
    assert not same_base(None, fingerprint(layer))
    assert not same_base({"weight": "junk"}, fingerprint(layer))


def test_blocked_sketch_is_the_whole_matrix_float64_sketch():
    """On the CPU the sketch converts W to float64 in row blocks; it must be the sketch of the
    whole float64 matrix (mutations caught: a probe block misaligned with its rows, fp32
    accumulation, a block left out of the norm)."""
    from lora_lite.fingerprint import _probe_vectors, _sketch

    torch.manual_seed(0)
    for shape in ((3000, 700), (700, 3000), (5, 40000)):
        W = torch.randn(shape)
        m = W.double()
        u, v = _probe_vectors(shape[0], 1), _probe_vectors(shape[1], 2)
        probes = ((u @ m) * v).sum(1)
        s = _sketch(W)
        norm = float(m.norm())
        assert abs(s["norm"] - norm) <= 1e-12 * norm
        assert max(abs(a - float(b)) for a, b in zip(s["probes"], probes)) <= 1e-12 * norm
