"""The generic suites' cases, read from the variant registry: every `Example` a variant file
declares is a case, so a new variant is tested by every generic suite without an entry here.

    CASES         case name -> (targets -> config)
    NO_DATA       cases that attach without calibration data (optional-calibration variants)
    QWEN_ONLY     cases run on the tiny Qwen3 decoder only
    NEUTRAL       variant -> tensors to zero for an exact identity (deliberately non-identity inits)
    IDENTITY_TOL  variant -> {base dtype: relative tolerance of the identity at init}; absent = 0
    TRAINABLE     variant -> (d_in, d_out, cfg) -> trainable parameters per layer, as the paper counts
                  (the variants that state it)
    CASE_PARAMS   CASES as pytest params: each variant's first example in the fast tier, the
                  others in the full tier only (marker slow)
    PRIMARY       each variant's first example, in registry order
    variant(case) the variant class of a case
    HOOK_KINDS    the first variant's primary case of each hook kind (output, input pre-hook,
                  gate, a run-time field): suites too slow for every case run these in the fast
                  tier
    primary_params()  PRIMARY as pytest params: HOOK_KINDS in the fast tier, the others slow
"""

from __future__ import annotations

import pytest

import lora_lite as ll
from lora_lite.variant import REGISTRY


def _case(variant: str, fields: dict):
    return lambda targets: ll.AdapterConfig.from_dict({"variant": variant, **fields, "target_names": list(targets)})


def _tables():
    cases, no_data, qwen_only = {}, set(), set()
    for name, v in REGISTRY.items():
        for case, example in v.examples.items():
            if case in cases:
                raise KeyError(f"example {case!r} of {name!r} is also declared by another variant")
            cases[case] = _case(name, example.fields)
            if not example.calibrate:
                no_data.add(case)
            if not example.minilm:
                qwen_only.add(case)
    return cases, no_data, qwen_only


CASES, NO_DATA, QWEN_ONLY = _tables()
NEUTRAL = {n: v.neutral for n, v in REGISTRY.items() if v.neutral}
IDENTITY_TOL = {n: dict(v.identity_tol) for n, v in REGISTRY.items() if v.identity_tol}
TRAINABLE = {n: v.params_per_layer for n, v in REGISTRY.items() if v.params_per_layer is not None}


def _params():
    primary = {next(iter(v.examples)) for v in REGISTRY.values()}
    return [pytest.param(c, marks=() if c in primary else pytest.mark.slow) for c in CASES]


CASE_PARAMS = _params()
PRIMARY = [next(iter(v.examples)) for v in REGISTRY.values()]


def variant(case: str):
    """The registered variant class a case attaches."""
    return REGISTRY[CASES[case](()).variant]


def _hook_kind(v) -> str:
    if v.runtime_fields:
        return "runtime field"
    if v.gate is not None:
        return "gate"
    return "input" if v.delta_input is not None else "output"


def _first_per_hook_kind() -> list[str]:
    first: dict[str, str] = {}
    for v in REGISTRY.values():
        first.setdefault(_hook_kind(v), next(iter(v.examples)))
    return list(first.values())


HOOK_KINDS = _first_per_hook_kind()


def primary_params():
    return [pytest.param(c, marks=() if c in HOOK_KINDS else pytest.mark.slow) for c in PRIMARY]
