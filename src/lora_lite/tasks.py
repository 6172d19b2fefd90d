"""Procedurally generated, seeded true/false text tasks with a disjoint held-out split.

Numbers 0-99 are written as digits or words at random ("thirty-one is more than 29").
Operand pairs are split between train and test by a fixed hash, so no (a, b) pair seen in
training appears in the test set. With `val_fraction` > 0 a validation split takes the pairs
whose hash lies just above the test band, out of the training pool: validation pairs occur
neither in training nor in test, so a score on it stands to training as the test score does
(model selection on it never sees the test pairs). The test split does not depend on
`val_fraction`; the training split at val_fraction = 0 is the one every earlier run used.
"""

from __future__ import annotations

import random
import zlib

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen " \
        "fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def _spell(n: int, rng: random.Random) -> str:
    return number_words(n) if rng.random() < 0.5 else str(n)


SPLITS = ("train", "val", "test")


def _split_of(a: int, b: int, test_fraction: float, val_fraction: float = 0.0) -> str:
    h = zlib.crc32(f"{min(a, b)},{max(a, b)}".encode()) / 2**32
    return "test" if h < test_fraction else "val" if h < test_fraction + val_fraction else "train"


def comparison(a: int, b: int, rng: random.Random) -> tuple[str, int]:
    """'A is more/less than B' -> (sentence, 1 if true else 0); a != b."""
    word = rng.choice(["more", "less"])
    truth = (a > b) if word == "more" else (a < b)
    return f"{_spell(a, rng)} is {word} than {_spell(b, rng)}", int(truth)


def greater(a: int, b: int, rng: random.Random) -> tuple[str, int]:
    """'A is more than B' -> (sentence, 1 if a > b else 0); a != b. One relation word, so the
    label is monotone in the two numbers; in `comparison` the word flips it (an XOR of word and
    order), and a mean-pooled encoder + linear head can sit on a plateau for a seed-dependent
    number of steps, or collapse there, before it finds that feature (the demo's task is this one)."""
    return f"{_spell(a, rng)} is more than {_spell(b, rng)}", int(a > b)


def arithmetic(a: int, b: int, rng: random.Random) -> tuple[str, int]:
    """'A plus/minus B is C' with C right or off by a small amount -> (sentence, label)."""
    op = rng.choice(["plus", "minus"]) if a >= b else "plus"
    value = a + b if op == "plus" else a - b
    truth = rng.random() < 0.5
    if not truth:
        value += rng.choice([-10, -2, -1, 1, 2, 10])
        value = abs(value)
        truth = value == (a + b if op == "plus" else a - b)
    return f"{_spell(a, rng)} {op} {_spell(b, rng)} is {_spell(value, rng) if value < 100 else value}", int(truth)


TASKS = {"comparison": comparison, "greater": greater, "arithmetic": arithmetic}


def make_split(task: str, split: str, n: int, seed: int, test_fraction: float = 0.3,
               val_fraction: float = 0.0):
    """n (sentence, label) pairs of `task` from the given split ("train", "val" or "test");
    "val" needs val_fraction > 0, and a training split meant to go with it must be drawn with
    the same val_fraction (that is what takes the validation pairs out of it)."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not (0.0 < test_fraction and 0.0 <= val_fraction and test_fraction + val_fraction < 1.0):
        raise ValueError(f"test_fraction {test_fraction} and val_fraction {val_fraction}: need "
                         f"test_fraction > 0, val_fraction >= 0 and their sum < 1")
    if split == "val" and val_fraction == 0.0:
        raise ValueError("split 'val' needs val_fraction > 0 (e.g. 0.1): at 0 no pair is set aside for it")
    rng = random.Random(f"{task}-{split}-{seed}")
    out = []
    while len(out) < n:
        a, b = rng.randrange(100), rng.randrange(100)
        if a == b or _split_of(a, b, test_fraction, val_fraction) != split:
            continue
        out.append(TASKS[task](a, b, rng))
    return out
