"""Convolutions as a layer kind (kinds.py): nn.Conv1d/2d/3d with groups, stride, padding,
dilation. Checked against an independent convolution with W + ΔW in the layer's shape, against
HF PEFT's conv layers holding the same tensors, and through merge."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_lite as ll
from lora_lite.interop.peft import copy_to_peft, peft_config

CONVS = {
    "conv2d_stride": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1),
    "conv2d_groups_dilation_reflect": lambda: nn.Conv2d(6, 8, 3, groups=2, dilation=2, padding=2, padding_mode="reflect"),
    "conv2d_depthwise": lambda: nn.Conv2d(6, 6, 3, groups=6, padding=1, bias=False),
    "conv2d_1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv1d": lambda: nn.Conv1d(4, 6, 5, padding=2),
    "conv3d": lambda: nn.Conv3d(3, 4, 2, stride=(1, 2, 1)),
}
CONV_VARIANTS = [n for n, v in ll.REGISTRY.items() if "conv" in v.kinds]


class Net(nn.Module):
    def __init__(self, conv: nn.Module):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x)


def _case(conv_name: str, seed: int = 0):
    torch.manual_seed(seed)
    conv = CONVS[conv_name]()
    x = torch.randn(2, conv.in_channels, *[7] * (conv.weight.dim() - 2))
    return Net(conv), x


def _trained(model: nn.Module) -> None:
    """Move every trainable adapter tensor off its init (gates and magnitudes stay near 1 / ‖W‖)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.05 if p.dim() == 1 else 0.3))


def _config(variant: str, **extra):
    example = next(iter(ll.REGISTRY[variant].examples.values()))
    fields = {"target_names": (r"^conv$",), **example.fields, **extra}
    fields.pop("feedforward_modules", None)  # IA3's input gate has no conv form
    return ll.REGISTRY[variant].config(**fields)


@pytest.mark.parametrize("conv_name", CONVS)
def test_lora_is_the_convolution_with_w_plus_delta(conv_name):
    """Δy = conv(x, s·(B A) in the layer's weight shape), the layer's stride/padding/dilation/groups."""
    model, x = _case(conv_name)
    conv = model.conv
    ll.attach(model, ll.LoRAConfig(r=3, alpha=6.0, target_names=(r"^conv$",)))
    _trained(model)
    dW = (2.0 * conv.lora_B @ conv.lora_A).reshape(conv.weight.shape)
    expected = conv._conv_forward(x, conv.weight + dW, conv.bias)  # padding mode included
    assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", CONV_VARIANTS)
@pytest.mark.parametrize("conv_name", CONVS)
def test_identity_gradient_and_merge(variant, conv_name):
    model, x = _case(conv_name)
    base = copy.deepcopy(model)
    ll.attach(model, _config(variant))
    y0, tol = base(x), ll.REGISTRY[variant].identity_tol.get(torch.float32, 0.0)
    assert (model(x) - y0).abs().max() <= tol * y0.abs().max()
    _trained(model)
    y = model(x)
    y.square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    merged = copy.deepcopy(model)
    ll.merge(merged)
    assert not any(n.startswith("conv.lora_") for n, _ in merged.named_parameters())
    assert torch.allclose(merged(x), y, atol=1e-5 * y.abs().max().item(), rtol=0)
    assert (y - base(x)).abs().max() > 1e-3  # the adapter acts


# PEFT's conv layers: LoRA/DoRA's lora_A is a dense conv without the layer's groups and
# dilation, so those match on groups = dilation = 1; PEFT's IA3 has Conv2d and Conv3d only,
# its HRA Conv2d with square kernel, stride and padding.
PEFT_CASES = [(v, c) for v in CONV_VARIANTS if ll.REGISTRY[v].peft is not None for c in CONVS
              if not c.startswith("conv2d_groups") and c != "conv2d_depthwise"
              and not (v == "ia3" and c == "conv1d") and not (v == "hra" and not c.startswith("conv2d"))]


@pytest.mark.parametrize("variant,conv_name", PEFT_CASES)
def test_peft_parity(variant, conv_name):
    model, x = _case(conv_name)
    peft_model = __import__("peft").get_peft_model(copy.deepcopy(model),
                                                   peft_config(_config(variant), ["conv"], {"conv": "conv"}))
    ll.attach(model, _config(variant))
    _trained(model)
    copy_to_peft(model, peft_model)
    y = model(x)
    assert (peft_model(x) - y).abs().max() <= 1e-5 * max(1.0, y.abs().max().item())


def test_peft_refuses_grouped_lora_copy():
    model, _ = _case("conv2d_groups_dilation_reflect")
    peft_model = __import__("peft").get_peft_model(copy.deepcopy(model), __import__("peft").LoraConfig(
        r=4, target_modules=["conv"]))
    ll.attach(model, ll.LoRAConfig(r=4, target_names=(r"^conv$",)))
    with pytest.raises(ValueError, match="without the layer's groups=2"):
        copy_to_peft(model, peft_model)


def test_variant_without_conv_is_refused_by_name():
    refused = next(n for n, v in ll.REGISTRY.items() if "conv" not in v.kinds)
    model, _ = _case("conv2d_stride")
    cfg = _config(refused) if ll.REGISTRY[refused].examples else None
    with pytest.raises(TypeError, match=rf"conv: variant {refused!r} does not adapt Conv2d"):
        ll.attach(model, cfg)
    assert not hasattr(model, "_lora_lite")


