"""Parity with HF PEFT (0.21, 0.22): the same adapter tensors in PEFT's slots give the same outputs.

For each method shared with PEFT we attach ours, move every trainable off its init, copy the
tensors into the PEFT model's slots with `lora_lite.interop.peft` (which knows PEFT's layout) and
compare the model outputs in fp32 (<= 1e-5 relative). PiSSA also compares the initial factors
and the residual weight W_res that PEFT writes into its base layer with the one our hook implies
(W − s·B0 A0; ours never writes W).

The data-driven inits differ from PEFT's by design (SPEC §4.6, §4.13), so they are compared
where the methods coincide: EVA's subspace on zero-mean inputs with a clear spectral gap,
antipasto's plain-SVD residual against PiSSA's, and PEFT's CorDA factors injected into ours.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

peft = pytest.importorskip("peft")

import lora_lite as ll  # noqa: E402
from lora_lite.interop.peft import copy_to_peft, peft_config, peft_kinds, peft_methods  # noqa: E402
from lora_lite.kinds import kind_of  # noqa: E402
from lora_lite.quant import dense_weight  # noqa: E402
from lora_lite.runtime import state_of  # noqa: E402
from lora_lite.variant import REGISTRY  # noqa: E402
from lora_lite.variants._svd import sketch_width  # noqa: E402

from ckpt_files import seal  # noqa: E402
from conftest import rel_err  # noqa: E402
from test_variants import CASES, attach_case, perturb  # noqa: E402


PEFT_CASES = [c for c in CASES if CASES[c](()).variant in peft_methods()]


def test_every_shared_method_has_a_case():
    assert {CASES[c](()).variant for c in PEFT_CASES} == set(peft_methods()) & set(REGISTRY)


@pytest.fixture(params=["qwen", pytest.param("minilm", marks=pytest.mark.slow), "gpt2"])
def bench(request):
    """The two linear-layer models and GPT-2, whose targets are Conv1D (PEFT: fan_in_fan_out)."""
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("case", PEFT_CASES)
def test_same_tensors_give_same_outputs(bench, case):
    m = REGISTRY[CASES[case](()).variant].peft
    if bench.kind == "gpt2" and "conv1d" not in peft_kinds(m):
        pytest.skip(f"PEFT has {m.method} for nn.Linear only, not Conv1D")
    ours = bench.fresh()
    cfg = attach_case(bench, case, ours)
    targets = state_of(ours).targets
    names = list(targets)
    theirs = peft.get_peft_model(bench.fresh(), peft_config(cfg, names, {n: kind_of(m) for n, m in targets.items()}))
    theirs.eval()
    inner = theirs.base_model.model

    if m.base is not None:  # PEFT's init rewrote its base: the same residual as ours implies
        for name, layer in state_of(ours).targets.items():
            t = inner.get_submodule(name)
            W_res = m.base(layer, cfg)
            if 4 * sketch_width(cfg.r) > min(W_res.shape):  # full SVD, as PEFT's
                assert rel_err(dense_weight(t.base_layer), W_res) <= 1e-6
            else:  # sketched top-r: PEFT's residual is the optimal one; ours within the documented 6e-6
                excess = float(W_res.norm() / dense_weight(t.base_layer).norm()) - 1
                assert -1e-6 <= excess <= 2e-5, (name, excess)

    perturb(ours)
    copy_to_peft(ours, theirs)  # PiSSA: also our residual into PEFT's base (checked below)
    y_ours, y_theirs = bench.out(ours), bench.out(theirs)
    assert rel_err(y_ours, bench.out(bench.model)) > 1e-3, "adapter is a no-op; parity is vacuous"
    assert rel_err(y_ours, y_theirs) <= 1e-5


def test_antipasto_residual_equals_pissa_residual(bench):
    """Without data antipasto's frozen part is W's top-r SVD part: W − U diag(S) Vh is the residual
    PEFT's PiSSA init writes into its base layer (any alpha), or as close to it as the sketched
    top-r SVD documents. Ours is never written: W stays."""
    ours = bench.fresh()
    ll.attach(ours, ll.AntiPaSTOConfig(r=4, target_names=bench.targets, layers=(0, 1)))
    names = list(state_of(ours).targets)
    kinds = {n: kind_of(m) for n, m in state_of(ours).targets.items()}
    theirs = peft.get_peft_model(bench.fresh(), peft_config(ll.PiSSAConfig(r=4, alpha=3), names, kinds))
    for name, layer in state_of(ours).targets.items():
        W_res = dense_weight(theirs.base_model.model.get_submodule(name).base_layer)
        ours_res = dense_weight(layer) - (layer.lora_U * layer.lora_S) @ layer.lora_Vh
        if 4 * sketch_width(4) > min(ours_res.shape):  # full SVD, as PEFT's
            assert rel_err(ours_res, W_res) <= 1e-5, name
        else:  # sketched top-r (MiniLM): within the documented 6e-6 of PEFT's optimal residual
            assert -1e-6 <= float(ours_res.norm() / W_res.norm()) - 1 <= 2e-5, name
        assert torch.equal(layer.weight, bench.model.get_submodule(name).weight), name


class _ZeroMeanToy(nn.Module):
    """Token embeddings with a clear top-4 spectrum and zero mean over the vocabulary, then two
    stacked linears: where centering (PEFT) and not centering (ours) find the same subspace."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        E = torch.randn(512, 32, generator=g) * torch.tensor([6.0, 5.0, 4.0, 3.0] + [1.0] * 28)
        self.emb = nn.Embedding.from_pretrained(E - E.mean(0))
        self.lin1 = nn.Linear(32, 24, bias=False)
        self.lin2 = nn.Linear(24, 16, bias=False)

    def forward(self, input_ids, attention_mask=None):
        return self.lin2(self.lin1(self.emb(input_ids)))


