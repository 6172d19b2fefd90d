"""The steering benchmark (lora_bench.steer): its metrics against hand computations, the two
steering-vector peers against their definitions, the per-example coefficient routes the training
uses against one float per row, and the quick mode end to end (JSON, resume, report)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lora_lite as ll
from lora_bench import steer, steer_report

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- metrics on hand-made numbers ------------------------------------------------------------

def test_spearman_matches_the_rank_formula():
    # no ties: rho = 1 − 6 Σd² / (n (n² − 1)); d = (0, 1, −1, 0) gives 1 − 12 / 60
    assert steer.spearman([1, 2, 3, 4], [10, 30, 20, 40]) == pytest.approx(0.8)
    assert steer.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties take their mean rank: y ranks (0.5, 0.5, 2) against x ranks (0, 1, 2)
    expected = (-1 * -0.5 + 0 * -0.5 + 1 * 1.0) / math.sqrt(2 * 1.5)
    assert steer.spearman([1, 2, 3], [5, 5, 7]) == pytest.approx(expected)
    assert math.isnan(steer.spearman([1, 2, 3], [4, 4, 4]))


def test_symmetry_is_the_ratio_of_the_two_shifts():
    assert steer.symmetry(-2.0, 2.0) == 1.0
    assert steer.symmetry(0.0, 2.0) == 0.0
    assert steer.symmetry(1.0, 2.0) == -0.5  # both signs push the same way
    assert math.isnan(steer.symmetry(1.0, 0.0))


def test_flip_rate_counts_only_the_sentences_on_the_other_side():
    logit0 = torch.tensor([-1.0, -2.0, 3.0, 4.0])
    logit_c = torch.tensor([1.0, -1.0, 5.0, -1.0])
    assert steer.flip_rate(logit0, logit_c, +1) == 0.5  # of the two negatives, one turned positive
    assert steer.flip_rate(logit0, logit_c, -1) == 0.5  # of the two positives, one turned negative
    assert math.isnan(steer.flip_rate(torch.tensor([1.0]), torch.tensor([2.0]), +1))


def test_drift_is_the_change_outside_the_direction_over_the_norm():
    h0 = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    h = h0 + torch.tensor([[1.0, 2.0], [5.0, 0.0]])
    d = torch.tensor([1.0, 0.0])
    assert steer.drift(h0, h, d) == pytest.approx((2 / 5 + 0 / 2) / 2)
    assert steer.pair_drift(h0, h, d) == pytest.approx(((2 / 5 + 0) + (2 / math.hypot(4, 6) + 0)) / 4)


def test_readout_change_is_the_mean_move_over_the_mean_margin():
    assert steer.readout_change(torch.tensor([2.0, -4.0]), torch.tensor([3.0, -1.0])) == pytest.approx(2 / 3)


@pytest.mark.parametrize("f, target, want", [
    (lambda c: c * c, 0.25, 0.5),          # crossing below 1: halving brackets it
    (lambda c: c * c, 9.0, 3.0),           # above 1: doubling brackets it
    (lambda c: 100 * c, 1.0, 0.01),
])
def test_bisect_finds_the_crossing_of_a_monotone_function(f, target, want):
    # the bracket [c/2, c] or [c, 2c] is halved `iters` times: c within a 2^-iters fraction above
    for iters in (4, 12):
        c, reached = steer.bisect(f, target, 16.0, iters=iters)
        assert reached and f(c) >= target and want <= c <= want * (1 + 2.0 ** -iters) * (1 + 1e-9)


def test_bisect_caps_an_arm_that_never_reaches_the_budget():
    assert steer.bisect(lambda c: 0.01 * c, 1.0, 16.0) == (16.0, False)


def test_pair_loss_closed_form():
    h0, twin, d = torch.zeros(1, 2), torch.tensor([[2.0, 0.0]]), torch.tensor([1.0, 0.0])
    h = torch.tensor([[1.0, 1.0]])  # half way along d, one unit off it; the gap² is 4
    total, concept, coherence = steer.pair_loss(h, h0, twin, d, weight=2.0)
    assert concept.item() == pytest.approx(1 / 4) and coherence.item() == pytest.approx(1 / 4)
    assert total.item() == pytest.approx(1 / 4 + 2 / 4)


def test_pca_direction_is_the_first_component_of_the_centred_differences():
    sklearn = pytest.importorskip("sklearn.decomposition")
    g = torch.Generator().manual_seed(0)
    neg = torch.randn(40, 6, generator=g)
    # differences: mean along axis 0, most variance along axis 1
    diff = torch.zeros(40, 6)
    diff[:, 0] = 1.0
    diff[:, 1] = 3 * torch.randn(40, generator=g)
    diff[:, 2:] = 0.1 * torch.randn(40, 4, generator=g)
    pos = neg + diff
    v = steer.pca_direction(pos, neg)
    u = torch.tensor(sklearn.PCA(n_components=1).fit(diff.numpy()).components_[0], dtype=torch.float32)
    assert abs(torch.dot(v / v.norm(), u).item()) == pytest.approx(1.0, abs=1e-5)
    assert ((pos @ v) > (neg @ v)).float().mean() >= 0.5  # signed toward the positive side
    assert torch.dot(v, v / v.norm()).item() == pytest.approx(abs(torch.dot(diff.mean(0), u).item()), rel=1e-4)


def test_sentences_pair_the_concept_and_balance_the_other_property():
    pairs = steer.pairs(200, 0, steer.OBJECTS)
    for pos, neg, plural in pairs:
        a, b = pos.split(), neg.split()
        assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1  # one word differs
        assert (a[2] == "were") == bool(plural)
    assert 60 < sum(p for _, _, p in pairs) < 140
    held = steer.labelled(64, 1, steer.HELD_OUT_OBJECTS)
    assert {y for _, y, _ in held} == {0, 1}
    assert not any(o in t for t, _, _ in steer.labelled(64, 1, steer.OBJECTS[:-8]) for o in steer.HELD_OUT_OBJECTS)


# ---- the coefficient routes the training uses: one tensor = one float per row ---------------

def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                     intermediate_size=64, attn_implementation="eager")
    return BertModel(cfg).eval()


def _randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("via", ["scaled", "coeff", "peft"])
def test_a_coefficient_tensor_steers_each_row_as_its_float(via):
    """Both signs in one forward (the training batch) equal each row run alone at its sign."""
    from lora_lite.variant import REGISTRY

    model = _tiny_bert()
    ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(1))
    base = model(input_ids=ids).last_hidden_state
    if via == "peft":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                           init_lora_weights=False))
    else:
        name = next(n for n, v in REGISTRY.items() if "coeff" in v.runtime_fields) if via == "coeff" else "lora"
        ll.attach(model, ll.AdapterConfig.from_dict({"variant": name, "r": 4, "target_names": [r"\.(query|value)$"]}))
        _randomize(model)
    signs = torch.tensor([1.0, -1.0, 0.0, -1.0])
    with steer.steered(model, via, signs):
        together = model(input_ids=ids).last_hidden_state
    for i, s in enumerate(signs.tolist()):
        with steer.steered(model, via, s):
            alone = model(input_ids=ids[i: i + 1]).last_hidden_state[0]
        torch.testing.assert_close(together[i], alone, rtol=1e-5, atol=1e-6)
    assert torch.equal(together[2], base[2])  # c = 0: the base row, bit for bit
    assert not torch.allclose(together[0], base[0])


# ---- the steering-vector peers on MiniLM --------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    from lora_lite.demo import load_minilm

    model, tok = load_minilm()
    return model.eval(), tok


def _hand_block_means(model, tok, texts, layer):
    """Block `layer`'s output mean-pooled over tokens, with a plain forward hook."""
    got = []
    handle = model.encoder.layer[layer].register_forward_hook(
        lambda m, i, o: got.append(o[0] if isinstance(o, tuple) else o))
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        model(**batch)
    handle.remove()
    m = batch["attention_mask"].unsqueeze(-1).float()
    return (got[0] * m).sum(1) / m.sum(1)


