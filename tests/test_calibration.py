"""Calibration (SPEC A4.2–A4.4) and the data-driven variants, checked against computations
made here, independently of the library.

The reference statistics come from our own forward pre-hooks on an untouched copy of the model
(masked rows, float64), the expected factors from plain torch float64 linear algebra. Targets
span two blocks, so block 1's inputs depend on block 0's: calibrating through an already
adapted block 0 would change block 1's statistics and fail.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lora_lite as ll
from lora_lite.calibration import collect_stats
from lora_lite.runtime import state_of
from lora_lite.targets import find_targets

from cases import CASES, PRIMARY, variant
from conftest import assert_untouched, rel_err, snapshot

R = 4
EPS = 1e-3  # the configs' default cov_eps

CALIBRATED = {
    "eva": (lambda t: ll.EVAConfig(r=R, target_names=t, layers=(0, 1)), "eigvecs"),
    "antipasto": (lambda t: ll.AntiPaSTOConfig(r=R, target_names=t, layers=(0, 1)), "wanda"),
    "antipasto_rot": (lambda t: ll.AntiPaSTORotConfig(r=R, block_size=2, target_names=t, layers=(0, 1)), "wanda"),
    "antipasto_dplr": (lambda t: ll.AntiPaSTODPLRConfig(r=R, core_rank=2, target_names=t, layers=(0, 1)), "wanda"),
    "antipasto_corda": (lambda t: ll.AntiPaSTOCorDAConfig(r=R, target_names=t, layers=(0, 1)), "full"),
    "antipasto_asvd": (lambda t: ll.AntiPaSTOASVDConfig(r=R, target_names=t, layers=(0, 1)), "diag"),
    "antipasto_ablate": (
        lambda t: ll.AntiPaSTOAblateConfig(r=R, cov_orient=True, target_names=t, layers=(0, 1)), "full"),
}


def moments(model, names, batches):
    """{name: masked E[x xᵀ] (float64)} of each named layer's input, via our own pre-hooks."""
    modules = dict(model.named_modules())
    sums = {n: [0.0, 0] for n in names}
    mask = {}

    def grab(name):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])[mask["rows"]].double()
            sums[name][0] = sums[name][0] + x.T @ x
            sums[name][1] += x.shape[0]

        return hook

    handles = [modules[n].register_forward_pre_hook(grab(n)) for n in names]
    try:
        with torch.no_grad():
            for b in batches:
                mask["rows"] = b["attention_mask"].reshape(-1).bool()
                model(**b)
    finally:
        for h in handles:
            h.remove()
    return {n: g / c for n, (g, c) in sums.items()}


def expected_factors(kind, W, C):
    """(U_r, S_r, P_r) the paper math gives for pristine W and second moment C (float64), and
    the relative spectral gap between the kept and the dropped singular values (see tolerance)."""
    W = W.double()
    if kind == "wanda":  # score_i = S_i · rms(x·v_i), top-r kept in descending-S order
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        score = S * torch.einsum("id,de,ie->i", Vh, C, Vh).sqrt()
        idx = torch.topk(score, R).indices.sort().values
        dropped = torch.ones_like(S, dtype=torch.bool)
        dropped[idx] = False
        gap = (S[idx, None] - S[None, dropped]).abs().min()
        return U[:, idx], S[idx], Vh[idx], float(gap / S[0])
    if kind == "diag":
        c = C.diagonal().clamp_min(0) + EPS
        root, inv_root = c.sqrt().diag(), c.rsqrt().diag()
    else:  # CorDA: eigenvalues clamped at 0, plus eps
        lam, Q = torch.linalg.eigh(C)
        lam = lam.clamp_min(0) + EPS
        root, inv_root = (Q * lam.sqrt()) @ Q.T, (Q * lam.rsqrt()) @ Q.T
    U, S, Vh = torch.linalg.svd(W @ root, full_matrices=False)
    return U[:, :R], S[:R], Vh[:R] @ inv_root, float((S[R - 1] - S[R]) / S[0])


def subspace_tolerance(rel_gap: float) -> float:
    """The library's SVD is fp32: by Davis–Kahan its kept subspace moves by ~eps₃₂·S_max/gap, so a
    rank-r part next to a near-degenerate dropped singular value is only that accurate (measured
    on MiniLM: error·gap/S_max ≤ 3e-7 = 2.5 eps₃₂ over all targets and thread counts)."""
    return 1e-5 + 16 * torch.finfo(torch.float32).eps / rel_gap


