"""Configs teach and offer only what their variant reads.

`help()` of every registered config lists each field with its doc (declared beside the field)
and shows the signature once. A shared field a variant never reads (`alpha` of the AntiPaSTO
family, DeLoRA and HRA; `r` and `alpha` of IA3 and RoAd) is not a field of its config: the
constructor refuses it like any unknown field, while a saved config that holds it (a checkpoint
of lora-lite <= 0.1.x) still loads, exactly, with the field dropped whatever its value.
"""

from __future__ import annotations

import dataclasses
import json
import pydoc
import re

import pytest
import torch

import lora_lite as ll
from lora_lite.config import CONFIGS
from lora_lite.variant import REGISTRY

from cases import CASES
from ckpt_files import rewrite
from test_variants import attach_case, perturb

BUILT_IN = sorted(n for n in REGISTRY if REGISTRY[n].__module__.startswith("lora_lite."))
# what each variant's forward and init never read (lora-lite <= 0.1.x offered both to every variant)
NOT_READ = {
    **{n: {"alpha"} for n in ("antipasto", "antipasto_corda", "antipasto_asvd", "antipasto_dplr", "antipasto_rot",
                              "antipasto_ablate", "delora", "hra")},
    **{n: {"r", "alpha"} for n in ("ia3", "ia3_ff", "road")},
}


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


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_config_offers_only_the_shared_fields_its_variant_reads(name):
    cls = CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    assert {"r", "alpha"} - fields == NOT_READ.get(name, set())
    assert set(cls.retired_fields) == NOT_READ.get(name, set())  # old saved configs still load
    for field in NOT_READ.get(name, ()):
        with pytest.raises(ValueError, match=rf"^{cls.__name__}: unknown field '{field}'; valid fields: \["):
            cls(**{field: 16})
        assert field in _flat(pydoc.render_doc(cls, renderer=pydoc.plaintext)).split("Not offered: ")[1]


@pytest.mark.parametrize("name", sorted(NOT_READ))
def test_from_dict_drops_a_retired_field_whatever_its_value(name):
    cls = CONFIGS[name]
    new = cls().to_dict()
    assert not set(NOT_READ[name]) & set(new)
    for value in (16.0, 8, -3.5, "junk"):  # the field was never read, so no value of it meant anything
        assert ll.AdapterConfig.from_dict({**new, **dict.fromkeys(NOT_READ[name], value)}) == cls()


# One case per variant that lost a field; the SVD members each attach with an SVD per target.
OLD_CASES = [next(c for c in CASES if CASES[c](()).variant == n) for n in sorted(NOT_READ)]


@pytest.mark.parametrize("case", OLD_CASES)
def test_a_checkpoint_saved_with_a_retired_field_loads_exactly(qwen, case, tmp_path):
    model = qwen.fresh()
    cfg = attach_case(qwen, case, model)
    perturb(model)
    y = qwen.out(model)
    ll.save(model, tmp_path / "new.safetensors")

    def old_meta(meta):  # as lora-lite <= 0.1.x wrote it: every shared field, a non-default value
        saved = json.loads(meta["config"])
        meta["config"] = json.dumps({"variant": saved.pop("variant"), "r": 5, "alpha": 3.5, **saved})

    old = rewrite(tmp_path / "new.safetensors", tmp_path / "old.safetensors", edit_meta=old_meta)
    assert ll.read(old).config == cfg
    fresh = qwen.fresh()
    ll.load(fresh, old)
    assert torch.equal(qwen.out(fresh), y)