def test_mean_difference_vectors_are_the_hand_computed_mean_difference(minilm):
    pytest.importorskip("steering_vectors")
    model, tok = minilm
    pairs = steer.pairs(6, 0, steer.OBJECTS)
    vectors = steer.mean_difference(model, tok, pairs, (1, 3))
    for layer in (1, 3):
        pos = _hand_block_means(model, tok, [p for p, _, _ in pairs], layer)
        neg = _hand_block_means(model, tok, [n for _, n, _ in pairs], layer)
        torch.testing.assert_close(vectors[layer], (pos - neg).mean(0), rtol=1e-5, atol=1e-6)


def test_a_steering_vector_adds_c_times_v_at_every_token(minilm):
    pytest.importorskip("steering_vectors")
    model, tok = minilm
    v = {2: torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))}
    batch = tok(["The chef was happy about the trip.", "The men were sad."], padding=True, return_tensors="pt")
    with torch.no_grad(), steer.steered(model, "vector", -1.5, v):
        steered = model(**batch).last_hidden_state
    handle = model.encoder.layer[2].register_forward_hook(lambda m, i, o: (o[0] - 1.5 * v[2], *o[1:])
                                                          if isinstance(o, tuple) else o - 1.5 * v[2])
    with torch.no_grad():
        hand = model(**batch).last_hidden_state
    handle.remove()
    torch.testing.assert_close(steered, hand, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(model(**batch).last_hidden_state, steered)  # removed on exit


# ---- the quick mode end to end -----------------------------------------------------------------

@pytest.mark.slow  # MiniLM trains, fits and is evaluated 5 times over (about a minute of CPU)
def test_quick_run_writes_json_resumes_and_reports(tmp_path):
    rows = [a["row"] for a in steer.arms(quick=True)]
    try:
        import steering_vectors  # noqa: F401
    except ImportError:
        rows = [r for r in rows if r not in steer.PEERS]
    args = ["--quick", "--rows", ",".join(dict.fromkeys(rows)), "--steps", "2", "--n-test", "16", "--n-ref", "8",
            "--out", str(tmp_path)]
    assert steer.main(args) == 0
    data = json.loads((tmp_path / "steer_quick.json").read_text())
    assert data["bench"] == "steer" and data["env"]["torch"]
    assert sorted((r["row"], r["knobs"]["via"]) for r in data["runs"]) == sorted(
        (a["row"], a["via"]) for a in steer.arms(quick=True) if a["row"] in rows)
    for r in data["runs"]:
        assert r["coeffs"] == list(steer.COEFFS) and r["shift"][steer.COEFFS.index(0.0)] == 0.0
        assert len(r["loss"]) == (2 if r["params"] else 0)
        assert r["drift"][steer.COEFFS.index(0.0)] == 0.0
        assert r["number_change"][steer.COEFFS.index(0.0)] == 0.0
        assert -1 <= r["spearman"] <= 1
        for cost in ("equal_cost", "equal_number"):
            assert set(r[cost]) == {"budget", "+", "-"} and r[cost]["+"]["c"] > 0 > r[cost]["-"]["c"]
    md = (tmp_path / "steer_quick.md").read_text()
    assert all(steer_report._label(r["row"], r["knobs"]["via"]) in md for r in data["runs"])
    assert (tmp_path / "steer_quick_shift.png").stat().st_size > 0
    assert (tmp_path / "steer_quick_cost.png").stat().st_size > 0
    assert steer.main(args) == 0  # resumes: nothing left to run
    assert json.loads((tmp_path / "steer_quick.json").read_text())["runs"] == data["runs"]
