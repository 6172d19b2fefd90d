"""The "Reliability" table of docs/checkpoints.md is generated from ROWS and checked here, so it cannot drift from the tests.

Every row names the tests that try it (each must exist); the fuzz case count comes from
tests/test_fuzz.py. After changing ROWS or the fuzz budget: `python tests/test_reliability.py`
rewrites the block there.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
DOC = TESTS.parent / "docs" / "checkpoints.md"
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"
CE = "`CheckpointError`"

# (bad input or injected fault, what the user sees, tests that try it as file::function)
ROWS = [
    # ---- load: the file
    ("missing file", f"{CE}: no such file", "test_errors::test_load_refuses_unreadable_files"),
    ("empty, junk or truncated file", f"{CE}: not a readable safetensors file (reason)",
     "test_errors::test_load_refuses_unreadable_files"),
    ("safetensors file of another program", f"{CE}: not a lora-lite checkpoint",
     "test_errors::test_load_refuses_foreign_safetensors"),
    ("unknown format version", f"{CE}: format version 'v' is not supported (reads versions ['2'])",
     "test_errors::test_load_refuses_bad_metadata test_checkpoint_integrity::test_unsupported_versions_are_refused"),
    ("flipped bit or overwritten bytes in a tensor", f"{CE}: tensor `<key>` does not match its recorded sha256",
     "test_checkpoint_integrity::test_every_flipped_payload_bit_is_refused_naming_the_tensor "
     "test_checkpoint_integrity::test_payload_overwritten_with_ff_bytes_is_refused"),
    ("metadata edited, or hashes removed, without re-hashing", f"{CE}: the metadata does not match its recorded sha256",
     "test_checkpoint_integrity::test_edited_metadata_is_refused "
     "test_checkpoint_integrity::test_format_2_without_hashes_is_refused"),
    ("NaN or Inf in a tensor (consistent hashes)", f"{CE}: tensor `<key>` holds non-finite values",
     "test_checkpoint_integrity::test_non_finite_tensors_are_refused_naming_the_tensor"),
    ("crafted metadata: variant/config disagree, unknown variant, dtype outside the allow-list, not JSON",
     f"{CE} naming the entry or field", "test_errors::test_load_refuses_bad_metadata"),
    ("crafted target list (duplicates, non-strings, empty)", f"{CE}: 'targets' must be a non-empty list of distinct names",
     "test_checkpoint_integrity::test_crafted_target_lists_are_refused"),
    ("crafted config that does not fit the model (rank, group size)", f"{CE}: the saved adapter does not fit this model: (layer, reason)",
     "test_checkpoint_integrity::test_a_config_that_does_not_fit_the_model_is_a_checkpoint_error"),
    ("crafted fingerprint values (e.g. a 400-digit number)", "loads; `UserWarning`: base weights differ",
     "test_checkpoint_integrity::test_crafted_extreme_fingerprint_values_warn_not_crash"),
    # ---- load: the model
    ("missing, unexpected, mis-shaped or mis-typed tensor", f"{CE}: missing/unexpected [keys], shape or dtype expected vs got",
     "test_errors::test_load_refuses_tensor_mismatches"),
    ("another architecture", f"{CE}: targets are not adaptable layers of this model / shape mismatch",
     "test_errors::test_load_refuses_another_architecture"),
    ("a different base (any variant: none rewrites W)", "loads the saved change onto it; `UserWarning`: base weights of n targets differ",
     "test_errors::test_a_different_base_warns_and_loads_the_saved_change "
     "test_calibration::test_load_on_a_different_base_warns_for_a_calibrated_variant"),
    ("model already has an adapter (attach or load)", "`RuntimeError`: already has a lora-lite adapter; detach first",
     "test_variants::test_second_attach_is_refused_untouched"),
    # ---- load: fuzzed
    ("random bytes and bits, header length field, truncation, trailing bytes, header JSON edits (keys, dtypes, shapes, data_offsets, metadata)",
     f"{CE} (or, for bytes the format ignores, an identical load); never another exception",
     "test_fuzz::test_random_bytes_and_bits test_fuzz::test_header_length_field "
     "test_fuzz::test_truncation_and_trailing_bytes test_fuzz::test_header_json_edits "
     "test_fuzz::test_padding_only_loads_identically"),
    ("crafted metadata values of any JSON type, re-hashed", f"{CE} or a load of what the file says; never another exception",
     "test_fuzz::test_crafted_metadata_values"),
    # ---- save
    ("adapter with NaN/Inf", "`ValueError`: refusing to save: `<key>` holds non-finite values; previous file kept",
     "test_checkpoint_integrity::test_save_refuses_a_diverged_adapter_and_keeps_the_previous_file"),
    ("save into a missing folder", "`FileNotFoundError` naming the path you gave",
     "test_faults::test_save_into_a_missing_folder_names_the_given_path"),
    ("Ctrl-C while serializing; write (disk full), fsync or rename fails", "that error; the previous file byte-identical, no temp file left",
     "test_faults::test_failed_save_keeps_the_previous_file test_faults::test_failed_first_save_leaves_no_file"),
    ("umask 022 (a file readable by others)", "the checkpoint is 0644, not a temp file's 0600",
     "test_faults::test_saved_file_gets_the_usual_permissions"),
    ("save or detach without an adapter", "`RuntimeError`: no lora-lite adapter is attached",
     "test_errors::test_detach_and_save_need_an_adapter"),
    # ---- attach
    ("config field of the wrong type or value, unknown field or dtype", "`ValueError` naming the field",
     "test_errors::test_config_rejects_bad_fields test_errors::test_from_dict_validates_untrusted_input"),
    ("not a config", "`TypeError`: expected an AdapterConfig", "test_errors::test_not_a_config"),
    ("a `target_names` pattern selects no layer: typo, module type that cannot be adapted, a block, "
     "removed by `exclude_names`/`layers`; nothing selected at all",
     "`ValueError` naming the pattern and why (adaptable layers, the module's type, the filter)",
     "test_errors::test_no_matching_targets test_targets::test_a_pattern_that_selects_nothing_says_why"),
    ("geometry: r > min(d_in, d_out) for a variant without `wide_ranks`, HRA r > d_in, RoAd group size not dividing d_out", "`ValueError` naming the layer",
     "test_errors::test_rank_larger_than_layer test_errors::test_hra_rank_larger_than_d_in "
     "test_errors::test_road_group_size_must_divide_d_out"),
    ("weight-reading variant on a non-`nn.Linear` layer", "`TypeError`: needs torch.nn.Linear",
     "test_errors::test_dense_weight_variants_refuse_other_layers "
     "test_calibration::test_weight_reading_variants_refuse_non_dense_layers_untouched"),
    ("calibration: data for a variant without, none for one that needs it, bad batch type, misaligned mask, too few tokens, "
     "a masked layer outside an encoder–decoder's stacks",
     "`ValueError` saying what to pass",
     "test_calibration::test_failed_calibrated_attach_leaves_the_model_untouched "
     "test_calibration::test_misaligned_mask_is_refused_untouched "
     "test_calibration::test_a_layer_outside_both_stacks_is_refused_when_masks_are_given"),
    ("a calibration batch raises; Ctrl-C during calibration", "that exception; hooks removed, train/eval mode restored",
     "test_calibration::test_a_batch_that_raises_removes_the_hooks_and_restores_train_mode "
     "test_faults::test_keyboard_interrupt_during_calibration"),
    ("exception in init at the first, a middle or the last target (variant init or ParamSpec init)",
     "that exception; everything rolled back",
     "test_faults::test_variant_init_fails_at_a_target test_faults::test_paramspec_init_fails_at_a_target "
     "test_errors::test_failure_in_init_rolls_back"),
    ("Ctrl-C while attach or load adds hooks or creates tensors", "`KeyboardInterrupt`; everything rolled back",
     "test_faults::test_keyboard_interrupt_while_adding_hooks test_faults::test_load_interrupted"),
    ("Ctrl-C during detach", "`KeyboardInterrupt`; calling detach again finishes it, bit for bit",
     "test_faults::test_interrupted_detach_can_be_retried"),
    ("reconfigure of a field that is not a runtime field", "`ValueError`: cannot change while attached",
     "test_errors::test_reconfigure_refuses_fields_that_are_not_runtime"),
]


def render() -> str:
    sys.path.insert(0, str(TESTS))
    from test_fuzz import FUZZ_BUDGET, FUZZ_EXAMPLES

    lines = [
        "| Bad input or injected fault | What you see | Tests |",
        "|---|---|---|",
    ]
    for what, sees, tests in ROWS:
        refs = ", ".join(f"`{t}`" for t in tests.split())
        lines.append(f"| {what} | {sees} | {refs} |")
    budget = ", ".join(f"{k} {v}" for k, v in FUZZ_BUDGET.items())
    lines += [
        "",
        f"Fuzzed loader: {FUZZ_EXAMPLES} mutated checkpoints per CI run ({budget}); deterministic "
        f"(hypothesis `derandomize=True`). A longer run: "
        f"`LORA_LITE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py -s` (prints the outcome counts).",
    ]
    return "\n".join(lines)


def _defined_tests(module: str) -> set[str]:
    tree = ast.parse((TESTS / f"{module}.py").read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_every_row_names_existing_tests():
    for what, _, tests in ROWS:
        for ref in tests.split():
            module, name = ref.split("::")
            assert name in _defined_tests(module), f"row {what!r}: no test {ref}"


def test_the_reliability_table_is_generated_from_the_tests():
    text = DOC.read_text()
    block = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    assert block, f"{DOC.name} has no {START} ... {END} block"
    assert block.group(1) == render(), f"{DOC.name} reliability table is stale: run python tests/test_reliability.py"


if __name__ == "__main__":
    text = DOC.read_text()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    DOC.write_text(f"{head}{START}\n{render()}\n{END}{tail}")