def test_eva_subspace_matches_peft_eva_on_zero_mean_inputs():
    from peft.tuners.lora.eva import get_eva_state_dict

    torch.manual_seed(0)
    base = _ZeroMeanToy()
    g = torch.Generator().manual_seed(1)
    batches = [
        {"input_ids": torch.randint(0, 512, (8, 16), generator=g), "attention_mask": torch.ones(8, 16, dtype=torch.long)}
        for _ in range(8)
    ]
    ours = _ZeroMeanToy()
    ours.load_state_dict(base.state_dict())
    ll.attach(ours, ll.EVAConfig(r=4, target_names=(r"lin\d$",)), calibration_data=batches, progress=False)
    cfg = peft.LoraConfig(  # tau near 1: PEFT's incremental PCA runs to convergence
        r=4, lora_alpha=8, target_modules=["lin1", "lin2"], init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=1.0, whiten=False, use_label_mask=False, tau=0.99999),
    )
    theirs = get_eva_state_dict(base, batches, peft_config=cfg, show_progress_bar=False)
    for name, layer in state_of(ours).targets.items():
        A, B = layer.lora_A.double(), theirs[name].double()
        assert torch.linalg.matrix_norm(A.T @ A - B.T @ B, ord=2) <= 0.03, name


def test_peft_corda_factors_injected_into_antipasto_corda(qwen, tmp_path):
    """SPEC §4.13: PEFT's (U_r, S_r, V_r) in our slots give PEFT's residual and, at g = 0, the base."""
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    sequences = [  # PEFT's CorDA hook assumes batch size 1 and no padding
        {"input_ids": b["input_ids"][i : i + 1, b["attention_mask"][i].bool()]}
        for b in qwen.calibration for i in range(b["input_ids"].shape[0])
    ]
    ours = qwen.fresh()
    ll.attach(ours, ll.AntiPaSTOCorDAConfig(r=4, layers=(0, 1)), calibration_data=sequences, progress=False)
    names = list(state_of(ours).targets)
    path = tmp_path / "ours.safetensors"
    ll.save(ours, path)

    theirs = qwen.fresh()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=names, init_lora_weights="corda",
                          corda_config=CordaConfig(corda_method="ipm"))

    def run_model():
        with torch.no_grad():
            for b in sequences:
                theirs(**b)

    preprocess_corda(theirs, cfg, run_model=run_model)
    eigens = {n: theirs.get_submodule(n).eigens for n in names}
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for n, e in eigens.items():
        tensors.update({f"{n}.lora_U": e.U_WC.contiguous(), f"{n}.lora_S": e.S_WC.clone(),
                        f"{n}.lora_P": e.V_WC.T.contiguous()})
    save_file(tensors, str(path), metadata=seal(meta, tensors))  # edited on purpose: new hashes
    theirs = peft.get_peft_model(theirs, cfg)

    injected = qwen.fresh()
    ll.load(injected, path)
    for name, layer in state_of(injected).targets.items():
        W_res = theirs.base_model.model.get_submodule(name).base_layer.weight
        ours_res = layer.weight - (layer.lora_U * layer.lora_S) @ layer.lora_P
        assert rel_err(ours_res, W_res) <= 1e-5, name
    assert torch.equal(qwen.out(injected), qwen.out(qwen.model))


@pytest.mark.parametrize("svd", ["full", "auto"])
def test_pissa_svd_full_gives_pefts_factors_where_auto_sketches(svd):
    """On a layer wide enough for the sketch (r = 4: 2r + 16 = 24 <= 256 / 4) and a flat random
    spectrum, svd='full' gives PEFT's init_lora_weights='pissa' factors and residual to rounding;
    'auto' gives the sketch's, which span a measurably different top-4 subspace."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(256, 384))
    ours = nn.Sequential(nn.Linear(256, 384))
    ours.load_state_dict(base.state_dict())
    cfg = ll.PiSSAConfig(r=4, alpha=8.0, svd=svd)
    ll.attach(ours, cfg)
    layer = ours[0]
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                                      init_lora_weights="pissa", lora_dropout=0.0))
    t = theirs.base_model.model[0]
    A, B = t.lora_A["default"].weight, t.lora_B["default"].weight
    product = rel_err(cfg.scale * layer.lora_B0 @ layer.lora_A0, cfg.scale * B @ A)
    if svd == "full":
        assert rel_err(layer.lora_A0, A) <= 1e-6 and rel_err(layer.lora_B0, B) <= 1e-6
        assert rel_err(t.base_layer.weight, layer.weight - cfg.scale * layer.lora_B0 @ layer.lora_A0) <= 1e-6
    else:
        assert product > 1e-3  # the sketched subspace: the same captured energy, other directions
        assert float(torch.linalg.matrix_norm(layer.weight - cfg.scale * layer.lora_B0 @ layer.lora_A0)
                     / torch.linalg.matrix_norm(t.base_layer.weight)) - 1 <= 2e-5
    # copied into PEFT at init, ours and PEFT's both compute the base function: copy_to_peft also
    # writes our residual W − s·B0 A0 into PEFT's base layer (PEFT's residual beside our factors
    # would be off by s·(B0 A0 − B A) ≈ `product` of the adapter's part)
    x = torch.randn(7, 256)
    with torch.no_grad():
        y = ours(x)
        assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
        copy_to_peft(ours, theirs)
        assert rel_err(theirs(x), y) <= 1e-6
