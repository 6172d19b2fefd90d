"""Parity with HF PEFT 0.21.x: the same adapter tensors in PEFT's slots give the same outputs.

For each method shared with PEFT we attach ours, move every trainable off its init, copy the
tensors into the PEFT model's slots with `lora_lite.interop.peft` (which knows PEFT's layout) and
compare the model outputs in fp32 (<= 1e-5 relative). PiSSA also compares the initial factors
and the residual weight W_res that both libraries write into the base layer.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")

from lora_lite.interop.peft import PEFT_METHODS, copy_to_peft, peft_config  # noqa: E402
from lora_lite.runtime import state_of  # noqa: E402
from lora_lite.variant import REGISTRY  # noqa: E402

from conftest import rel_err  # noqa: E402
from test_variants import CASES, attach_case, perturb  # noqa: E402


PEFT_CASES = [c for c in CASES if CASES[c](()).variant in PEFT_METHODS]


def test_every_shared_method_has_a_case():
    assert {CASES[c](()).variant for c in PEFT_CASES} == set(PEFT_METHODS) & set(REGISTRY)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_same_tensors_give_same_outputs(bench, case):
    ours = bench.fresh()
    cfg = attach_case(bench, case, ours)
    names = list(state_of(ours).targets)
    theirs = peft.get_peft_model(bench.fresh(), peft_config(cfg, names)).eval()
    inner = theirs.base_model.model

    if case == "pissa":  # same initial factors and the same residual weight
        for name, layer in state_of(ours).targets.items():
            t = inner.get_submodule(name)
            assert rel_err(t.lora_A["default"].weight, layer.lora_A0) <= 1e-6
            assert rel_err(t.lora_B["default"].weight, layer.lora_B0) <= 1e-6
            assert rel_err(t.base_layer.weight, layer.weight) <= 1e-6

    perturb(ours)
    copy_to_peft(ours, theirs)
    y_ours, y_theirs = bench.out(ours), bench.out(theirs)
    assert rel_err(y_ours, bench.out(bench.model)) > 1e-3, "adapter is a no-op; parity is vacuous"
    assert rel_err(y_ours, y_theirs) <= 1e-5
