"""Steering both ways: adapters trained so that c = +1 and c = −1 move a concept in opposite
directions, against training-free steering vectors, on a readout the adapter never sees.

    python -m lora_bench steer                every arm, 3 seeds, resumable, into results/steer.json
    python -m lora_bench steer --jobs 2       runs in 2 worker processes
    python -m lora_bench steer --quick        a smoke run: 3 trained arms and the peers, a few steps
    python -m lora_bench report               results/steer.md, the plots, the docs tables

Data (`sentences`): generated sentences "The <subject> was <adverb> <adjective> about the
<object>." The concept is the adjective's sentiment (one of ADJECTIVES' antonym pairs); the
unrelated property is the subject's number (singular "was" / plural "were"), drawn
independently. A contrastive pair is one sentence and its twin with the adjective swapped for
its antonym. Held-out sentences use objects no training sentence uses; the reference sentences
(for the coherence cost) have another template and no sentiment word at all.

Readouts (`Probe`): two logistic regressions on the BASE model's mean-pooled last hidden state,
trained on their own sentences, then frozen: sentiment (the concept) and number (coherence).
Neither is seen by any arm.

Arms, all on the encoder blocks in LAYERS (two untouched blocks lie between them and the
readout, so a change has to propagate as a steering vector's does):
  * every registered variant through `ll.scaled(model, c)`, and the variants with a run-time
    `coeff` also through `ll.reconfigure(model, coeff=c)`, each with its declared benchmark
    setting (`BenchSetting.knobs` at RANK), on every linear of those blocks;
  * HF PEFT LoRA with the same setting; c scales each LoRA layer's `scaling` entry (PEFT's
    forward multiplies the low-rank output by it, so a (batch, 1, 1) tensor there steers each
    example with its own c);
  * "mean-diff": the `steering-vectors` package's mean aggregator over the blocks' outputs
    (mean-pooled over tokens, as the encoder's readout pools), added at every token by the
    package's `SteeringVector.apply(model, multiplier=c)`;
  * "pca": repeng's "pca_diff" method (the first principal component of the pair differences,
    centred as scikit-learn's PCA centres, signed so positives project higher), written here:
    repeng 0.4 imports `np.float_` (removed in NumPy 2) and finds layers only in decoder LMs.
    Its unit direction is scaled by the mean difference's projection on it, so c = 1 moves the
    pairs' mean gap along it; applied like the mean difference.
  Both peers are fitted on exactly the training pairs the adapters train on.

Training objective (`pair_loss`), on the final mean-pooled representation h (the probes' input):
each row is one sentence of a pair and its sign s = ±1 (the negative sentence at +1, the positive
at −1), all rows in ONE forward with the coefficient tensor c = s. With d the unit mean pair
difference of the base (positive − negative) and Δ = h_c(x) − h_0(x):
    concept    ((Δ·d − (h_0(twin) − h_0(x))·d)²)    reach the twin along the concept direction
    coherence  ‖Δ − (Δ·d) d‖²                        change nothing outside it
both divided by the mean squared pair gap along d, summed with weight COHERENCE_WEIGHT.

Metrics (`evaluate_arm`), on the held-out sentences at COEFFS: the concept probe's mean logit
shift against c = 0 (monotonic: Spearman over c; symmetric: shift(−1) / −shift(+1)); the flip
rate at ±1 (of the sentences the probe calls negative at c = 0, the fraction it calls positive at
+1, and the reverse at −1); coherence: the number probe's accuracy and the relative drift outside
d, ‖Δ − (Δ·d) d‖ / ‖h_0‖ averaged over sentences. Equal coherence cost (`bisect`): per sign,
the c at which the reference sentences' drift outside d reaches DRIFT_BUDGET, and the flip rate
there ("equal_cost"); and, since the trained arms' loss penalises exactly that drift on other
sentences, a cost no arm trains on: the c at which the number probe's logits on the reference
sentences move by NUMBER_BUDGET of their mean magnitude (`readout_change`), and the flip rate
there ("equal_number"). An arm that stays under a budget up to C_MAX is scored at C_MAX. For scale, each run
also records the drift that swapping the concept word itself causes in its training pairs
(`pair_drift`, about 0.4 here: each antonym pair moves the representation its own way besides
along d). The budget, 0.1, is a fixed fraction well below that, chosen after a pilot run so that
the arms' flip rates at it are neither all 0 nor all 1; NAME_cost.png shows every budget.

Runs are appended to the JSON as they finish, so an interrupted grid resumes; a run's id is
`lora_bench.arms.run_id` with the arm's route ("via") as its knob.
"""

