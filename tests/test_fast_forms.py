"""The cheaper forms of the per-call math compute what the textbook forms compute.

Each fast form (one fused product instead of two, a truncated SVD instead of a full one) is
checked against the plain form it replaces, in float64 where rounding must not hide a
difference, and the identity at init stays exact.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora_lite as ll
from lora_lite.variants.pissa import PiSSA


def _pissa_layer(d_in=48, d_out=40, r=6, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = nn.Linear(d_in, d_out).to(dtype)
    model = nn.Sequential(layer)
    cfg = ll.PiSSAConfig(r=r, alpha=2 * r, target_names=(r"^0$",))
    ll.attach(model, cfg)
    return model, layer, cfg


def _two_products(layer, cfg, x):
    """The textbook additive form: s·(x Aᵀ) Bᵀ − s·(x A0ᵀ) B0ᵀ."""
    s = cfg.scale
    return s * (x @ layer.lora_A.T) @ layer.lora_B.T - s * (x @ layer.lora_A0.T) @ layer.lora_B0.T


def test_pissa_one_product_has_the_outputs_and_gradients_of_the_two_product_form():
    """Mutations caught: a wrong sign or a swapped A0/B0 block in the fused factors (outputs
    differ), a detach of the A − A0 block (grad A differs)."""
    model, layer, cfg = _pissa_layer()
    with torch.no_grad():  # a trained state: A, B moved away from their frozen copies
        layer.lora_A.add_(0.3 * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(0.3 * torch.randn_like(layer.lora_B))
    model.double()
    x = torch.randn(5, 7, 48, dtype=torch.float64)
    g = torch.randn(5, 7, 40, dtype=torch.float64)
    fast = PiSSA.change(layer, cfg, x, None)
    grads_fast = torch.autograd.grad((fast * g).sum(), [layer.lora_A, layer.lora_B])
    ref = _two_products(layer, cfg, x)
    grads_ref = torch.autograd.grad((ref * g).sum(), [layer.lora_A, layer.lora_B])
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_pissa_change_is_exactly_zero_at_init_in_every_dtype():
    """Every term of the fused sums multiplies an exact 0 (A − A0, B − B0), whatever the
    kernel's summation order. Mutation caught: the [B, −B0] concatenation, whose two halves
    cancel only up to summation order (it leaves ~3e-7 relative in fp32 here)."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model, layer, cfg = _pissa_layer(d_in=256, d_out=192, r=32, dtype=torch.float32)
        x = (100 * torch.randn(3, 33, 256)).to(dtype)
        d = PiSSA.change(layer, cfg, x, None)
        assert d.dtype == dtype
        assert torch.count_nonzero(d) == 0, dtype


def test_pissa_trained_update_is_not_lost_to_cancellation_in_bf16():
    """A small trained update (A − A0 ~ 1e-3·A) on bf16 activations: the fused form keeps it to
    bf16 precision of the update itself, where subtracting two bf16 products loses it in the
    rounding of the large terms. Compared with the float64 change."""
    model, layer, cfg = _pissa_layer(d_in=256, d_out=192, r=32)
    with torch.no_grad():
        layer.lora_A.add_(1e-3 * layer.lora_A.abs().mean() * torch.randn_like(layer.lora_A))
        layer.lora_B.add_(1e-3 * layer.lora_B.abs().mean() * torch.randn_like(layer.lora_B))
    x = torch.randn(4, 16, 256)
    exact = _two_products(
        type("L", (), {k: getattr(layer, k).double() for k in ("lora_A", "lora_B", "lora_A0", "lora_B0")}),
        cfg, x.double())
    with torch.no_grad():
        fast = PiSSA.change(layer, cfg, x.bfloat16(), None).double()
        old = _two_products(
            type("L", (), {k: getattr(layer, k).bfloat16() for k in ("lora_A", "lora_B", "lora_A0", "lora_B0")}),
            cfg, x.bfloat16()).double()
    err_fast = float((fast - exact).norm() / exact.norm())
    err_old = float((old - exact).norm() / exact.norm())
    assert err_fast < 0.02, err_fast
    assert err_old > 10 * err_fast, (err_old, err_fast)


def _minilm_weights():
    from lora_lite.demo import load_minilm

    model, _ = load_minilm()
    return [m.weight.detach() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.startswith("encoder")]


@pytest.mark.slow  # 36 MiniLM weights x 3 ranks against float64 full SVDs (~40 s on one thread)
def test_sketched_top_r_svd_matches_the_full_svd_on_real_weights():
    """The documented accuracy of `top_r_svd`'s sketch against the fp64 full SVD, on every
    MiniLM-L6 encoder weight. Mutations caught: fewer power iterations (singular values off by
    ~4e-2 with 2 instead of 10), a sketch of r + 4 columns instead of 2r + 16."""
    from lora_lite.variants._svd import sketch_width, top_r_svd

    weights = _minilm_weights()
    for r in (4, 8, 16):
        for W in weights:
            assert 4 * sketch_width(r) <= min(W.shape)  # the sketch path, not the full SVD
            U0, S0, Vh0 = torch.linalg.svd(W.double(), full_matrices=False)
            U, S, Vh = (t.double() for t in top_r_svd(W, r))
            assert float(((S - S0[:r]).abs() / S0[:r]).max()) <= 5e-4
            optimal = S0[r:].square().sum().sqrt()
            assert float((W.double() - U * S @ Vh).norm() / optimal) - 1 <= 2e-5
            sin = torch.linalg.matrix_norm(U - U0[:, :r] @ (U0[:, :r].T @ U), 2)
            assert float(sin * (S0[r - 1] - S0[r]) / S0[0]) <= 2e-3
            eye = torch.eye(r, dtype=torch.float64)
            torch.testing.assert_close(U.T @ U, eye, atol=1e-5, rtol=0)
            torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-5, rtol=0)


def test_sketched_top_r_svd_does_not_read_or_move_the_global_rng():
    """Attach is reproducible whatever the caller seeded, and leaves the caller's stream alone."""
    from lora_lite.variants._svd import sketch_width, top_r_svd

    g = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(384, 384, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(384, 384, generator=g))
    W = (Q1 * torch.arange(1, 385).float().rsqrt()) @ Q2.T  # σ_i = i^(-1/2), a slowly decaying spectrum
    assert 4 * sketch_width(8) <= 384  # the sketch path
    torch.manual_seed(1)
    first = top_r_svd(W, 8)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = top_r_svd(W, 8)
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
