"""Configs teach and offer only what their variant reads.

`help()` of every registered config lists each field with its doc (declared beside the field)
and shows the signature once. A shared field (`r`, `alpha`) is a field of a config exactly when
its variant reads it: changing it changes the attached adapter; one it does not offer is refused
like any unknown field.
"""

from __future__ import annotations

import dataclasses
import pydoc
import re

import pytest
import torch

import lora_lite as ll
from lora_lite.config import CONFIGS
from lora_lite.variant import REGISTRY

from cases import CASES, PRIMARY
from test_variants import perturb

BUILT_IN_CASES = {c for c in CASES if REGISTRY[CASES[c](()).variant].__module__.startswith("lora_lite.")}

def _doc(cls, name):
    """The field's doc: its own metadata, else the nearest base that documents it."""
    for klass in cls.__mro__:
        f = vars(klass).get("__dataclass_fields__", {}).get(name)
        if f is not None and f.metadata.get("doc"):
            return f.metadata["doc"]
    return None


def _flat(text):
    """pydoc's plain text without its ' |  ' margins and line breaks (docs are wrapped)."""
    return " ".join(re.sub(r"^\s*\|\s?", "", line).strip() for line in text.splitlines())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_field_has_a_doc(name):
    cls = CONFIGS[name]
    missing = [f.name for f in dataclasses.fields(cls) if not _doc(cls, f.name)]
    assert not missing, f"{cls.__name__}: undocumented fields {missing}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_help_lists_every_field_with_its_doc_and_the_signature_once(name):
    cls = CONFIGS[name]
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    flat = _flat(text)
    assert flat.count(f"{cls.__name__}(*,") == 1, "the signature is shown once, not repeated as the docstring"
    for f in dataclasses.fields(cls):
        head = f"{f.name}: " if f.init else f"{f.name} = {f.default!r}: "
        assert head in flat, f"{cls.__name__}: help() does not list {f.name}"
        assert " ".join(_doc(cls, f.name).split()) in flat, f"{cls.__name__}: help() lacks the doc of {f.name}"
    if f"help({cls.__module__})" not in flat:  # a hand-written class summary instead of the module's
        assert cls.__module__ == "toy_variant"


def test_help_of_lora_config_opens_with_the_method_and_its_fields():
    lines = [re.sub(r"^ \|  ?", "", s) for s in pydoc.render_doc(ll.LoRAConfig, renderer=pydoc.plaintext).splitlines()]
    start = lines.index("LoRA: a trainable low-rank product beside the frozen weight (arXiv 2106.09685).")
    assert lines[start + 4:start + 6] == ["Fields (keyword arguments; to_dict / AdapterConfig.from_dict for JSON):",
                                          "r: int = 8"]


def _attached(qwen, case, **fields):
    """The case's adapter with `fields` changed, tensors moved off init the same way each time."""
    cfg = dataclasses.replace(CASES[case](qwen.targets), **fields)
    model = qwen.fresh()
    torch.manual_seed(0)
    data = qwen.calibration if REGISTRY[cfg.variant].calibration_needs(cfg)[0] else None
    ll.attach(model, cfg, calibration_data=data, progress=False)
    perturb(model)
    return model


@pytest.mark.parametrize("case", [c for c in PRIMARY if c in BUILT_IN_CASES])
def test_a_config_offers_the_shared_fields_its_variant_reads_and_no_other(qwen, case):
    cls = type(CASES[case](()))
    fields = {f.name for f in dataclasses.fields(cls)}
    base = _attached(qwen, case)
    y = qwen.out(base)
    if "alpha" in fields:  # the scale: the same tensors, another output
        alpha = CASES[case](()).alpha
        assert not torch.equal(qwen.out(_attached(qwen, case, alpha=2 * alpha)), y)
    if "r" in fields:  # the rank: other tensor shapes
        r = CASES[case](()).r
        shapes = lambda m: sorted(tuple(p.shape) for n, p in m.named_parameters() if ".lora_" in n)  # noqa: E731
        assert shapes(_attached(qwen, case, r=2 * r)) != shapes(base)
    for field in {"r", "alpha"} - fields:
        with pytest.raises(ValueError, match=rf"^{cls.__name__}: unknown field '{field}'; valid fields: \["):
            cls(**{field: 16})
