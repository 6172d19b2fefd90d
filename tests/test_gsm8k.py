"""The MetaMathQA -> GSM8K harness, offline: answer extraction and scoring on tricky strings,
label masking and left padding, and the whole pipeline on a toy random decoder with the
GSM8K-format rows in tests/data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_bench import gsm8k

pytestmark = pytest.mark.slow  # the C3 harness on a tiny decoder

DATA = Path(__file__).resolve().parent / "data"


@pytest.mark.parametrize("text, expected", [
    ("She sells 96 - 15 = 81 rolls.\n#### 81", "81"),
    ("#### 1,234", "1234"),                      # thousands separators are dropped
    ("so 1,250 - 375 = 875\n#### 875.", "875"),  # trailing period
    ("The answer is 42.", "42"),                 # no ####: the last number of the whole text
    ("#### -7", "-7"),                           # negatives keep their sign
    ("#### +5", "+5"),
    ("it costs $3.50", "3.50"),                  # decimals are kept as written
    ("#### 12,345.25 dollars", "12345.25"),
    ("first 10 #### then 20 and 30", "30"),      # after the last ####, the last number
    ("#### 7 #### eight", None),                 # nothing after the last #### -> no answer
    ("I do not know", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert gsm8k.extract_answer(text) == expected


@pytest.mark.parametrize("prediction, reference, correct", [
    ("... so 1,234 in total.", "#### 1234", True),
    ("The answer is 81.", "x\n#### 81", True),
    ("#### -7", "#### -7", True),
    ("#### 7", "#### -7", False),
    ("#### 3.50", "#### 3.5", False),   # string match, as in the seed protocol
    ("#### +5", "#### 5", False),
    ("no number here", "#### 5", False),
])
def test_is_correct(prediction, reference, correct):
    assert gsm8k.is_correct(prediction, reference) is correct


@pytest.fixture(scope="module")
def tok():
    return gsm8k.byte_tokenizer()


def test_encode_masks_the_prompt_and_appends_eos(tok):
    ex = gsm8k.encode(tok, "What is 2+2?", "4", max_len=768)
    prompt = tok(gsm8k.PROMPT.format(query="What is 2+2?"))["input_ids"]
    assert ex["input_ids"][: len(prompt)] == prompt
    assert ex["labels"][: len(prompt)] == [-100] * len(prompt)
    assert ex["labels"][len(prompt):] == ex["input_ids"][len(prompt):]
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][len(prompt):-1]) == " 4"


def test_encode_truncates_and_skips_over_long_prompts(tok):
    prompt_len = len(tok(gsm8k.PROMPT.format(query="q"))["input_ids"])
    ex = gsm8k.encode(tok, "q", "a long answer " * 10, max_len=prompt_len + 3)
    assert len(ex["input_ids"]) == prompt_len + 3 and sum(t != -100 for t in ex["labels"]) == 3
    assert gsm8k.encode(tok, "q", "a", max_len=prompt_len) is None


def test_left_pad(tok):
    batch = gsm8k.left_pad([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                            {"input_ids": [8], "labels": [8]}], pad_id=tok.pad_token_id)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [tok.pad_token_id] * 2 + [8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]


@pytest.mark.parametrize("variant", ["lora", "pissa"])
def test_offline_pipeline_on_a_toy_decoder(tmp_path, variant, one_thread):
    args = ["--tiny", "--variant", variant, "--train-file", str(DATA / "metamath_sample.jsonl"),
            "--test-file", str(DATA / "gsm8k_sample.jsonl"), "--steps", "2", "--batch-size", "2",
            "--grad-accum", "2", "--max-new-tokens", "4", "--eval-batch-size", "4",
            "--cost-repeats", "1", "--rank", "4", "--lr", "1e-3", "--out", str(tmp_path)]
    res = gsm8k.run(gsm8k.parser().parse_args(args))
    (path,) = tmp_path.glob("gsm8k_*.json")
    saved = json.loads(path.read_text())
    assert saved["test_acc"] == res["test_acc"] and 0 <= res["test_acc"] <= 1
    assert res["n_test"] == 6 and res["n_valid"] == 6
    assert res["params"] > 0 and res["macs_per_token"] > 0 and res["fwd_ms"] > 0
    assert res["adapter_moved"] > 0 and res["reload_err"] <= 1e-5
    assert {"prediction", "reference", "correct"} <= set(res["examples"][0])