@pytest.mark.parametrize("case", CALIBRATED)
def test_attach_matches_an_independent_computation(bench, case):
    make_cfg, kind = CALIBRATED[case]
    model = bench.fresh()
    ll.attach(model, make_cfg(bench.targets), calibration_data=bench.calibration, progress=False)
    targets = state_of(model).targets
    C = moments(bench.fresh(), list(targets), bench.calibration)
    reselected = 0
    for name, layer in targets.items():
        W = bench.model.get_submodule(name).weight
        if kind == "eigvecs":  # EVA: A = top-r eigenvectors of E[xxᵀ], largest first (sign-free)
            Q = torch.linalg.eigh(C[name]).eigenvectors[:, -R:].flip(1).T
            cos = (layer.lora_A.double() * Q).sum(1).abs()
            assert (cos > 1 - 1e-4).all(), (name, cos)
            continue
        U, S, P, rel_gap = expected_factors(kind, W, C[name])
        basis = layer.lora_P if hasattr(layer, "lora_P") else layer.lora_Vh  # ablate: P in Vh's slot
        assert rel_err(layer.lora_S.double(), S) <= 1e-4, name
        delta = (layer.lora_U.double() * layer.lora_S.double()) @ basis.double()
        assert rel_err(delta, (U * S) @ P) <= subspace_tolerance(rel_gap), name  # sign-free
        if kind == "wanda":
            top = torch.linalg.svdvals(W.double())[:R]
            reselected += not torch.allclose(S, top)
    if kind == "wanda" and bench.kind == "qwen":
        assert reselected, "Wanda kept the plain top-r everywhere: the comparison is vacuous"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_calibrated_attach_leaves_the_base_weights_and_outputs_exact(qwen, dtype):
    """The frozen part is only read: W is bit-identical while attached, and at g = 0 the output
    is the base output bit for bit, even with bf16 buffers (no residual is ever rounded)."""
    model = qwen.fresh()
    y0 = qwen.out(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = ll.AntiPaSTOCorDAConfig(r=R, dtype=dtype, layers=(0, 1))
    ll.attach(model, cfg, calibration_data=qwen.calibration, progress=False)
    state = model.state_dict()
    for k, v in base.items():
        assert torch.equal(state[k], v), k
    assert torch.equal(qwen.out(model), y0)


def test_padding_does_not_change_the_statistics(bench):
    targets = find_targets(bench.model, ll.EVAConfig(r=R, target_names=bench.targets, layers=(0,)))
    base = collect_stats(bench.model, targets, "gram", bench.calibration, progress=False)
    g = torch.Generator().manual_seed(0)
    garbage, wider = [], []
    for b in bench.calibration:
        pad = b["attention_mask"] == 0
        ids = torch.where(pad, torch.randint(1, 200, b["input_ids"].shape, generator=g), b["input_ids"])
        garbage.append({**b, "input_ids": ids})
        wider.append({k: torch.cat([v, torch.zeros_like(v[:, :3])], 1) for k, v in b.items()})
    same = collect_stats(bench.model, targets, "gram", garbage, progress=False)
    more = collect_stats(bench.model, targets, "gram", wider, progress=False)
    n_real = sum(int(b["attention_mask"].sum()) for b in bench.calibration)
    for name, _ in targets:
        assert base[name]["count"] == same[name]["count"] == more[name]["count"] == n_real
        assert torch.equal(base[name]["gram"], same[name]["gram"]), name  # pad content is ignored
        assert rel_err(more[name]["gram"], base[name]["gram"]) <= 1e-5, name  # so is pad length


def test_shared_inputs_share_one_accumulator(qwen):
    targets = find_targets(qwen.model, ll.EVAConfig(r=R, layers=(0,)))
    stats = collect_stats(qwen.model, targets, "gram", qwen.calibration, progress=False)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert stats[attn + "q_proj"] is stats[attn + "k_proj"] is stats[attn + "v_proj"]
    assert stats[mlp + "gate_proj"] is stats[mlp + "up_proj"]
    assert len({id(s) for s in stats.values()}) == 4  # qkv, o, gate/up, down
    C = moments(qwen.fresh(), [n for n, _ in targets], qwen.calibration)
    for name, _ in targets:
        assert rel_err(stats[name]["gram"].double() / stats[name]["count"], C[name]) <= 1e-5


def test_tensor_tuple_and_dict_batches_give_the_same_statistics(qwen):
    targets = find_targets(qwen.model, ll.AntiPaSTOASVDConfig(r=R, layers=(1,)))
    ids = [b["input_ids"] for b in qwen.calibration]
    by_kind = [
        collect_stats(qwen.model, targets, "diag", batches, progress=False)
        for batches in (ids, [(x,) for x in ids], [{"input_ids": x} for x in ids])
    ]
    for name, _ in targets:
        assert by_kind[0][name]["count"] == ids[0].numel() * len(ids)
        for other in by_kind[1:]:
            assert torch.equal(by_kind[0][name]["diag"], other[name]["diag"])


def _few_tokens(bench):
    b = bench.calibration[0]
    return [{k: v[:1, -2:] for k, v in b.items()}]  # one row, two real tokens < r


FAILURES = {
    "eva without data": (lambda t: ll.EVAConfig(r=R, target_names=t), lambda b: None, "needs calibration_data"),
    "corda without data": (lambda t: ll.AntiPaSTOCorDAConfig(r=R, target_names=t), lambda b: None, "needs calibration_data"),
    "asvd without data": (lambda t: ll.AntiPaSTOASVDConfig(r=R, target_names=t), lambda b: None, "needs calibration_data"),
    "too few tokens": (lambda t: ll.AntiPaSTOCorDAConfig(r=R, target_names=t), _few_tokens,
                       r"saw 2 unmasked tokens .* need at least 4 .* or a smaller r \(at most 2\)"),
    "bad batch type": (lambda t: ll.EVAConfig(r=R, target_names=t), lambda b: ["a sentence"], "must be dicts"),
    "data for lora": (lambda t: ll.LoRAConfig(r=R, target_names=t), lambda b: _untouchable(), "does not use calibration"),
    "ablate data without cov_orient": (
        lambda t: ll.AntiPaSTOAblateConfig(r=R, target_names=t), lambda b: _untouchable(),
        "does not use calibration data with this AntiPaSTOAblateConfig"),
    "ablate cov_orient without data": (
        lambda t: ll.AntiPaSTOAblateConfig(r=R, cov_orient=True, target_names=t), lambda b: None,
        r"\(AntiPaSTOAblateConfig\) needs calibration_data"),
}


def _untouchable():
    """Calibration data that must be refused before the pass reads it."""
    yield from ()
    raise AssertionError("the calibration data was read before the config was checked")


@pytest.mark.parametrize("failure", FAILURES)
def test_failed_calibrated_attach_leaves_the_model_untouched(qwen, failure):
    make_cfg, data, message = FAILURES[failure]
    model = qwen.fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        ll.attach(model, make_cfg(qwen.targets), calibration_data=data(qwen), progress=False)
    assert_untouched(model, before)


class _LinearLike(torch.nn.Module):
    """Linear-like but not torch.nn.Linear, as a quantised linear would be."""

    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = inner.in_features, inner.out_features
        self.weight, self.bias = inner.weight, inner.bias

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("case", [c for c in PRIMARY if variant(c).needs_dense_weight])
def test_weight_reading_variants_refuse_non_dense_layers_untouched(qwen, case):
    model = qwen.fresh()
    mlp = model.model.layers[0].mlp
    mlp.down_proj = _LinearLike(mlp.down_proj)
    before = snapshot(model)
    with pytest.raises(TypeError, match="needs torch.nn.Linear"):
        cfg = CASES[case](())
        data = qwen.calibration if variant(case).calibration_needs(cfg)[0] else None
        ll.attach(model, cfg, calibration_data=data, progress=False)
    assert_untouched(model, before)
    ll.attach(model, ll.EVAConfig(r=R), calibration_data=qwen.calibration, progress=False)  # hook-only: fine
    assert hasattr(mlp.down_proj, "lora_A")


def test_misaligned_mask_is_refused_untouched(minilm):
    """The pooler reads one row per sequence, so the (B·T) attention mask cannot select its rows."""
    model = minilm.fresh()
    before = snapshot(model)
    with pytest.raises(ValueError, match="attention_mask has"):
        ll.attach(model, ll.EVAConfig(r=R, target_names=(r"pooler\.dense$",)),
                  calibration_data=minilm.calibration, progress=False)
    assert_untouched(model, before)


def test_a_batch_that_raises_removes_the_hooks_and_restores_train_mode(qwen):
    model = qwen.fresh().train()
    model.model.layers[1].eval()  # a mixed mode must come back as it was
    modes = {n: m.training for n, m in model.named_modules()}
    before = snapshot(model)
    bad = {"input_ids": qwen.calibration[0]["input_ids"] + 1000}  # beyond the vocabulary
    with pytest.raises(IndexError):
        ll.attach(model, ll.EVAConfig(r=R), calibration_data=[qwen.calibration[0], bad], progress=False)
    assert_untouched(model, before)
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_progress_bar_can_be_disabled(qwen, capsys):
    for progress in (True, False):
        model = qwen.fresh()
        ll.attach(model, ll.EVAConfig(r=R, layers=(0,)), calibration_data=qwen.calibration, progress=progress)
        err = capsys.readouterr().err
        assert ("lora-lite calibration" in err) == progress
        if progress:  # the finished bar ends its line, so what is printed next starts one
            assert err.endswith("\n"), repr(err[-80:])


# every variant with a run-time steering coefficient, its primary case on two layers
STEERABLE = [c for c in PRIMARY if "coeff" in variant(c).runtime_fields]


@pytest.mark.parametrize("case", STEERABLE)
def test_coeff_steers_an_attached_model(qwen, case, tmp_path):
    cfg = dataclasses.replace(CASES[case](qwen.targets), layers=(0, 1))
    data = qwen.calibration if ll.REGISTRY[cfg.variant].requires_calibration else None
    model = qwen.fresh()
    y0 = qwen.out(model)
    ll.attach(model, cfg, calibration_data=data, progress=False)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    y1 = qwen.out(model)
    assert rel_err(y1, y0) > 1e-3
    ll.reconfigure(model, coeff=0.0)
    assert rel_err(qwen.out(model), y0) <= 1e-5  # coeff = 0 is the base model
    ll.reconfigure(model, coeff=-0.5)
    y_neg = qwen.out(model)
    assert rel_err(y_neg, y1) > 1e-3
    ll.save(model, tmp_path / "a.safetensors")  # save records the current coeff
    fresh = qwen.fresh()
    ll.load(fresh, tmp_path / "a.safetensors")
    assert state_of(fresh).cfg.coeff == -0.5
    assert rel_err(qwen.out(fresh), y_neg) <= 1e-6
    ll.reconfigure(model, coeff=1.0)
    assert rel_err(qwen.out(model), y1) <= 1e-6


def test_reconfigure_refuses_other_fields_and_invalid_values(qwen):
    model = qwen.fresh()
    ll.attach(model, ll.AntiPaSTOConfig(r=R, suppress_only=True, layers=(0,)))
    before = snapshot(model)
    with pytest.raises(ValueError, match="cannot change while attached"):
        ll.reconfigure(model, r=2)
    with pytest.raises(ValueError, match="coeff >= 0"):
        ll.reconfigure(model, coeff=-1.0)
    assert state_of(model).cfg.coeff == 1.0
    assert_untouched(model, before)
    rot = qwen.fresh()
    ll.attach(rot, ll.AntiPaSTORotConfig(r=R, block_size=2, layers=(0,)))
    with pytest.raises(ValueError, match=r"\['coeff'\] is not a field of AntiPaSTORotConfig"):  # rot has none
        ll.reconfigure(rot, coeff=0.0)


def test_load_on_a_different_base_warns_for_a_calibrated_variant(qwen, tmp_path):
    """The saved U, S, P and gains are added to whatever base they land on: a warning, and the
    change itself (output minus that base's output) is the saved model's change."""
    model = qwen.fresh()
    ll.attach(model, ll.AntiPaSTOCorDAConfig(r=R, layers=(0,)), calibration_data=qwen.calibration, progress=False)
    with torch.no_grad():
        for layer in state_of(model).targets.values():
            layer.lora_g.normal_(0.0, 0.3)
    ll.save(model, tmp_path / "a.safetensors")
    other = qwen.fresh()
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    with pytest.warns(UserWarning, match="differ"):
        ll.load(other, tmp_path / "a.safetensors")
    name = "model.layers.0.mlp.down_proj"
    x = torch.randn(3, other.get_submodule(name).in_features)
    with torch.no_grad():
        change_other = other.get_submodule(name)(x) - torch.nn.functional.linear(x, other.get_submodule(name).weight)
        change_saved = model.get_submodule(name)(x) - torch.nn.functional.linear(x, model.get_submodule(name).weight)
    assert rel_err(change_other, change_saved) <= 1e-6


def test_dplr_rank_zero_is_refused_with_a_pointer_to_antipasto():
    with pytest.raises(ValueError, match="AntiPaSTOConfig"):
        ll.AntiPaSTODPLRConfig(r=8, core_rank=0)
    with pytest.raises(ValueError, match="core_rank"):
        ll.AntiPaSTODPLRConfig(r=8, core_rank=9)


# --- encoder-decoder: each layer's rows are masked by its own token stream ---------------------

T5_TARGETS = {  # target -> the mask of the stream it reads, by the model's architecture
    "encoder.block.0.layer.0.SelfAttention.q": "attention_mask",
    "encoder.block.0.layer.1.DenseReluDense.wo": "attention_mask",
    "decoder.block.0.layer.0.SelfAttention.q": "decoder_attention_mask",
    "decoder.block.0.layer.1.EncDecAttention.q": "decoder_attention_mask",
    "decoder.block.0.layer.1.EncDecAttention.k": "attention_mask",   # reads the encoder output
    "decoder.block.0.layer.1.EncDecAttention.v": "attention_mask",
    "decoder.block.0.layer.2.DenseReluDense.wi": "decoder_attention_mask",
}


def make_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_layers=1,
                   num_decoder_layers=1, dropout_rate=0.0, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


BART_TARGETS = {
    "model.encoder.layers.0.self_attn.q_proj": "attention_mask",
    "model.encoder.layers.0.fc2": "attention_mask",
    "model.decoder.layers.0.self_attn.q_proj": "decoder_attention_mask",
    "model.decoder.layers.0.encoder_attn.q_proj": "decoder_attention_mask",
    "model.decoder.layers.0.encoder_attn.k_proj": "attention_mask",
    "model.decoder.layers.0.encoder_attn.v_proj": "attention_mask",
    "model.decoder.layers.0.fc1": "decoder_attention_mask",
}


def make_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, dropout=0.0,
                     attention_dropout=0.0, activation_dropout=0.0)
    return BartForConditionalGeneration(cfg).eval()


