"""Measured invariant errors of every test case, on the test models (the random Qwen3 with an
fp32 and a bf16 base, and the real MiniLM): the numbers behind the README's exactness claims.

    python scripts/invariants.py [--out results/invariants]

Per case: identity at init (deliberate offsets zeroed), reload (trainables perturbed, save,
load onto a pristine copy), detach (back to the base) and, for methods HF PEFT has, parity
(same tensors in PEFT's slots; fp32 bases only). Errors are max |Δ| / max |y| over real tokens,
CPU; adapter tensors fp32, compute in the base's dtype (the default policy).
The test suite asserts the same quantities against fixed bounds; this prints the values.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import lora_lite as ll  # noqa: E402
from lora_lite.interop.peft import copy_to_peft, peft_config, peft_methods  # noqa: E402
from lora_lite.runtime import state_of  # noqa: E402

from cases import CASES, NEUTRAL, QWEN_ONLY  # noqa: E402
from conftest import Bench, make_minilm, make_qwen, rel_err  # noqa: E402
from test_variants import attach_case, perturb  # noqa: E402


def measure(bench, case: str) -> dict:
    row = {}
    base = bench.fresh()
    y0 = bench.out(base)
    model = bench.fresh()
    cfg = attach_case(bench, case, model)
    with torch.no_grad():
        for layer in state_of(model).targets.values():
            for pname in NEUTRAL.get(cfg.variant, ()):
                getattr(layer, pname).zero_()
    row["identity"] = rel_err(bench.out(model), y0)
    perturb(model)
    y1 = bench.out(model)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "a.safetensors"
        ll.save(model, path)
        row["bytes"] = path.stat().st_size
        fresh = bench.fresh()
        ll.load(fresh, path)
        row["reload"] = rel_err(bench.out(fresh), y1)
    if cfg.variant in peft_methods() and bench.dtype == torch.float32:
        import peft

        theirs = peft.get_peft_model(bench.fresh(), peft_config(cfg, list(state_of(model).targets))).eval()
        copy_to_peft(model, theirs)
        row["peft_parity"] = rel_err(bench.out(theirs), y1)
    ll.detach(model)
    row["detach"] = rel_err(bench.out(model), y0)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "results" / "invariants"))
    args = p.parse_args()
    rows = []
    qwen = make_qwen()
    qwen_bf16 = Bench("qwen", copy.deepcopy(qwen.model).to(torch.bfloat16), qwen.batch, (), qwen.calibration)
    for label, bench in (("qwen", qwen), ("qwen-bf16", qwen_bf16), ("minilm", make_minilm())):
        for case in CASES:
            if bench.kind != "qwen" and case in QWEN_ONLY:
                continue
            torch.manual_seed(0)
            r = {"model": label, "case": case, **measure(bench, case)}
            rows.append(r)
            print(r, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1))
    lines = ["| model | case | identity | reload | detach | PEFT parity | checkpoint bytes |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        parity = f"{r['peft_parity']:.1e}" if "peft_parity" in r else "—"
        lines.append(f"| {r['model']} | {r['case']} | {r['identity']:.1e} | {r['reload']:.1e} | "
                     f"{r['detach']:.1e} | {parity} | {r['bytes']:,} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
