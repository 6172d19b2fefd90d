"""Library defaults that the C2 diagnosis (results/diagnosis.md, results/quality_rerun.md) fixed."""

import pytest
import torch
from torch import nn

import lora_lite as ll

pytestmark = pytest.mark.slow  # Adam steps on several layer shapes


def test_lora_xs_defaults_to_the_papers_unit_scale():
    """alpha defaults to r (s = 1, the LoRA-XS reference setting); an explicit alpha still wins."""
    assert ll.LoRAXSConfig(r=8).scale == 1.0
    assert ll.LoRAXSConfig(r=8, alpha=16).scale == 2.0
    cfg = ll.AdapterConfig.from_dict(ll.LoRAXSConfig(r=8).to_dict())
    assert cfg.alpha is None and cfg.scale == 1.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12))
    ll.attach(model, ll.LoRAXSConfig(r=4))
    layer = model[0]
    with torch.no_grad():
        layer.lora_R.normal_()
    x = torch.randn(3, 16)
    expected = nn.functional.linear(x, layer.weight, layer.bias) + x @ layer.lora_A.T @ layer.lora_R.T @ layer.lora_B.T
    assert torch.allclose(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:DeLoRA lambda0")
def test_delora_first_step_size_follows_the_documented_lambda0_rule():
    """DeLoRA keeps PEFT's λ0 = 15 default; its docstring and docs/variants.md tell users to pick λ0 by
    ‖ΔW‖/‖W‖ ≈ λ0/√(r·d_in) after the first optimiser step (the C2 collapse at λ0 = 15 on MiniLM).
    Check that rule on layers with uneven column norms, at several shapes, ranks and λ0, against
    W_eff − W computed here from the tensors."""
    import math

    assert ll.DeLoRAConfig(r=8).lambda0 == 15.0  # PEFT's DeloraConfig default
    torch.manual_seed(0)
    shapes = [(384, 384, 16, 1.0, 1e-3), (384, 1536, 16, 4.0, 1e-2), (1536, 384, 16, 15.0, 1e-4), (256, 512, 8, 2.0, 1e-3)]
    for d_in, d_out, r, lam, lr in shapes:  # the size does not depend on the lr
        model = nn.Sequential(nn.Linear(d_in, d_out))
        with torch.no_grad():
            model[0].weight.mul_(torch.rand(d_in) * 2 + 0.1)  # uneven column norms
        W = model[0].weight.detach().clone()
        ll.attach(model, ll.DeLoRAConfig(r=r, lambda0=lam))
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
        (model(torch.randn(64, d_in)) * torch.randn(64, d_out)).sum().backward()
        opt.step()
        layer = model[0]
        w = W.norm(dim=0)
        c = (layer.lora_lambda / r) / (layer.lora_A.norm(dim=1) * layer.lora_B.norm(dim=0))
        dW = (layer.lora_B * c) @ (layer.lora_A * w)
        ratio = (dW.norm() / W.norm()).item()
        assert abs(ratio / (lam / math.sqrt(r * d_in)) - 1) < 0.1, (d_in, d_out, r, lam, lr, ratio)


def _three_layer_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(384, 384), nn.Linear(384, 1536), nn.Linear(1536, 384))


def test_delora_warns_once_per_attach_in_the_measured_collapse_region(recwarn):
    """λ0 = 6 at r = 16 puts the two d_in = 384 layers at 0.077 (inside the measured collapse
    region, 0.051-0.19) and the d_in = 1536 layer at 0.038 (outside): one warning for the whole
    attach (not one per layer) that counts the risky layers and names the rule, the measured
    threshold, the worst layer and the λ0 giving the measured safe ratio (0.0128·√(16·384) = 1)."""
    ll.attach(_three_layer_model(), ll.DeLoRAConfig(r=16, lambda0=6.0))
    ours = [w for w in recwarn if "DeLoRA" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is UserWarning
    msg = str(ours[0].message)
    assert "λ0/√(r·d_in) >= 0.05" in msg and "2 of 3 target layers" in msg
    assert "up to 0.077 at 0, d_in=384" in msg and "lambda0=1 puts every target at <= 0.0128" in msg
    assert ours[0].filename == __file__  # points at the caller's attach()


def test_delora_does_not_warn_at_a_safe_ratio(recwarn):
    """λ0 = 1 (0.0128, learned on every seed) and the default λ0 = 15 at r = 32 on 4096-wide
    layers (0.041, PEFT's usual setting) attach silently."""
    ll.attach(_three_layer_model(), ll.DeLoRAConfig(r=16, lambda0=1.0))
    ll.attach(nn.Sequential(nn.Linear(4096, 64)), ll.DeLoRAConfig(r=32))
    assert not [w for w in recwarn if "DeLoRA" in str(w.message)]


def test_delora_warning_changes_nothing_the_attach_does():
    """The warning is advice only: the adapted model (tensors, flags, outputs) is the same with the
    warning shown as with warnings silenced, and the base weights are untouched."""
    import warnings

    def attached():
        model = _three_layer_model()
        base = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(1)
        ll.attach(model, ll.DeLoRAConfig(r=16, lambda0=15.0))
        return model, base

    with pytest.warns(UserWarning, match="DeLoRA lambda0=15"):
        warned, base = attached()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet, _ = attached()
    sw, sq = warned.state_dict(), quiet.state_dict()
    assert sw.keys() == sq.keys() and all(torch.equal(sw[k], sq[k]) for k in sw)
    assert all(torch.equal(sw[k], v) for k, v in base.items())
    flags = lambda m: {n: p.requires_grad for n, p in m.named_parameters()}  # noqa: E731
    assert flags(warned) == flags(quiet)
    x = torch.randn(4, 384)
    assert torch.equal(warned(x), quiet(x))