ENCODER_DECODERS = {"t5": (make_t5, T5_TARGETS), "bart": (make_bart, BART_TARGETS)}


def t5_batches(t_enc, t_dec, n=3):
    """Batches with padding in both streams, at different positions (so the encoder mask
    applied to decoder rows selects different rows even when the lengths are equal)."""
    g = torch.Generator().manual_seed(t_enc * 10 + t_dec)
    out = []
    for i in range(n):
        enc_mask = torch.ones(2, t_enc, dtype=torch.long)
        enc_mask[0, t_enc - 2 - i % 2:] = 0
        dec_mask = torch.ones(2, t_dec, dtype=torch.long)
        dec_mask[1, t_dec - 1 - i % 3:] = 0
        out.append({"input_ids": torch.randint(1, 64, (2, t_enc), generator=g), "attention_mask": enc_mask,
                    "decoder_input_ids": torch.randint(1, 64, (2, t_dec), generator=g),
                    "decoder_attention_mask": dec_mask})
    return out


def t5_reference_grams(model, batches, masks=T5_TARGETS):
    """{target: (Σ x xᵀ over the rows its stream's mask keeps (float64), row count)}, from
    activations captured by our own pre-hooks; the mask per target is `masks[target]`."""
    modules = dict(model.named_modules())
    captured = {}
    handles = [modules[n].register_forward_pre_hook(
        lambda m, a, n=n: captured.setdefault(n, []).append(a[0].detach().clone())) for n in masks]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n, key in masks.items():
        rows = [x.reshape(-1, x.shape[-1])[b[key].reshape(-1).bool()].double()
                for x, b in zip(captured[n], batches)]
        out[n] = (sum(r.T @ r for r in rows), sum(r.shape[0] for r in rows))
    return out


