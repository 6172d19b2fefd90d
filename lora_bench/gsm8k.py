"""C3: MetaMathQA -> GSM8K, the seed benchmark protocol (SPEC B6.1), for a GPU machine with
access to the Hugging Face hub.

    python -m lora_bench gsm8k --variant lora                          # Qwen/Qwen3.5-0.8B-Base, bf16
    python -m lora_bench gsm8k --variant pissa --steps 2500 --batch-size 4 --grad-accum 2
    python -m lora_bench gsm8k --tiny --train-file M.jsonl --test-file G.jsonl --steps 2   # offline smoke

Data: MetaMathQA train (shuffled, seed 0) for training; the first 50 rows of the shuffled
GSM8K train split for validation; the 1319 GSM8K test rows for test. `--train-file` /
`--test-file` read local JSONL rows in the same formats ({"query", "response"} and
{"question", "answer"}) instead (the test file then serves as both valid and test).

Training text = prompt + " " + response + eos with prompt = "Question: {query} Think step by
step.\\nAnswer:". The prompt and the response are tokenized separately and concatenated, so
the prompt tokens the model is trained on are exactly the ones it is prompted with at test
time; prompt tokens are labelled -100. Sequences are cut at --max-seq-length (768); examples
whose prompt alone reaches it are skipped; an example without a supervised token is an error.
AdamW (weight decay 0.1) over the adapter, cosine decay to 0 without warmup, gradient clipping
at 1.0, `--grad-accum` micro-batches per update with every micro-loss divided by it. Batches
are left-padded with pad = eos. Evaluation: greedy decoding (max 300 new tokens), answer =
the last number in the text after the last "####" (or in the whole text if there is none),
commas dropped, a trailing "." stripped; exact string match with the reference extracted the
same way. So "3.50" does not match "3.5" and "+5" does not match "5": the protocol compares
strings, which keeps the numbers comparable with the seed's published results (GSM8K
references are integers).

Cost columns: trainable params, analytic added MACs/token, forward and forward+backward ms on
the first batch (median of 10 after 3 warmups; CUDA events on a GPU), attach+init seconds,
peak memory (torch.cuda.max_memory_allocated over training and evaluation on a GPU, else the
process's ru_maxrss). Sanity checks: only lora_* tensors train, the first adapter gradient is
finite and nonzero, no base parameter gets a gradient, the adapter moved, and the saved
adapter reloaded onto a fresh base reproduces the trained model's logits.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import resource
import statistics
import time
from pathlib import Path

import torch

from . import adapters
from .common import environment, read_json, write_json

PROMPT = "Question: {query} Think step by step.\nAnswer:"
NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
# SPEC B6.1's lr per family and calibration batches per variant (data, not code)
PROTOCOL = Path(__file__).resolve().parents[1] / "results" / "gsm8k_protocol.json"


# ---- scoring -----------------------------------------------------------------------------------

def extract_answer(text: str) -> str | None:
    """The last number after the last '####' (or in the whole text), commas dropped, a trailing
    '.' stripped; None if there is no number."""
    numbers = NUMBER.findall(text.rsplit("####", 1)[-1])
    if not numbers:
        return None
    return numbers[-1].replace(",", "").rstrip(".")


def is_correct(prediction: str, reference: str) -> bool:
    """Exact string match of the extracted answers; a prediction without a number is wrong."""
    pred, ref = extract_answer(prediction), extract_answer(reference)
    return pred is not None and pred == ref


# ---- data --------------------------------------------------------------------------------------

def encode(tok, query: str, response: str, max_len: int) -> dict | None:
    """input_ids / labels for one training example; None if the prompt alone is too long."""
    prompt = tok(PROMPT.format(query=query))["input_ids"]
    if len(prompt) >= max_len:
        return None
    answer = tok(" " + response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (prompt + answer)[:max_len]
    labels = ([-100] * len(prompt) + answer)[:max_len]
    if all(t == -100 for t in labels):
        raise ValueError(f"example without a supervised token: {query[:60]!r}")
    return {"input_ids": ids, "labels": labels}


def left_pad(rows: list[dict], pad_id: int) -> dict:
    """Left-pad lists of ids (and labels, with -100) into tensors with an attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": [], "attention_mask": []}
    if "labels" in rows[0]:
        out["labels"] = []
    for r in rows:
        n = width - len(r["input_ids"])
        out["input_ids"].append([pad_id] * n + r["input_ids"])
        out["attention_mask"].append([0] * n + [1] * len(r["input_ids"]))
        if "labels" in out:
            out["labels"].append([-100] * n + r["labels"])
    return {k: torch.tensor(v) for k, v in out.items()}


