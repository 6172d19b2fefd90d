"""Where a hooked layer's time goes on the 64-wide model (`bench cost --models tiny64`): the
hook dispatch, our change's arithmetic, and PEFT's module, per target, per training step.

Rows, each on its own copy of the 8-block 64-wide Qwen3 (56 targets, 2 x 32 tokens):
  base    the frozen base
  noop    every target carries a forward hook that returns None (the price of having a hook)
  ours    lora-lite attached
  inline  the same attach, but each target's forward calls our hook object directly after its
          F.linear (no nn.Module hook dispatch): our arithmetic alone
  peft    PEFT's module for the same method
Interleaved repeats, one thread; time is this process's CPU time (time.process_time), which
other jobs on a shared box disturb less than wall time. Per target = (row − paired base) / 56.
The whole-step ratio ours / PEFT is (B + o) / (B + p), so it can only reach a target t when
our per-target cost o ≤ t·p − (1 − t)·B/56; the last column says what that bound is.

    python scripts/hook_floor.py [--methods lora,dora,ia3,...] [--repeats 15] [--out results/hook_floor.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_bench import cost  # noqa: E402
from lora_bench.common import environment  # noqa: E402
from lora_lite.runtime import AdapterHook  # noqa: E402
from lora_lite.targets import find_targets  # noqa: E402


def _inline(model):
    """Move every lora-lite forward hook into its layer's forward: y = hook(layer, (x,), linear(x))."""
    n = 0
    for layer in model.modules():
        hooks = [h for h in layer._forward_hooks.values() if isinstance(h, AdapterHook)]
        if not hooks or type(hooks[0]) is not AdapterHook:
            continue
        (hook,) = hooks
        layer._forward_hooks.clear()

        def forward(self, x, _hook=hook):
            y = F.linear(x, self.weight, self.bias)
            out = _hook(self, (x,), y)
            return y if out is None else out

        layer.forward = types.MethodType(forward, layer)
        n += 1
    return n


def measure(method: str, repeats: int, warmup: int = 3) -> dict:
    setup = cost.Setup("tiny64", 8, 2, 32, 1, 16)
    cfg = setup.config(method)
    members = {"base": setup.build("base", None), "ours": setup.build("ours", method),
               "peft": setup.build("peft", method)}
    inline = setup.build("ours", method)
    if _inline(inline):
        members["inline"] = inline
    # the no-op hooks go on a frozen copy whose targets are found by name (copies have new ids)
    noop = setup.build("base", None)
    wanted = {n for n, _ in find_targets(setup.base, cfg)}
    for name, m in noop.named_modules():
        if name in wanted:
            m.register_forward_hook(lambda mod, args, out: None)
    members["noop"] = noop
    n = len(wanted)
    times = {k: [] for k in members}
    keys = list(members)
    for rep in range(warmup + repeats):
        for k in keys[rep % len(keys):] + keys[: rep % len(keys)]:
            model = members[k]
            for p in model.parameters():
                p.grad = None
            t0 = time.process_time()
            cost.models.main_output(model, setup.batch).float().square().mean().backward()
            if rep >= warmup:
                times[k].append(time.process_time() - t0)
    base = times["base"]
    per = {k: 1e6 * statistics.median((t - b) / n for t, b in zip(times[k], base)) for k in members if k != "base"}
    ratio = statistics.median(o / p for o, p in zip(times["ours"], times["peft"]))
    b = statistics.median(base)
    bound = 0.85 * per["peft"] - 0.15 * 1e6 * b / n
    return {"method": method, "targets": n, "base_ms": 1e3 * b, "us": per, "ratio": ratio, "bound_085": bound}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="lora,pissa,dora,delora,hra,ia3,ia3_ff,road")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--out")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [measure(m, a.repeats) for m in a.methods.split(",")]
    env = environment()
    lines = [
        "# Per-target cost on the 64-wide model: hook dispatch, arithmetic, PEFT",
        "",
        f"`python scripts/hook_floor.py --repeats {a.repeats}`: 8-block 64-wide Qwen3, 56 targets, 2 x 32 tokens, "
        f"one thread, CPU time per training step (forward + backward), medians of paired repeats; "
        f"{env.get('cpu', 'CPU')}, torch {torch.__version__}, {env.get('date', '')}.",
        "",
        "| method | frozen base step ms | no-op hook µs/target | ours µs/target | ours inline (no hook dispatch) µs/target | PEFT µs/target | ours / PEFT step | ours µs/target needed for 0.85× |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        u = r["us"]
        lines.append(f"| `{r['method']}` | {r['base_ms']:.1f} | {u['noop']:.1f} | {u['ours']:.0f} | "
                     f"{u['inline']:.0f} | {u['peft']:.0f} | **{r['ratio']:.2f}** | {r['bound_085']:.0f} |"
                     if "inline" in u else
                     f"| `{r['method']}` | {r['base_ms']:.1f} | {u['noop']:.1f} | {u['ours']:.0f} | — | "
                     f"{u['peft']:.0f} | **{r['ratio']:.2f}** | {r['bound_085']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