from __future__ import annotations

import argparse
import copy
import math
import random
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from . import adapters
from .arms import arm_id, run_id
from .common import environment, parse_list, read_json, write_json

# ---- data -------------------------------------------------------------------------------------

SUBJECTS = (("teacher", "teachers"), ("doctor", "doctors"), ("student", "students"), ("farmer", "farmers"),
            ("driver", "drivers"), ("nurse", "nurses"), ("chef", "chefs"), ("pilot", "pilots"),
            ("artist", "artists"), ("lawyer", "lawyers"), ("baker", "bakers"), ("child", "children"),
            ("woman", "women"), ("man", "men"), ("neighbour", "neighbours"), ("singer", "singers"))
ADJECTIVES = (("happy", "sad"), ("pleased", "upset"), ("delighted", "disappointed"), ("glad", "angry"),
              ("excited", "worried"), ("thrilled", "miserable"), ("grateful", "annoyed"),
              ("cheerful", "gloomy"), ("proud", "ashamed"), ("calm", "furious"), ("hopeful", "afraid"),
              ("relieved", "frustrated"))
ADVERBS = ("very", "quite", "really", "truly", "rather", "so")
OBJECTS = ("trip", "meeting", "weather", "results", "house", "dinner", "journey", "game", "concert", "visit",
           "exam", "holiday", "letter", "garden", "news", "film", "job", "market", "plan", "party", "school",
           "road", "team", "book")
HELD_OUT_OBJECTS = OBJECTS[-8:]  # no training, probe or pair sentence mentions these
PLACES = ("at the", "near the", "behind the", "inside the")
DAYS = ("on Monday", "in the morning", "last week", "after lunch", "at night", "on Sunday")
DATA_SEED = 1234  # probes, held-out and reference sentences: the same readout for every arm and seed


def sentence(subject: int, plural: int, adverb: int, adjective: int, positive: int, obj: str) -> str:
    noun = SUBJECTS[subject][plural]
    word = ADJECTIVES[adjective][1 - positive]
    return f"The {noun} {'were' if plural else 'was'} {ADVERBS[adverb]} {word} about the {obj}."


def pairs(n: int, seed: int, objects) -> list[tuple[str, str, int]]:
    """n contrastive pairs (positive sentence, negative twin, plural), number drawn independently."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s, p, a, j, o = (rng.randrange(len(SUBJECTS)), rng.randrange(2), rng.randrange(len(ADVERBS)),
                         rng.randrange(len(ADJECTIVES)), rng.choice(objects))
        out.append((sentence(s, p, a, j, 1, o), sentence(s, p, a, j, 0, o), p))
    return out


def labelled(n: int, seed: int, objects) -> list[tuple[str, int, int]]:
    """n separate sentences (text, positive, plural): one sentence of each drawn pair, balanced."""
    return [(pos if i % 2 else neg, i % 2, plural)
            for i, (pos, neg, plural) in enumerate(pairs(n, seed, objects))]


def neutral(n: int, seed: int) -> list[str]:
    """Reference sentences with no sentiment word (another template)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        noun = SUBJECTS[rng.randrange(len(SUBJECTS))][plural := rng.randrange(2)]
        out.append(f"The {noun} {'were' if plural else 'was'} {rng.choice(PLACES)} "
                   f"{rng.choice(OBJECTS)} {rng.choice(DAYS)}.")
    return out