def training_batches(tok, rows: list[dict], batch_size: int, max_len: int, device):
    """Endless left-padded batches over the encoded rows, in order (rows are pre-shuffled)."""
    encoded = [e for e in (encode(tok, r["query"], r["response"], max_len) for r in rows) if e]
    if not encoded:
        raise ValueError("no training example fits max_seq_length")
    i = 0
    while True:
        chunk = [encoded[(i + j) % len(encoded)] for j in range(batch_size)]
        i += batch_size
        yield {k: v.to(device) for k, v in left_pad(chunk, tok.pad_token_id).items()}


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_data(a) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, valid, test) rows: local JSONL files, or the hub datasets (needs `datasets`)."""
    if a.train_file:
        test = read_jsonl(a.test_file)
        return read_jsonl(a.train_file), test[: a.n_valid], test[: a.n_test or None]
    from datasets import load_dataset

    train = load_dataset("meta-math/MetaMathQA", split="train").shuffle(seed=0)
    gsm = load_dataset("openai/gsm8k", "main")
    valid = gsm["train"].shuffle(seed=0).select(range(a.n_valid))
    test = gsm["test"] if not a.n_test else gsm["test"].select(range(a.n_test))
    n_train = a.steps * a.batch_size * a.grad_accum
    return list(train.select(range(min(n_train, len(train))))), list(valid), list(test)


# ---- models ------------------------------------------------------------------------------------

def byte_tokenizer():
    """A byte-level tokenizer built in memory (256 bytes + <eos>), for offline smoke runs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")


def load_model(a):
    """(model, tokenizer); pad = eos, left padding, use_cache off for training."""
    if a.tiny:
        from .models import qwen_like

        tok = byte_tokenizer()
        model = qwen_like(layers=2, vocab=len(tok), tiny=True, seed=a.seed)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(a.model)
        kw = {}
        if a.load_in_4bit or a.load_in_8bit:
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=a.load_in_4bit,
                                                           load_in_8bit=a.load_in_8bit)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=getattr(torch, a.dtype), **kw)
    tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    model.config.use_cache = False
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device) if not (a.load_in_4bit or a.load_in_8bit) else model, tok


# ---- training and evaluation -------------------------------------------------------------------

def _timer(device):
    if device.type == "cuda":
        def measure(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
    else:
        def measure(fn):
            t0 = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t0)
    return measure


def step_cost(model, batch, repeats: int = 10, warmup: int = 3) -> tuple[float, float]:
    """Median forward ms (no grad) and forward+backward ms on one batch."""
    measure = _timer(batch["input_ids"].device)

    def fwd():
        with torch.no_grad():
            model(**batch)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()

    out = []
    for fn in (fwd, fwd_bwd):
        times = [measure(fn) for _ in range(warmup + repeats)][warmup:]
        out.append(statistics.median(times))
    model.zero_grad(set_to_none=True)
    return out[0], out[1]