@pytest.mark.parametrize("arch", ENCODER_DECODERS)
@pytest.mark.parametrize("t_enc,t_dec", [(6, 6), (7, 5)], ids=["equal_lengths", "unequal_lengths"])
def test_encoder_decoder_statistics_use_each_streams_mask(arch, t_enc, t_dec):
    make, targets = ENCODER_DECODERS[arch]
    model = make()
    batches = t5_batches(t_enc, t_dec)
    ref = t5_reference_grams(model, batches, targets)
    modules = dict(model.named_modules())
    stats = collect_stats(model, [(n, modules[n]) for n in targets], "gram", batches, progress=False)
    for n, (gram, count) in ref.items():
        assert stats[n]["count"] == count, n
        assert rel_err(stats[n]["gram"], gram) < 1e-6, n
    # the test has power: the other stream's mask gives other statistics for every target
    swapped = {n: "decoder_attention_mask" if k == "attention_mask" else "attention_mask"
               for n, k in targets.items()}
    if t_enc == t_dec:
        wrong = t5_reference_grams(model, batches, swapped)
        for n in targets:
            assert wrong[n][1] != ref[n][1] or rel_err(wrong[n][0], ref[n][0]) > 1e-3, n


def test_encoder_decoder_without_decoder_mask_keeps_every_decoder_row():
    model = make_t5()
    batches = [{k: v for k, v in b.items() if k != "decoder_attention_mask"} for b in t5_batches(6, 6)]
    for b in batches:
        b["decoder_attention_mask"] = torch.ones_like(b["decoder_input_ids"])  # for the reference only
    ref = t5_reference_grams(model, batches)
    for b in batches:
        del b["decoder_attention_mask"]
    modules = dict(model.named_modules())
    stats = collect_stats(model, [(n, modules[n]) for n in T5_TARGETS], "diag", batches, progress=False)
    for n, (gram, count) in ref.items():
        assert stats[n]["count"] == count, n
        assert rel_err(stats[n]["diag"], gram.diagonal()) < 1e-6, n


