"""The demo's training loop: the head and the adapter each step at their own lr."""

from __future__ import annotations

import pytest
import torch

import lora_lite as ll
from lora_lite.demo import TASK, Classifier, load_minilm, train
from lora_lite.tasks import make_split, number_words
from lora_lite_cli import parser


def test_the_head_and_the_adapter_step_at_their_own_lr():
    """AdamW's first step moves every entry by lr·g/(|g| + eps), so by just under its group's
    lr: the head's entries by ~head_lr, the adapter's by ~lr (mutation caught: the head at the
    adapter's lr, the demo's plateau-prone setting before --head-lr)."""
    encoder, tok = load_minilm()
    clf = Classifier(encoder)
    ll.attach(clf, ll.LoRAConfig(r=4, target_names=(r"^encoder\.encoder\.layer\.0\.",), trainable_modules=(r"^head$",)))
    before = {n: p.detach().clone() for n, p in clf.named_parameters() if p.requires_grad}
    data = [("three is less than 4", 1), ("nine is more than twelve", 0)] * 4
    train(clf, tok, data, steps=1, batch_size=4, lr=1e-4, head_lr=1e-2, seed=0)
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in clf.named_parameters() if n in before}
    assert 0.9e-2 < moved["head.weight"] <= 1.0001e-2  # fp32 rounding of the difference
    lora_B = [v for n, v in moved.items() if n.endswith("lora_B")]
    assert lora_B and all(0.9e-4 < v <= 1.0001e-4 for v in lora_B)


def test_the_demo_defaults_are_the_documented_schedule():
    args = parser().parse_args(["demo"])
    assert (args.steps, args.lr, args.head_lr, args.batch_size, args.rank) == (600, 1e-3, 1e-2, 32, 16)


def _number(token: str) -> int:
    words = {number_words(n): n for n in range(100)}
    return int(token) if token.isdigit() else words[token]


def test_the_demo_task_labels_whether_the_first_number_is_larger():
    """The demo's task: "A is more than B" is 1 exactly when A > B, parsed back from the text
    (digits or words); train and test draw disjoint operand pairs; both labels occur."""
    for split in ("train", "test"):
        data = make_split(TASK, split, 500, seed=0)
        pairs = set()
        for text, label in data:
            a, rest = text.split(" is more than ")
            a, b = _number(a), _number(rest)
            assert label == int(a > b), text
            pairs.add((min(a, b), max(a, b)))
        assert 0.4 < sum(y for _, y in data) / len(data) < 0.6
        if split == "train":
            train_pairs = pairs
    assert not pairs & train_pairs


def test_every_demo_option_is_described():
    demo = next(a for a in parser()._subparsers._group_actions[0].choices.items() if a[0] == "demo")[1]
    described = {a.dest: a.help for a in demo._actions if a.dest not in ("help", "debug")}
    assert described and all(described.values()), described


@pytest.mark.slow  # two MiniLM loads and evaluations (~10 s)
def test_the_demo_removes_its_temporary_folder(tmp_path, monkeypatch, capsys):
    """Without --out the checkpoint goes to a temporary folder that is gone after the run (a
    shortened run: 32 sentences a split, one step)."""
    import tempfile

    import lora_lite.demo as demo
    import lora_lite.tasks

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(lora_lite.tasks, "make_split", lambda task, split, n, seed: make_split(task, split, 32, seed))
    assert demo.run(parser().parse_args(["demo", "--steps", "1", "--batch-size", "4", "--rank", "2"])) == 0
    out = capsys.readouterr().out
    assert "to a temporary folder (removed; --out DIR keeps it)" in out and "-> OK" in out
    assert list(tmp_path.iterdir()) == []

    assert demo.run(parser().parse_args(["demo", "--steps", "1", "--batch-size", "4", "--rank", "2",
                                         "--out", str(tmp_path / "kept")])) == 0
    assert (tmp_path / "kept" / "adapter.safetensors").is_file()
