"""Parity with HF PEFT 0.21.x: the same adapter tensors in PEFT's slots give the same outputs.

For each method shared with PEFT we attach ours, move every trainable off its init, copy the
tensors into the PEFT model's slots (transposing/reshaping where PEFT's layout differs) and
compare the model outputs in fp32 (<= 1e-5 relative). PiSSA also compares the initial factors
and the residual weight W_res that both libraries write into the base layer.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

import lora_lite as ll  # noqa: E402
from lora_lite.runtime import state_of  # noqa: E402

from conftest import rel_err  # noqa: E402
from test_variants import CASES, attach_case, perturb  # noqa: E402


def _lora(cfg, names, **kw):
    return peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=names, bias="none",
        use_rslora=False, **kw,
    )


def _copy_lora(ours, theirs):
    theirs.lora_A["default"].weight.copy_(ours.lora_A)
    theirs.lora_B["default"].weight.copy_(ours.lora_B)


def _copy_dora(ours, theirs):
    _copy_lora(ours, theirs)
    theirs.lora_magnitude_vector["default"].weight.copy_(ours.lora_m)


def _copy_delora(ours, theirs):
    theirs.delora_A["default"].copy_(ours.lora_A)
    theirs.delora_B["default"].copy_(ours.lora_B)
    theirs.delora_lambda["default"].copy_(ours.lora_lambda.reshape(1))
    theirs.delora_w_norm["default"].copy_(ours.lora_wnorm)


def _copy_hra(ours, theirs):
    theirs.hra_u["default"].copy_(ours.lora_U.T)


def _copy_ia3(ours, theirs):
    theirs.ia3_l["default"].copy_(ours.lora_g.reshape(theirs.ia3_l["default"].shape))


def _copy_road(ours, theirs):
    theirs.road_theta["default"].copy_(ours.lora_road_theta)
    theirs.road_alpha["default"].copy_(ours.lora_road_alpha)


def _road(cfg, names):
    return peft.RoadConfig(
        variant=cfg.road_variant, group_size=cfg.group_size, target_modules=names, init_weights=True
    )


PEFT = {
    "lora": (lambda c, n: _lora(c, n), _copy_lora),
    "pissa": (lambda c, n: _lora(c, n, init_lora_weights="pissa"), _copy_lora),
    "dora": (lambda c, n: _lora(c, n, use_dora=True), _copy_dora),
    "delora": (
        lambda c, n: peft.DeloraConfig(r=c.r, delora_lambda=c.lambda0, module_dropout=0.0,
                                       target_modules=n, init_weights=True),
        _copy_delora,
    ),
    "hra": (lambda c, n: peft.HRAConfig(r=c.r, apply_GS=False, target_modules=n, init_weights=True), _copy_hra),
    "ia3": (lambda c, n: peft.IA3Config(target_modules=n, feedforward_modules=[]), _copy_ia3),
    "ia3_ff": (lambda c, n: peft.IA3Config(target_modules=n, feedforward_modules=n), _copy_ia3),
    "road_1": (_road, _copy_road),
    "road_2": (_road, _copy_road),
    "road_4": (_road, _copy_road),
}


def test_parity_table_covers_the_shared_methods():
    assert set(PEFT) <= set(CASES)


@pytest.mark.parametrize("case", PEFT)
def test_same_tensors_give_same_outputs(bench, case):
    make_cfg, copy = PEFT[case]
    ours = bench.fresh()
    cfg = attach_case(bench, case, ours)
    names = list(state_of(ours).targets)
    theirs = peft.get_peft_model(bench.fresh(), make_cfg(cfg, names)).eval()
    inner = theirs.base_model.model

    if case == "pissa":  # same initial factors and the same residual weight
        for name, layer in state_of(ours).targets.items():
            t = inner.get_submodule(name)
            assert rel_err(t.lora_A["default"].weight, layer.lora_A0) <= 1e-6
            assert rel_err(t.lora_B["default"].weight, layer.lora_B0) <= 1e-6
            assert rel_err(t.base_layer.weight, layer.weight) <= 1e-6

    perturb(ours)
    with torch.no_grad():
        for name, layer in state_of(ours).targets.items():
            copy(layer, inner.get_submodule(name))
    y_ours, y_theirs = bench.out(ours), bench.out(theirs)
    assert rel_err(y_ours, bench.out(bench.model)) > 1e-3, "adapter is a no-op; parity is vacuous"
    assert rel_err(y_ours, y_theirs) <= 1e-5