def sentences(p: dict, seed: int) -> dict:
    """The seed's training pairs; the probes', held-out and reference sentences (DATA_SEED)."""
    train_objects = [o for o in OBJECTS if o not in HELD_OUT_OBJECTS]
    return {"pairs": pairs(p["n_pairs"], seed, train_objects),
            "probe": labelled(p["n_probe"], DATA_SEED, train_objects),
            "test": labelled(p["n_test"], DATA_SEED + 1, HELD_OUT_OBJECTS),
            "reference": neutral(p["n_ref"], DATA_SEED + 2)}


# ---- features and probes ------------------------------------------------------------------------

def pooled(model, tok, texts: list[str]) -> torch.Tensor:
    """Mean-pooled last hidden state, (len(texts), hidden): what the probes read."""
    from lora_lite.demo import mean_pool

    batch = tok(texts, padding=True, return_tensors="pt")
    return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


@torch.no_grad()
def features(model, tok, texts: list[str], batch_size: int = 128) -> torch.Tensor:
    return torch.cat([pooled(model, tok, texts[i: i + batch_size]) for i in range(0, len(texts), batch_size)])


class Probe:
    """A frozen linear readout w·h + b (logistic regression, L2, fitted by L-BFGS)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, iters: int = 200):
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        z = (x - self.mu) / self.sd
        w = torch.zeros(x.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float()) + l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = w.detach(), b.detach()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mu) / self.sd) @ self.w + self.b

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((self.logits(x) > 0).long() == y).float().mean())


# ---- metrics (plain functions of numbers: tests/test_steer.py checks them by hand) -------------

def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); nan when one side is constant."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx, sy = math.sqrt(sum((a - mx) ** 2 for a in rx)), math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def symmetry(shift_minus: float, shift_plus: float) -> float:
    """shift(−1) / −shift(+1): 1 when −1 undoes exactly what +1 does, 0 when −1 does nothing,
    < 0 when both signs push the same way."""
    return shift_minus / -shift_plus if shift_plus else float("nan")


def flip_rate(logit0: torch.Tensor, logit_c: torch.Tensor, sign: int) -> float:
    """Of the sentences the probe puts on the other side at c = 0 (negative for sign +1, positive
    for −1), the fraction it puts on the steered side at c."""
    start = logit0 <= 0 if sign > 0 else logit0 > 0
    if not start.any():
        return float("nan")
    end = logit_c > 0 if sign > 0 else logit_c <= 0
    return float((end & start).sum() / start.sum())


def drift(h0: torch.Tensor, h: torch.Tensor, d: torch.Tensor) -> float:
    """Mean over rows of ‖Δ − (Δ·d) d‖ / ‖h0‖, Δ = h − h0, d a unit vector: change outside d."""
    delta = h - h0
    perp = delta - (delta @ d)[:, None] * d
    return float((perp.norm(dim=1) / h0.norm(dim=1)).mean())


def readout_change(logit0: torch.Tensor, logit: torch.Tensor) -> float:
    """mean |logit − logit0| / mean |logit0|: how far a readout moved, in units of its margins."""
    return float((logit - logit0).abs().mean() / logit0.abs().mean())


def bisect(f, target: float, c_max: float, iters: int = 4) -> tuple[float, bool]:
    """(c, reached): where f, increasing in c from f(0) < target, crosses target, to within the
    bracket / 2^iters; (c_max, False) when f stays under target up to c_max. The bracket comes
    from doubling or halving c = 1, where most arms cross."""
    lo, hi = 0.0, min(1.0, c_max)
    if f(hi) < target:
        while f(hi) < target:
            if hi >= c_max:
                return c_max, False
            lo, hi = hi, min(2 * hi, c_max)
    else:
        for _ in range(30):
            if f(hi / 2) < target:
                break
            hi /= 2
        lo = hi / 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) < target else (lo, mid)
    return hi, True


def pair_drift(pos: torch.Tensor, neg: torch.Tensor, d: torch.Tensor) -> float:
    """The change outside d that swapping the concept word itself causes: `drift` from each
    sentence to its twin, averaged over both directions."""
    return (drift(neg, pos, d) + drift(pos, neg, d)) / 2


# ---- steering vectors ----------------------------------------------------------------------------

def block_matcher() -> dict:
    """steering-vectors' layer config for a BERT encoder: its blocks are encoder.layer.N."""
    return {"decoder_block": "encoder.layer.{num}"}