def test_a_layer_outside_both_stacks_is_refused_when_masks_are_given():
    model = make_t5()
    before = snapshot(model)
    with pytest.raises(ValueError, match="lm_head runs outside the encoder and decoder stacks"):
        ll.attach(model, ll.EVAConfig(r=R, target_names=(r"^lm_head$",), exclude_names=()),
                  calibration_data=t5_batches(6, 6), progress=False)
    assert_untouched(model, before)
    unmasked = [{k: v for k, v in b.items() if "mask" not in k} for b in t5_batches(6, 6)]
    ll.attach(model, ll.EVAConfig(r=R, target_names=(r"^lm_head$",), exclude_names=()),
              calibration_data=unmasked, progress=False)


def test_an_encoder_decoder_whose_stacks_are_not_found_is_refused_with_masks(monkeypatch):
    model = make_t5()
    monkeypatch.setattr(model, "get_decoder", lambda: None)
    modules = dict(model.named_modules())
    targets = [(n, modules[n]) for n in T5_TARGETS]
    only_decoder_mask = [{k: v for k, v in b.items() if k != "attention_mask"} for b in t5_batches(6, 6)]
    with pytest.raises(ValueError, match=r"without get_encoder\(\)/get_decoder\(\), so which of "
                                         r"\['decoder_attention_mask'\] applies"):
        collect_stats(model, targets, "gram", only_decoder_mask, progress=False)
    unmasked = [{k: v for k, v in b.items() if "mask" not in k} for b in t5_batches(6, 6)]
    assert collect_stats(model, targets, "gram", unmasked, progress=False)


def test_calibrated_attach_on_t5_uses_the_streams_statistics():
    """End to end: EVA's A rows are the top right singular vectors of each layer's masked X."""
    model = make_t5()
    batches = t5_batches(6, 6)
    names = ("decoder.block.0.layer.1.EncDecAttention.k", "decoder.block.0.layer.2.DenseReluDense.wi")
    ref = t5_reference_grams(model, batches, {n: T5_TARGETS[n] for n in names})
    ll.attach(model, ll.EVAConfig(r=R, target_names=tuple(f"^{n}$".replace(".", r"\.") for n in names)),
              calibration_data=batches, progress=False)
    modules = dict(model.named_modules())
    for n in names:
        lam, Q = torch.linalg.eigh(ref[n][0])
        top = Q[:, -R:].T  # (R, d_in), ascending eigenvalues
        A = modules[n].lora_A.detach().double()
        # same subspace: the projection of A's rows onto the top-R eigenvectors keeps their norm
        assert rel_err((A @ top.T @ top).norm(dim=1), A.norm(dim=1)) < 1e-4, n