def train(model, batches, *, steps: int, grad_accum: int, lr: float, log_every: int = 50) -> dict:
    """AdamW (wd 0.1), cosine to 0, no warmup, clip 1.0; asserts the sanity checks."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    bad = [n for n in named if ".lora_" not in n]
    if bad:
        raise AssertionError(f"non-adapter parameters are trainable: {bad[:3]}")
    start = {n: p.detach().clone() for n, p in named.items()}
    opt = torch.optim.AdamW(named.values(), lr=lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    losses = []
    for step in range(steps):
        total = 0.0
        for _ in range(grad_accum):
            loss = model(**next(batches)).loss / grad_accum
            loss.backward()
            total += float(loss.detach())
        if step == 0:
            norm = torch.norm(torch.stack([p.grad.norm() for p in named.values() if p.grad is not None]))
            if not (torch.isfinite(norm) and norm > 0):
                raise AssertionError(f"first adapter gradient norm is {float(norm)}")
            leaks = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
            if leaks:
                raise AssertionError(f"base parameters received gradients: {leaks[:3]}")
        torch.nn.utils.clip_grad_norm_(named.values(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {statistics.fmean(losses[-log_every:]):.4f}", flush=True)
    moved = sum(float((p.detach() - start[n]).norm()) for n, p in named.items())
    if not moved > 0:
        raise AssertionError("the adapter did not move during training")
    return {"first_loss": losses[0], "last_loss": losses[-1], "adapter_moved": moved}


@torch.no_grad()
def generate(model, tok, questions: list[str], *, batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy completions of the prompts, left-padded batches."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(questions), batch_size):
        rows = [{"input_ids": tok(PROMPT.format(query=q))["input_ids"]} for q in questions[i: i + batch_size]]
        batch = {k: v.to(device) for k, v in left_pad(rows, tok.pad_token_id).items()}
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out += tok.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    model.train()
    return out


def score(model, tok, rows: list[dict], a) -> dict:
    preds = generate(model, tok, [r["question"] for r in rows], batch_size=a.eval_batch_size,
                     max_new_tokens=a.max_new_tokens)
    correct = [is_correct(p, r["answer"]) for p, r in zip(preds, rows)]
    return {"accuracy": sum(correct) / max(len(rows), 1), "n": len(rows),
            "examples": [{"prediction": p, "reference": extract_answer(r["answer"]), "correct": c}
                         for p, r, c in list(zip(preds, rows, correct))[:5]]}


def peak_memory() -> dict:
    if torch.cuda.is_available():
        return {"peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "peak_mem_kind": "cuda allocated"}
    return {"peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "peak_mem_kind": "process ru_maxrss"}


def run(a) -> dict:
    import lora_lite as ll

    torch.manual_seed(a.seed)
    model, tok = load_model(a)
    pristine = copy.deepcopy(model) if a.tiny else None  # hub models are re-loaded for the check
    device = next(model.parameters()).device
    train_rows, valid_rows, test_rows = load_data(a)
    batches = training_batches(tok, train_rows, a.batch_size, a.max_seq_length, device)

    targets = (a.target_name,)
    cfg = adapters.make_config(a.variant, a.rank, targets, adapters.geometry(model, targets))
    if a.set:
        cfg = ll.AdapterConfig.from_dict({**cfg.to_dict(), **{k: json.loads(v) for k, v in
                                                              (s.split("=", 1) for s in a.set)}})
    kind, required = ll.REGISTRY[cfg.variant].calibration_needs(cfg)
    calibration = None
    if required or (a.calibrate_optional and kind):
        proto = read_json(PROTOCOL)
        n = proto["calibration_batches"].get(a.variant, proto["default_calibration_batches"])
        calibration = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in
                       (next(batches) for _ in range(n))]
        batches = training_batches(tok, train_rows, a.batch_size, a.max_seq_length, device)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    ll.attach(model, cfg, calibration_data=calibration, progress=not a.tiny)
    init_s = time.perf_counter() - t0

    first = next(batches)
    fwd_ms, fwd_bwd_ms = step_cost(model, first, repeats=a.cost_repeats, warmup=min(3, a.cost_repeats))
    per_token, _ = adapters.added_macs(a.variant, cfg, ll.runtime.state_of(model).targets.values())
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{a.variant}: {params:,} trainable params, +{per_token:,} MACs/token, "
          f"fwd {fwd_ms:.1f} ms, fwd+bwd {fwd_bwd_ms:.1f} ms, init {init_s:.2f} s", flush=True)

    proto = read_json(PROTOCOL)
    lr = a.lr or proto["lr_by_family"].get(adapters.settings()[a.variant].family, proto["default_lr"])
    t0 = time.perf_counter()
    stats = train(model, batches, steps=a.steps, grad_accum=a.grad_accum, lr=lr, log_every=a.log_every)
    train_s = time.perf_counter() - t0

    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_id = f"{a.variant}_r{getattr(cfg, 'r', 0)}_lr{lr:g}_s{a.steps}_seed{a.seed}"
    ckpt = out_dir / f"gsm8k_{run_id}.safetensors"
    ll.save(model, ckpt)
    fresh = pristine if pristine is not None else load_model(a)[0]
    ll.load(fresh, ckpt)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        y, y2 = model(**first).logits.float(), fresh(**first).logits.float()
    reload_err = float((y2 - y).abs().max() / y.abs().max())
    if reload_err > a.reload_tol:
        raise AssertionError(f"reloaded adapter differs: {reload_err:.2e} > {a.reload_tol}")
    del fresh
    model.train()

    valid = score(model, tok, valid_rows, a)
    test = score(model, tok, test_rows, a)
    result = {
        "run_id": run_id, "variant": a.variant, "config": cfg.to_dict(), "model": "tiny" if a.tiny else a.model,
        "lr": lr, "steps": a.steps, "batch_size": a.batch_size, "grad_accum": a.grad_accum,
        "max_seq_length": a.max_seq_length, "seed": a.seed,
        "valid_acc": valid["accuracy"], "test_acc": test["accuracy"], "n_valid": valid["n"], "n_test": test["n"],
        "params": params, "macs_per_token": per_token, "fwd_ms": fwd_ms, "fwd_bwd_ms": fwd_bwd_ms,
        "init_s": init_s, "train_s": train_s, **peak_memory(), **stats, "reload_err": reload_err,
        "examples": test["examples"], "env": environment(),
    }
    write_json(out_dir / f"gsm8k_{run_id}.json", result)
    print(f"{a.variant}: GSM8K test {100 * test['accuracy']:.1f}% (valid {100 * valid['accuracy']:.1f}%), "
          f"results in {out_dir}", flush=True)
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m lora_bench gsm8k", description=__doc__.split("\n\n")[0])
    ap.add_argument("--variant", default="lora")
    ap.add_argument("--model", default="Qwen/Qwen3.5-0.8B-Base", help="SPEC B6.1 default; the older seed README used Qwen/Qwen3-0.6B-Base")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--load-in-4bit", action="store_true")
    ap.add_argument("--load-in-8bit", action="store_true")
    ap.add_argument("--rank", type=int, default=32, help="r (alpha = 2r; pissa alpha = r; SVD family r = 256)")
    ap.add_argument("--target-name", default=r"(q_proj|v_proj)$")
    ap.add_argument("--set", nargs="*", metavar="FIELD=JSON", help="config overrides, e.g. lambda0=0.1")
    ap.add_argument("--calibrate-optional", action="store_true",
                    help="also give calibration batches to variants for which they are optional")
    ap.add_argument("--lr", type=float, help="default: 1e-4; SVD family 5e-3; delora 1e-3; ia3/road 5e-3")
    ap.add_argument("--steps", type=int, default=5000, help="optimizer updates")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--max-seq-length", type=int, default=768)
    ap.add_argument("--n-valid", type=int, default=50)
    ap.add_argument("--n-test", type=int, default=0, help="0 = all 1319")
    ap.add_argument("--eval-batch-size", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=300)
    ap.add_argument("--cost-repeats", type=int, default=10, help="timed repeats (after 3 warmups)")
    ap.add_argument("--reload-tol", type=float, default=2e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--out", default="results/gsm8k")
    ap.add_argument("--tiny", action="store_true", help="random toy Qwen3 + byte tokenizer (offline)")
    ap.add_argument("--train-file", help="local MetaMathQA-format JSONL instead of the hub")
    ap.add_argument("--test-file", help="local GSM8K-format JSONL instead of the hub")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if bool(a.train_file) != bool(a.test_file):
        raise SystemExit("--train-file and --test-file go together")
    run(a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