@torch.no_grad()
def block_outputs(model, tok, texts: list[str], layers, batch_size: int = 128) -> dict[int, torch.Tensor]:
    """{block: (len(texts), hidden) its output mean-pooled over each sentence's tokens}, recorded
    by steering-vectors' `record_activations`."""
    from steering_vectors import record_activations

    out: dict[int, list[torch.Tensor]] = {i: [] for i in layers}
    for i in range(0, len(texts), batch_size):
        batch = tok(texts[i: i + batch_size], padding=True, return_tensors="pt")
        m = batch["attention_mask"].unsqueeze(-1).float()
        with record_activations(model, "decoder_block", block_matcher(), layer_nums=list(layers)) as rec:
            model(**batch)
        for layer in layers:
            (act,) = rec[layer]
            out[layer].append((act * m).sum(1) / m.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def mean_difference(model, tok, pair_list, layers) -> dict[int, torch.Tensor]:
    """{block: mean over pairs of (positive − negative)}, steering-vectors' mean aggregator."""
    from steering_vectors import mean_aggregator

    pos = block_outputs(model, tok, [p for p, _, _ in pair_list], layers)
    neg = block_outputs(model, tok, [n for _, n, _ in pair_list], layers)
    agg = mean_aggregator()
    return {k: agg(pos[k], neg[k]) for k in layers}


def pca_direction(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """repeng's pca_diff: the first principal component of the centred differences, signed so
    that more pairs project higher on their positive side, scaled by the mean difference's
    projection on it (repeng's vectors are unit; c = 1 here moves the mean gap)."""
    diff = (pos - neg).double()
    _, _, vh = torch.linalg.svd(diff - diff.mean(0), full_matrices=False)
    u = vh[0]
    if ((pos.double() @ u) > (neg.double() @ u)).float().mean() < 0.5:
        u = -u
    return (u * (diff.mean(0) @ u)).float()


def pca_vectors(model, tok, pair_list, layers) -> dict[int, torch.Tensor]:
    pos = block_outputs(model, tok, [p for p, _, _ in pair_list], layers)
    neg = block_outputs(model, tok, [n for _, n, _ in pair_list], layers)
    return {k: pca_direction(pos[k], neg[k]) for k in layers}


PEERS = {"mean-diff": mean_difference, "pca": pca_vectors}


# ---- arms -----------------------------------------------------------------------------------------

LAYERS = (1, 2, 3)  # MiniLM has 6 blocks; the readout pools block 5's output
TARGETS = (r"^encoder\.layer\.[123]\.",)
RANK = 8
COEFFS = (-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0)
COHERENCE_WEIGHT = 1.0
DRIFT_BUDGET = 0.1
NUMBER_BUDGET = 0.1  # about what swapping the sentiment word itself moves it (0.09 on seed 0)
C_MAX = 16.0
# one lr per lr family for the pair loss (30 steps of 12 rows), set in advance and not tuned: a
# few times the classification benchmarks' lrs, as the budget is short; a family without one
# takes the middle of its variant's declared grid (BenchSetting.lrs)
LRS = read_json(Path(__file__).resolve().parents[1] / "results" / "steer_lrs.json")


def arms(quick: bool = False) -> list[dict]:
    """Every arm: {"row", "via"}: each variant through "scaled" and, with a run-time coeff,
    through "coeff"; PEFT LoRA ("peft"); the two steering-vector peers ("vector")."""
    from lora_lite.variant import REGISTRY

    names = list(REGISTRY)
    if quick:  # the first variant, and the first with a run-time coeff (both routes)
        names = [names[0], next(n for n in names if "coeff" in REGISTRY[n].runtime_fields)]
    out = []
    for name in names:
        out.append({"row": name, "via": "scaled"})
        if "coeff" in REGISTRY[name].runtime_fields:
            out.append({"row": name, "via": "coeff"})
    if not quick:
        out.append({"row": "peft:lora", "via": "peft"})
    return out + [{"row": peer, "via": "vector"} for peer in PEERS]


def label(row: str, via: str) -> str:
    return f"{row} (coeff)" if via == "coeff" else row


def spec(arm: dict, seed: int, steps: int) -> dict:
    trained = arm["via"] != "vector"
    setting = adapters.settings()[arm["row"].removeprefix("peft:")] if trained else None
    lr = LRS.get(setting.family, setting.lrs[len(setting.lrs) // 2]) if trained else 0.0
    return {"row": arm["row"], "knobs": {"via": arm["via"]}, "seed": seed, "lr": lr,
            "steps": steps if trained else 0, "schedule": "constant", "warmup_steps": 0}


def _peft_layers(model):
    return [m for m in model.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict) and m.scaling]


@contextmanager
def steered(model, via: str, c, vectors=None):
    """Run `model` at coefficient c (a float, or a (batch,) tensor for the trained arms)."""
    import lora_lite as ll

    if via == "scaled":
        with ll.scaled(model, c):
            yield
    elif via == "coeff":
        ll.reconfigure(model, coeff=c)
        try:
            yield
        finally:
            ll.reconfigure(model, coeff=1.0)
    elif via == "peft":
        layers = _peft_layers(model)
        saved = [dict(m.scaling) for m in layers]
        factor = c.view(-1, 1, 1) if torch.is_tensor(c) else c
        for m in layers:
            for k in m.scaling:
                m.scaling[k] = m.scaling[k] * factor
        try:
            yield
        finally:
            for m, s in zip(layers, saved):
                m.scaling.clear()
                m.scaling.update(s)
    else:
        from steering_vectors import SteeringVector

        handle = SteeringVector(vectors, "decoder_block").patch_activations(
            model, layer_config=block_matcher(), multiplier=float(c))
        try:
            yield
        finally:
            handle.remove()


def signed_forward(model, tok, texts: list[str], signs: torch.Tensor, via: str) -> torch.Tensor:
    """Pooled features of `texts`, row i at coefficient signs[i], in one forward through a
    (batch,) coefficient tensor."""
    with steered(model, via, signs):
        return pooled(model, tok, texts)


def pair_loss(h: torch.Tensor, h0: torch.Tensor, h0_twin: torch.Tensor, d: torch.Tensor,
              weight: float = COHERENCE_WEIGHT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, concept, coherence): reach the twin along d, change nothing outside d; both in
    units of the batch's mean squared pair gap along d."""
    delta = h - h0
    along = delta @ d
    gap = (h0_twin - h0) @ d
    unit = gap.square().mean()
    concept = (along - gap).square().mean() / unit
    coherence = (delta - along[:, None] * d).square().sum(1).mean() / unit
    return concept + weight * coherence, concept, coherence


def prepare(arm_spec: dict, encoder, tok, data: dict) -> int:
    """Attach the arm's adapter to `encoder` (a copy of the base); returns its trainables."""
    from lora_lite.interop.peft import copy_to_peft

    row = arm_spec["row"]
    name = row.removeprefix("peft:")
    cfg = adapters.make_config(name, RANK, TARGETS, adapters.geometry(encoder, TARGETS))
    texts = [t for p in data["pairs"][:64] for t in p[:2]]
    calibration = [dict(tok(texts[i: i + 32], padding=True, return_tensors="pt")) for i in range(0, len(texts), 32)]
    if row.startswith("peft:"):
        ours = copy.deepcopy(encoder)
        adapters.attach_ours(ours, cfg, calibration)
        pm = adapters.attach_peft(encoder, adapters.peft_method(name), cfg, adapters.target_names(encoder, cfg),
                                  calibration)
        copy_to_peft(ours, pm)  # the same initial tensors as our row of the method
    else:
        adapters.attach_ours(encoder, cfg, calibration)
    return sum(p.numel() for p in encoder.parameters() if p.requires_grad)


def train(encoder, tok, data: dict, h0: dict, d: torch.Tensor, arm_spec: dict, batch_size: int) -> list[float]:
    """AdamW at the arm's lr; each batch: pairs drawn with the seed's generator, the first half
    as negative sentences at +1, the rest as positive sentences at −1, one forward."""
    via = arm_spec["knobs"]["via"]
    params = [p for p in encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=arm_spec["lr"], weight_decay=0.0)
    rng = torch.Generator().manual_seed(arm_spec["seed"])
    signs = torch.tensor([1.0] * (batch_size // 2) + [-1.0] * (batch_size - batch_size // 2))
    losses = []
    encoder.train()
    for _ in range(arm_spec["steps"]):
        idx = torch.randint(len(data["pairs"]), (batch_size,), generator=rng)
        # +1 rows start from the negative sentence (column 1), −1 rows from the positive (column 0)
        src = [(int(i), 1 if s > 0 else 0) for i, s in zip(idx, signs)]
        texts = [data["pairs"][i][k] for i, k in src]
        x0 = torch.stack([h0[k][i] for i, k in src])
        twin = torch.stack([h0[1 - k][i] for i, k in src])
        h = signed_forward(encoder, tok, texts, signs, via)
        loss, _, _ = pair_loss(h, x0, twin, d)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(round(loss.item(), 4))
    encoder.eval()
    return losses


def evaluate_arm(encoder, tok, data: dict, probes: dict, d: torch.Tensor, via: str, vectors=None) -> dict:
    """Every metric of the module docstring for one steered encoder."""
    test_texts = [t for t, _, _ in data["test"]]
    plural = torch.tensor([p for _, _, p in data["test"]])
    h0_test, h0_ref = probes["h0_test"], probes["h0_ref"]

    def at(c, texts):
        with steered(encoder, via, c, vectors):
            return features(encoder, tok, texts)

    logit0 = probes["concept"].logits(h0_test)
    number0 = probes["number"].logits(h0_test)
    per_c = {"shift": [], "flip_c": [], "number_acc": [], "number_change": [], "drift": []}
    logits = {}
    for c in COEFFS:
        h = h0_test if c == 0 else at(c, test_texts)
        logits[c] = probes["concept"].logits(h)
        per_c["shift"].append(float((logits[c] - logit0).mean()))
        per_c["flip_c"].append(0.0 if c == 0 else flip_rate(logit0, logits[c], 1 if c > 0 else -1))
        per_c["number_acc"].append(probes["number"].accuracy(h, plural))
        per_c["number_change"].append(readout_change(number0, probes["number"].logits(h)))
        per_c["drift"].append(drift(h0_test, h, d))
    out = {"coeffs": list(COEFFS), **per_c,
           "spearman": spearman(list(COEFFS), per_c["shift"]),
           "symmetry": symmetry(per_c["shift"][COEFFS.index(-1.0)], per_c["shift"][COEFFS.index(1.0)]),
           "flip": {"+1": flip_rate(logit0, logits[1.0], 1), "-1": flip_rate(logit0, logits[-1.0], -1)}}
    ref: dict[float, torch.Tensor] = {}

    def ref_at(c):  # the two costs' bisections share forwards where their c's meet
        if c not in ref:
            ref[c] = at(c, data["reference"])
        return ref[c]

    number_ref0 = probes["number"].logits(h0_ref)
    costs = {"equal_cost": (lambda h: drift(h0_ref, h, d), DRIFT_BUDGET),
             "equal_number": (lambda h: readout_change(number_ref0, probes["number"].logits(h)), NUMBER_BUDGET)}
    for name, (cost, budget) in costs.items():
        equal = {}
        for sign, key in ((1, "+"), (-1, "-")):
            c, reached = bisect(lambda c: cost(ref_at(sign * c)), budget, C_MAX)
            h = at(sign * c, test_texts)
            equal[key] = {"c": round(sign * c, 4), "reached": reached,
                          "flip": flip_rate(logit0, probes["concept"].logits(h), sign),
                          "number_acc": probes["number"].accuracy(h, plural)}
        out[name] = {"budget": budget, **equal}
    return out


def readouts(base, tok, data: dict) -> dict:
    """The frozen probes on the base model and the base features the metrics compare with."""
    x = features(base, tok, [t for t, _, _ in data["probe"]])
    concept = Probe(x, torch.tensor([y for _, y, _ in data["probe"]]))
    number = Probe(x, torch.tensor([p for _, _, p in data["probe"]]))
    h0_test = features(base, tok, [t for t, _, _ in data["test"]])
    test_y = torch.tensor([y for _, y, _ in data["test"]])
    test_p = torch.tensor([p for _, _, p in data["test"]])
    return {"concept": concept, "number": number, "h0_test": h0_test,
            "h0_ref": features(base, tok, data["reference"]),
            "acc": {"concept": concept.accuracy(h0_test, test_y), "number": number.accuracy(h0_test, test_p)}}


def run_one(base, arm_spec: dict, p: dict) -> dict:
    """One arm at one seed: fit (peers) or train (adapters) on the seed's pairs, then evaluate."""
    encoder0, tok = base
    data = sentences(p, arm_spec["seed"])
    probes = readouts(encoder0, tok, data)
    pos = features(encoder0, tok, [q for q, _, _ in data["pairs"]])
    neg = features(encoder0, tok, [n for _, n, _ in data["pairs"]])
    d = torch.nn.functional.normalize((pos - neg).mean(0), dim=0)
    via, row = arm_spec["knobs"]["via"], arm_spec["row"]
    torch.manual_seed(arm_spec["seed"])
    t0 = time.perf_counter()
    losses, vectors = [], None
    if via == "vector":
        encoder, params = encoder0, 0
        vectors = PEERS[row](encoder, tok, data["pairs"], LAYERS)
    else:
        encoder = copy.deepcopy(encoder0)
        params = prepare(arm_spec, encoder, tok, data)
        losses = train(encoder, tok, data, {0: pos, 1: neg}, d, arm_spec, p["batch_size"])
    secs = time.perf_counter() - t0
    encoder.eval()
    out = {"row": row, "knobs": arm_spec["knobs"], "seed": arm_spec["seed"], "lr": arm_spec["lr"],
           "steps": arm_spec["steps"], "schedule": "constant", "warmup_steps": 0, "params": params,
           "vector_params": sum(v.numel() for v in vectors.values()) if vectors else 0,
           "train_s": round(secs, 2), "loss": losses, "probe_acc": probes["acc"],
           "pair_drift": pair_drift(pos, neg, d), **evaluate_arm(encoder, tok, data, probes, d, via, vectors)}
    out["eval_s"] = round(time.perf_counter() - t0 - secs, 2)
    out["id"] = run_id(out)
    return out


def _worker_run(s: dict, p: dict) -> dict:
    from .quality import _WORKER

    return run_one(_WORKER["base"], s, p)


# ---- CLI ------------------------------------------------------------------------------------------

PROTOCOL_KEYS = ("batch_size", "n_pairs", "n_probe", "n_test", "n_ref", "rank", "layers", "drift_budget",
                 "number_budget",
                 "coherence_weight", "coeffs")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_bench steer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", help="comma-separated arms' rows (variant names, peft:lora, mean-diff, pca)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, help="optimizer steps (default 30; --quick: 3)")
    ap.add_argument("--batch-size", type=int, default=12, help="rows per batch, half at +1, half at −1")
    ap.add_argument("--n-pairs", type=int, default=256)
    ap.add_argument("--n-probe", type=int, default=512)
    ap.add_argument("--n-test", type=int, default=48)
    ap.add_argument("--n-ref", type=int, default=16)
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel worker processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--name", help="JSON file stem under --out (default steer; --quick: steer_quick)")
    ap.add_argument("--out", default="results")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 variants (3 arms), the peers, 1 seed, 3 steps")
    ap.add_argument("--fresh", action="store_true", help="ignore runs already in the JSON")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds = "0" if a.seeds == "0,1,2" else a.seeds
        a.steps, a.n_pairs, a.n_probe = a.steps or 3, min(a.n_pairs, 32), min(a.n_probe, 128)
        a.n_test, a.n_ref, a.batch_size = min(a.n_test, 32), min(a.n_ref, 16), min(a.batch_size, 8)
    a.steps = a.steps or 30
    seeds = [int(s) for s in parse_list(a.seeds) or []]
    p = {"batch_size": a.batch_size, "n_pairs": a.n_pairs, "n_probe": a.n_probe, "n_test": a.n_test,
         "n_ref": a.n_ref, "rank": RANK, "layers": list(LAYERS), "drift_budget": DRIFT_BUDGET,
         "number_budget": NUMBER_BUDGET,
         "coherence_weight": COHERENCE_WEIGHT, "coeffs": list(COEFFS)}
    every = arms(a.quick)
    wanted = parse_list(a.rows)
    if wanted:
        unknown = sorted(set(wanted) - {x["row"] for x in every})
        if unknown:
            known = ", ".join(dict.fromkeys(x["row"] for x in every))
            ap.error(f"--rows {','.join(unknown)}: not an arm; arms: {known}")
        every = [x for x in every if x["row"] in wanted]

    out = Path(a.out)
    name = a.name or ("steer_quick" if a.quick else "steer")
    path = out / f"{name}.json"
    old = None if a.fresh else read_json(path)
    same = old and {k: v for k, v in old.get("protocol", {}).items() if k in PROTOCOL_KEYS} == p
    data = old if same else {"runs": []}
    data.update(bench="steer", protocol=p, env=environment(), jobs=a.jobs, threads_per_job=a.threads)
    order = [arm_id(s["row"], s["knobs"], s["lr"], s["steps"]) for s in (spec(x, 0, a.steps) for x in every)]
    data["arms"] = list(dict.fromkeys([*data.get("arms", []), *order]))
    done = {run_id(r) for r in data["runs"]}
    # seed-major: an interrupted grid has every arm on its first seeds; the cheap peers first
    todo = [s for seed in seeds for x in sorted(every, key=lambda x: x["via"] != "vector")
            if run_id(s := spec(x, seed, a.steps)) not in done]
    print(f"{len(every)} arms, {len(todo)} runs to do", flush=True)

    def finished(i, res):
        data["runs"].append(res)
        write_json(path, data)
        print(f"[{i}/{len(todo)}] {label(res['row'], res['knobs']['via']):24s} seed {res['seed']}: "
              f"flip ±1 {res['flip']['+1']:.2f}/{res['flip']['-1']:.2f}, rho {res['spearman']:.2f}, "
              f"sym {res['symmetry']:.2f}, equal-cost flip {res['equal_cost']['+']['flip']:.2f}/"
              f"{res['equal_cost']['-']['flip']:.2f} ({res['train_s']:.0f}+{res['eval_s']:.0f} s)", flush=True)

    from . import quality

    t0 = time.perf_counter()
    if a.jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn"), initializer=quality._worker_init,
                                 initargs=(a.threads,)) as pool:
            futures = [pool.submit(_worker_run, s, p) for s in todo]
            for i, f in enumerate(as_completed(futures), 1):
                finished(i, f.result())
    elif todo:
        quality._worker_init(a.threads)
        for i, s in enumerate(todo, 1):
            finished(i, _worker_run(s, p))
    write_json(path, data)
    print(f"done in {time.perf_counter() - t0:.0f} s; {path}", flush=True)
    from .steer_report import write_steer_file

    write_steer_file(out, name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