def test_ia3_feedforward_on_conv_is_refused():
    model, _ = _case("conv2d_stride")
    with pytest.raises(TypeError, match="does not adapt Conv2d"):
        ll.attach(model, ll.IA3Config(target_names=(r"^conv$",), feedforward_modules=(r"^conv$",)))


def test_convs_are_selected_only_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(1, 3, 5, 5))
    ll.attach(model, ll.LoRAConfig(r=2))
    assert list(ll.describe(model).targets) == ["2"]


def test_overridden_conv_forward_is_refused():
    class Scaled(nn.Conv2d):
        def forward(self, x):
            return 2 * super().forward(x)

    model = Net(Scaled(3, 4, 3))
    with pytest.raises(TypeError, match="overrides the forward of Conv2d"):
        ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"^conv$",)))


def test_unbatched_and_half_input():
    model, x = _case("conv2d_stride")
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"^conv$",)))
    _trained(model)
    assert torch.allclose(model(x[0]), model(x)[0], atol=1e-6)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_f_conv_reference_on_depthwise():
    """A depthwise conv with LoRA equals F.conv2d with the merged kernel (an independent reference)."""
    model, x = _case("conv2d_depthwise")
    conv = model.conv
    ll.attach(model, ll.LoRAConfig(r=2, alpha=2.0, target_names=(r"^conv$",)))
    _trained(model)
    W = conv.weight + (conv.lora_B @ conv.lora_A).reshape(conv.weight.shape)
    assert torch.allclose(model(x), F.conv2d(x, W, None, 1, 1, 1, 6), atol=1e-5)


@pytest.mark.parametrize("variant,conv_name", PEFT_CASES)
def test_peft_files_round_trip(variant, conv_name, tmp_path):
    """export_peft writes PEFT's conv kernels: PEFT loads them into the pristine model and
    computes our outputs; import_peft reads them back into the same function."""
    import peft

    model, x = _case(conv_name)
    pristine = copy.deepcopy(model)
    ll.attach(model, _config(variant))
    _trained(model)
    y = model(x)
    ll.export_peft(model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), tmp_path)
    assert (loaded(x) - y).abs().max() <= 1e-5 * max(1.0, y.abs().max().item())
    back = copy.deepcopy(pristine)
    ll.import_peft(back, tmp_path)
    assert torch.allclose(back(x), y, atol=1e-6, rtol=1e-6)


def test_peft_hra_refuses_what_its_conv2d_ignores():
    model, _ = _case("conv3d")
    ll.attach(model, ll.HRAConfig(r=2, target_names=(r"^conv$",)))
    with pytest.raises(ValueError, match="PEFT's HRA adapts nn.Conv2d with groups=1"):
        ll.export_peft(model, "/nonexistent")


def test_conv_export_from_a_file_needs_the_model(tmp_path):
    model, _ = _case("conv2d_stride")
    ll.attach(model, ll.LoRAConfig(r=2, target_names=(r"^conv$",)))
    ll.save(model, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="conv is a convolution, whose PEFT kernels need the layer's kernel shape"):
        ll.export_peft(tmp_path / "a.safetensors", tmp_path / "peft")


class TinyConvNet(nn.Module):
    """A ResNet stem and bottleneck (stride-2 convs, 1×1 projections) followed by a ConvNeXt
    block (7×7 depthwise conv, pointwise linears), as timm builds them, in plain torch."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False)
        self.reduce = nn.Conv2d(16, 8, 1)
        self.grouped = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4)
        self.expand = nn.Conv2d(8, 32, 1)
        self.shortcut = nn.Conv2d(16, 32, 1, stride=2)
        self.dwconv = nn.Conv2d(32, 32, 7, padding=3, groups=32)
        self.norm = nn.LayerNorm(32)
        self.pwconv1 = nn.Linear(32, 64)
        self.pwconv2 = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.expand(torch.relu(self.grouped(torch.relu(self.reduce(x))))) + self.shortcut(x))
        h = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        x = x + self.pwconv2(F.gelu(self.pwconv1(h))).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("variant", [n for n, v in ll.REGISTRY.items() if "conv" in v.kinds])
def test_a_resnet_convnext_style_model_trains_saves_and_merges(variant, tmp_path):
    torch.manual_seed(0)
    model, x = TinyConvNet(), torch.randn(4, 3, 16, 16)
    base = model(x)
    cfg = _config(variant, target_names=(r"^(stem|reduce|grouped|expand|shortcut|dwconv|pwconv1|pwconv2)$",))
    ll.attach(model, cfg)
    tol = ll.REGISTRY[variant].identity_tol.get(torch.float32, 0.0)  # declared: 0 = bit for bit
    assert (model(x) - base).abs().max() <= tol * base.abs().max()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), torch.arange(4)).backward()
        opt.step()
    y = model(x)
    assert (y - base).abs().max() > 1e-4
    ll.save(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    again = TinyConvNet()
    ll.load(again, tmp_path / "a.safetensors")
    assert torch.equal(again(x), y)
    ll.merge(again)
    assert torch.allclose(again(x), y, atol=1e-5)
