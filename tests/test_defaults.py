"""Library defaults that the C2 diagnosis (results/diagnosis.md, results/quality_rerun.md) fixed."""

import torch
from torch import nn

import lora_lite as ll


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
