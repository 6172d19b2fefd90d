"""C1 cost: every variant, ours side by side with HF PEFT, in one process.

    python -m lora_bench cost              MiniLM-L6 and a Qwen3-0.6B-shaped random decoder, all variants
    python -m lora_bench cost --quick      toy sizes, two variants, few repeats (a CI smoke run)
    python -m lora_bench cost --models tiny64 --no-memory
                                           per-target overhead: 56 64-wide targets, 2 x 32 tokens,
                                           where a step's overhead over the base is the hooks' cost
    python -m lora_bench cost --models tiny64 --coefficients
                                           the same steps under ll.scaled with a float c and with
                                           coefficient tensors (and the gain family's coeff), one
                                           process, interleaved: the tensor path's cost over the float's

For each model the rows are grouped by method: a group holds the frozen base, our adapter and
PEFT's adapter for the same method (same targets, same rank, same batch), each on its own copy
of the base. Every repeat times one training forward (grad enabled, train mode) and the
backward of a fixed loss (mean of the squared main output) for each member, in rotating
order; medians over repeats after warmup. Ratios (overhead over the base step, our step /
PEFT step) are medians of the per-repeat paired ratios, so slow drifts of a shared machine
cancel. The frozen base step back-propagates to the embedding output (activation gradients
only, no weight gradients), slightly further than an adapter step needs (it stops at the first
adapted layer), so an overhead within the noise can come out negative. The optimizer step is not
timed. Full fine-tuning is its own group (base + full).

Other columns: trainable params; analytic added MACs per token (SPEC B2, `adapters.py`; also
as % of the base's analytic forward MACs per token); attach+init seconds (one measurement;
ours: `ll.attach` including calibration; PEFT: `get_peft_model` plus `preprocess_corda` /
`initialize_lora_eva_weights`); peak memory is measured in a fresh Python process per row: it loads
the base, resets the kernel's resident high-water mark, attaches and runs one full training
step (forward, backward, AdamW step); we report that peak (interpreter, torch and base weights
included) and the peak minus the resident size before attach (what the row adds); checkpoint
bytes and save / load ms (median of 3; ours `ll.save` / `ll.load` onto a pristine copy, PEFT
`save_pretrained` / `PeftModel.from_pretrained`, counting adapter_model.safetensors and
adapter_config.json). After the checkpoint rows every trainable is perturbed and the reload
error is measured relative to the adapter's effect on the output.

Activation memory: the bytes of the unique storages autograd saves for backward during one
training forward (`torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage, model
parameters and buffers left out), and that minus the frozen base step's: what the adapter keeps
alive for backward. Deterministic, unlike a resident-memory peak.

`--device cuda --dtype bfloat16` runs the same rows on a GPU with the base in bf16 (adapter
tensors stay in their config dtype); times are then CUDA-synchronised and the peak memory is
`torch.cuda.max_memory_allocated` over one training step (forward, backward, AdamW step), reset
before each row's step, in the same process: the row's peak minus what was allocated before.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import lora_lite as ll
from lora_lite.variant import REGISTRY

from . import adapters, models
from .common import environment, parse_list, read_json, write_json

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULTS = {
    "minilm": {"layers": 6, "batch_size": 16, "seq_len": 64},
    "qwen": {"layers": 2, "batch_size": 2, "seq_len": 128},
    "tiny": {"layers": 2, "batch_size": 2, "seq_len": 16},
    "tiny64": {"layers": 8, "batch_size": 2, "seq_len": 32},
}
QUICK = {
    "minilm": {"layers": 6, "batch_size": 2, "seq_len": 16},
    "tiny": {"layers": 2, "batch_size": 2, "seq_len": 16},
}


# ---- building one row --------------------------------------------------------------------------

class Setup:
    """A base model with its batch, calibration batches and target geometry."""

    def __init__(self, kind: str, layers: int, batch_size: int, seq_len: int, n_calib: int, rank: int,
                 device: str = "cpu", dtype: str = "float32"):
        self.kind, self.rank, self.device = kind, rank, device
        self.base, _ = models.build(kind, layers)
        self.base.to(device=device, dtype=DTYPES[dtype]).train()
        self.targets = models.TARGETS[kind]

        def on_device(batch):
            return {k: v.to(device) for k, v in batch.items()}

        self.batch = on_device(models.random_batch(self.base, batch_size, seq_len, seed=1))
        self.calibration = [on_device(models.random_batch(self.base, batch_size, seq_len, seed=10 + i))
                            for i in range(n_calib)]
        self.geom = adapters.geometry(self.base, self.targets)

    def config(self, name: str) -> ll.AdapterConfig:
        """Our config; for a PEFT-only row (variant not registered) a LoRA config with the
        variant's rank/alpha stands in, which is all PEFT's LoRA-family methods read."""
        if name in ll.REGISTRY:
            return adapters.make_config(name, self.rank, self.targets, self.geom)
        knobs = adapters.settings()[name].knobs(self.rank, self.geom)
        return ll.LoRAConfig(r=knobs["r"], alpha=knobs.get("alpha", 2.0 * knobs["r"]),
                             target_names=self.targets)

    def target_layers(self, cfg) -> list[nn.Module]:
        from lora_lite.targets import find_targets

        return [m for _, m in find_targets(self.base, cfg)]

    def build(self, lib: str, name: str | None, copy_base: bool = True) -> nn.Module:
        """A fresh copy of the base (or the base itself) made trainable as row (lib, name) says."""
        model = copy.deepcopy(self.base) if copy_base else self.base
        if lib == "base":
            model.requires_grad_(False)
            emb = model.get_input_embeddings()  # back-propagate activations down to here
            emb.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_())
        elif lib == "ours":
            adapters.attach_ours(model, self.config(name), self.calibration)
        elif lib == "peft":
            cfg = self.config(name)
            model = adapters.attach_peft(model, adapters.peft_method(name), cfg,
                                         adapters.target_names(model, cfg), self.calibration)
        elif lib != "full":
            raise ValueError(f"unknown row kind {lib!r}")
        return model


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _sync(batch: dict) -> None:
    if batch["input_ids"].is_cuda:
        torch.cuda.synchronize()


def step(model: nn.Module, batch: dict) -> tuple[float, float]:
    """(forward s, forward+backward s) of one training step; grads are cleared first."""
    for p in model.parameters():
        p.grad = None
    _sync(batch)
    t0 = time.perf_counter()
    loss = models.main_output(model, batch).float().square().mean()
    _sync(batch)
    t1 = time.perf_counter()
    loss.backward()
    _sync(batch)
    return t1 - t0, time.perf_counter() - t0


def saved_activation_bytes(model: nn.Module, batch: dict) -> int:
    """Bytes of the unique storages autograd saves for backward in one training forward of
    `model` (the fixed loss of `step`), model parameters and buffers excluded. Storages are
    deduplicated by data pointer: every saved tensor stays alive until backward, so two live
    storages never share one."""
    own = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    for p in model.parameters():
        p.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = models.main_output(model, batch).float().square().mean()
    loss.backward()  # frees what was saved
    for p in model.parameters():
        p.grad = None
    return sum(seen.values())


def cuda_peak(model: nn.Module, batch: dict) -> dict:
    """Peak CUDA memory of one training step (forward, backward, AdamW step) from a reset, and
    that minus what was allocated before the step (the row's activations, grads, optimizer state)."""
    for p in model.parameters():
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(model, batch)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    if opt is not None:
        opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del opt
    for p in model.parameters():
        p.grad = None
    return {"peak_cuda_mb": peak / 2**20, "peak_over_model_mb": (peak - before) / 2**20,
            "memory_method": "cuda max_memory_allocated"}


def time_group(members: dict[str, nn.Module], batch: dict, repeats: int, warmup: int) -> dict:
    """Interleaved repeats, rotating the order each time: {key: [(fwd s, step s), ...]}."""
    keys = list(members)
    times: dict[str, list] = {k: [] for k in keys}
    for rep in range(warmup + repeats):
        order = keys[rep % len(keys):] + keys[: rep % len(keys)]
        for k in order:
            t = step(members[k], batch)
            if rep >= warmup:
                times[k].append(t)
    return times


def _median_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of the paired per-repeat ratios a_i / b_i."""
    r = sorted(x / y for x, y in zip(a, b))
    q = statistics.quantiles(r, n=4) if len(r) > 1 else [r[0], r[0], r[0]]
    return statistics.median(r), q[0], q[2]


def _per_target_us(times: list[float], base: list[float], n: int) -> float:
    """Median over repeats of (time − paired base time) / targets, in µs: what each hooked
    layer adds to one step (on `tiny64`, where layer compute is negligible, the hooks' own cost)."""
    return 1e6 * statistics.median((t - b) / n for t, b in zip(times, base))


# ---- coefficient tensors -----------------------------------------------------------------------

def coefficient_members(setup: Setup, name: str, c: float = 0.5) -> dict[str, nn.Module]:
    """One variant's copies of the base, each held at one strength for good: ll.scaled entered
    and never left (each copy is its own model): c = 1 (the default), the float c, the same
    value as a (batch,) and a (batch, seq) tensor; for a variant with a run-time coeff also
    coeff = c as a float and as a (batch,) tensor."""
    batch, seq = setup.batch["input_ids"].shape
    device = setup.batch["input_ids"].device
    settings = {"c=1": 1.0, f"c={c:g}": c, "c (batch,)": torch.full((batch,), c, device=device),
                "c (batch, seq)": torch.full((batch, seq), c, device=device)}
    members = {"base": setup.build("base", None)}
    for key, value in settings.items():
        model = setup.build("ours", name)
        ll.scaled(model, value).__enter__()
        members[key] = model
    if "coeff" in REGISTRY[name].runtime_fields:
        for key, value in {f"coeff={c:g}": c, "coeff (batch,)": torch.full((batch,), c, device=device)}.items():
            model = setup.build("ours", name)
            ll.reconfigure(model, coeff=value)
            members[key] = model
    return members


def run_coefficients(kind: str, shape: dict, p: dict, log=print) -> dict:
    """Per variant: step and forward time per member of `coefficient_members`, interleaved; the
    tensor members' paired ratios over the float member of the same value and over c = 1."""
    torch.manual_seed(0)
    setup = Setup(kind, shape["layers"], shape["batch_size"], shape["seq_len"], p["n_calib"], p["rank"],
                  p.get("device", "cpu"), p.get("dtype", "float32"))
    rows = []
    for name in adapters.available(p["variants"], log=log):
        members = coefficient_members(setup, name)
        times = time_group(members, setup.batch, p["repeats"], p["warmup"])
        n = len(setup.target_layers(setup.config(name)))
        base = [s for _, s in times["base"]]
        row = {"variant": name, "targets": n, "members": {}}
        for key, t in times.items():
            if key == "base":
                continue
            fwd, stp = [f for f, _ in t], [s for _, s in t]
            entry = {"step_ms": 1e3 * statistics.median(stp), "fwd_ms": 1e3 * statistics.median(fwd),
                     "step_us_per_target": _per_target_us(stp, base, n)}
            same_value = ("coeff=0.5" if key.startswith("coeff") else "c=0.5") if "(" in key else None
            for ref in filter(None, (same_value, "c=1" if key != "c=1" else None)):
                r = times[ref]
                entry[f"step_ratio_vs_{ref}"] = _median_ratio(stp, [s for _, s in r])[0]
                entry[f"fwd_ratio_vs_{ref}"] = _median_ratio(fwd, [f for f, _ in r])[0]
            row["members"][key] = entry
        rows.append(row)
        m = row["members"]
        log(f"{kind} {name:18s} step ms: c=1 {m['c=1']['step_ms']:.2f}, c=0.5 {m['c=0.5']['step_ms']:.2f}; "
            f"(batch,) / float step {m['c (batch,)']['step_ratio_vs_c=0.5']:.3f}, "
            f"(batch, seq) / float {m['c (batch, seq)']['step_ratio_vs_c=0.5']:.3f}"
            + (f", coeff (batch,) / float {m['coeff (batch,)']['step_ratio_vs_coeff=0.5']:.3f}"
               if "coeff (batch,)" in m else ""))
        del members
    return {"kind": kind, **shape, "rows": rows}


# ---- checkpoints -------------------------------------------------------------------------------

@torch.no_grad()
def _perturb(model: nn.Module, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)
            p.add_(scale * noise * (p.abs().mean() + 1e-3))


def checkpoint(setup: Setup, lib: str, model: nn.Module, repeats: int = 3) -> dict:
    """Bytes, save ms, load ms (medians) and the reload error, for rows that save something."""
    import peft

    _perturb(model)
    model.eval()
    with torch.no_grad():
        y = models.main_output(model, setup.batch)
        y_base = models.main_output(setup.base.eval(), setup.batch)
    setup.base.train()
    saves, loads, out = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            fresh = copy.deepcopy(setup.base)
            path = os.path.join(tmp, f"{i}")
            t0 = time.perf_counter()
            if lib == "ours":
                ll.save(model, path + ".safetensors")
                files = [path + ".safetensors"]
            elif lib == "peft":
                model.save_pretrained(path)
                files = [os.path.join(path, f) for f in ("adapter_model.safetensors", "adapter_config.json")]
            else:  # full fine-tune: the whole state dict
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                          path + ".safetensors")
                files = [path + ".safetensors"]
            saves.append(time.perf_counter() - t0)
            out["bytes"] = sum(os.path.getsize(f) for f in files)
            t0 = time.perf_counter()
            try:
                if lib == "ours":
                    ll.load(fresh, files[0])
                    loaded = fresh
                elif lib == "peft":
                    loaded = peft.PeftModel.from_pretrained(fresh, path)
                else:
                    from safetensors.torch import load_file

                    fresh.load_state_dict(load_file(files[0]))
                    loaded = fresh
            except Exception as e:  # PEFT CorDA cannot reload onto a pristine base without data
                out["load_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                break
            loads.append(time.perf_counter() - t0)
        else:
            with torch.no_grad():
                y2 = models.main_output(loaded.eval(), setup.batch)
            out["reload_err"] = float((y2 - y).abs().max() / (y - y_base).abs().max().clamp_min(1e-30))
    model.train()
    out["save_ms"] = 1e3 * statistics.median(saves)
    out["load_ms"] = 1e3 * statistics.median(loads) if loads else None
    return out


# ---- peak memory in a fresh process ------------------------------------------------------------

def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(spec: dict) -> dict:
    """Run inside the fresh process: load the base, reset the resident high-water mark, then
    attach and run one training step (forward, backward, AdamW step) and read the peak.

    Resetting the mark (Linux: "5" > /proc/self/clear_refs) keeps transient peaks of model
    loading out of the number; without it the number is the process's lifetime VmHWM."""
    torch.set_num_threads(spec["threads"])
    setup = Setup(spec["kind"], spec["layers"], spec["batch_size"], spec["seq_len"],
                  spec["n_calib"], spec["rank"], dtype=spec.get("dtype", "float32"))
    rss_model = _status_mb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        method = "VmHWM after reset"
    except OSError:
        method = "lifetime VmHWM"
    model = setup.build(spec["lib"], spec["name"], copy_base=False)
    step(model, setup.batch)
    params = [p for p in model.parameters() if p.requires_grad]
    if params:
        torch.optim.AdamW(params, lr=1e-4).step()
    # VmHWM, not ru_maxrss: Linux carries the spawning parent's peak into the child's
    # ru_maxrss across fork + exec, and clear_refs does not reset that part.
    peak = _status_mb("VmHWM")
    return {"peak_rss_mb": peak, "rss_model_mb": rss_model, "peak_over_model_mb": peak - rss_model,
            "memory_method": method}


def peak_memory(spec: dict) -> dict:
    """Peak resident memory of a fresh `python -m lora_bench.cost --memory-child SPEC` process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "lora_bench.cost", "--memory-child", json.dumps(spec)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        return {"memory_error": proc.stderr.strip().splitlines()[-1][:200] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- one model ---------------------------------------------------------------------------------

def groups(names: list[str], with_peft: bool, skip_peft: tuple[str, ...] = ()
           ) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """(group label, [(lib, variant)]) in table order; PEFT-only groups for methods whose
    lora-lite variant is not registered in this build; no PEFT row for `skip_peft` variants."""
    out = [("full fine-tune", [("base", None), ("full", None)])]
    for name in names:
        method = adapters.peft_method(name) if with_peft and name not in skip_peft else None
        registered = name in ll.REGISTRY
        members = [("base", None)] + ([("ours", name)] if registered else [])
        members += [("peft", name)] if method else []
        if len(members) > 1:
            out.append((name, members))
    return out


def run_model(kind: str, shape: dict, p: dict, log=print, save=lambda partial: None) -> dict:
    """All groups on one model; `save(partial)` is called after every row."""
    torch.manual_seed(0)
    setup = Setup(kind, shape["layers"], shape["batch_size"], shape["seq_len"], p["n_calib"], p["rank"],
                  p.get("device", "cpu"), p.get("dtype", "float32"))
    tokens = shape["batch_size"] * shape["seq_len"]
    base_macs = models.linear_macs_per_token(setup.base, shape["seq_len"])
    registered = adapters.available(p["variants"], log=log)
    wanted = p["variants"] or list(adapters.settings())
    # PEFT-only rows: methods PEFT has whose variant is not merged yet (e.g. EVA, CorDA)
    names = [n for n in wanted if n in registered or (p["peft"] and adapters.peft_method(n))]
    rows = []
    out = {"kind": kind, **shape, "tokens": tokens, "base_macs_per_token": base_macs,
           "variants": p["variants"], "skip_peft": p.get("skip_peft"), "date": environment()["date"],
           "rows": rows}
    for label, members in groups(names, p["peft"], tuple(p.get("skip_peft") or ())):
        built, info = {}, {}
        for lib, name in members:
            key = f"{lib}:{name}" if name else lib
            t0 = time.perf_counter()
            built[key] = setup.build(lib, name)
            info[key] = {"attach_s": time.perf_counter() - t0 if lib in ("ours", "peft") else None}
        times = time_group(built, setup.batch, p["repeats"], p["warmup"])
        saved = {key: saved_activation_bytes(model, setup.batch) for key, model in built.items()}
        base_fwd = [f for f, _ in times["base"]]
        base_step = [s for _, s in times["base"]]
        for (lib, name), key in zip(members, built):
            if lib == "base" and label != "full fine-tune":
                continue  # one base row per model (from the full fine-tune group)
            fwd = [f for f, _ in times[key]]
            stp = [s for _, s in times[key]]
            row = {
                "group": label, "lib": lib, "variant": name,
                "method": adapters.PEFT_LABELS.get(adapters.peft_method(name) or "", name) if name else lib,
                "params": trainable(built[key]),
                "fwd_ms": 1e3 * statistics.median(fwd), "step_ms": 1e3 * statistics.median(stp),
                **info[key],
            }
            row["saved_mb"] = saved[key] / 2**20
            if lib != "base":
                row["saved_over_base_mb"] = (saved[key] - saved["base"]) / 2**20
                row["fwd_overhead_pct"] = 100 * (_median_ratio(fwd, base_fwd)[0] - 1)
                row["step_overhead_pct"] = 100 * (_median_ratio(stp, base_step)[0] - 1)
            if lib in ("ours", "peft"):
                n = len(setup.target_layers(setup.config(name)))
                row.update(targets=n, fwd_us_per_target=_per_target_us(fwd, base_fwd, n),
                           step_us_per_target=_per_target_us(stp, base_step, n))
            if lib in ("ours", "peft"):
                cfg = setup.config(name)
                per_tok, per_call = adapters.added_macs(name, cfg, setup.target_layers(cfg))
                row.update(macs_per_token=per_tok, macs_per_call=per_call,
                           macs_pct=100 * per_tok / base_macs, config=cfg.to_dict() if lib == "ours" else None)
            if lib == "ours" and "peft:" + name in times:
                ratio, q1, q3 = _median_ratio(stp, [s for _, s in times["peft:" + name]])
                row.update(ratio_vs_peft=ratio, ratio_q1=q1, ratio_q3=q3,
                           fwd_ratio_vs_peft=_median_ratio(fwd, [f for f, _ in times["peft:" + name]])[0])
                peft_extra = saved["peft:" + name] - saved["base"]
                if peft_extra > 0:
                    row["saved_ratio_vs_peft"] = (saved[key] - saved["base"]) / peft_extra
            if lib != "base":
                row.update(checkpoint(setup, lib, built[key]))
            if p["memory"] and setup.device.startswith("cuda"):
                row.update(cuda_peak(built[key], setup.batch))
            elif p["memory"]:
                row.update(peak_memory({"kind": kind, **shape, "n_calib": p["n_calib"], "rank": p["rank"],
                                        "threads": p["threads"], "lib": lib, "name": name,
                                        "dtype": p.get("dtype", "float32")}))
            rows.append(row)
            save(out)
            log(_summary(kind, row))
        del built
    return out


def _summary(kind: str, row: dict) -> str:
    """One console line; every number says what it is. Times are medians over repeats; the
    ratios are medians of per-repeat paired ratios, so they need not equal the ratio of the
    printed medians (the base row's median comes from other repeats' noise)."""
    parts = [f"{kind:6s} {row['lib']:5s} {row['variant'] or '':16s} median step {row['step_ms']:8.1f} ms"]
    if "step_overhead_pct" in row:
        parts.append(f"over base {row['step_overhead_pct']:+.0f}% (paired ratio)")
    if "ratio_vs_peft" in row:
        parts.append(f"ours/PEFT step {row['ratio_vs_peft']:.2f} (paired ratio)")
    if "peak_over_model_mb" in row:
        parts.append(f"peak memory +{row['peak_over_model_mb']:.0f} MB")
    if "saved_over_base_mb" in row:
        parts.append(f"saved for backward +{row['saved_over_base_mb']:.1f} MiB over base")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_bench cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", help="comma-separated: minilm, qwen, tiny, tiny64 (default minilm,qwen; "
                    "--quick: tiny,minilm)")
    ap.add_argument("--variants", help="comma-separated variant names (default: every known one)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--n-calib", type=int, default=4, help="calibration batches (the timing batch shape)")
    ap.add_argument("--layers", type=int, help="decoder blocks of the qwen model (default 2; "
                    "Qwen3-0.6B has 28)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                    help="dtype of the base model (adapter tensors keep their config dtype)")
    ap.add_argument("--name", help="JSON file stem under --out (default cost, --quick: cost_quick)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 by default: on a shared 2-core machine more threads oversubscribe)")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process peak-RSS rows")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--skip-peft", help="comma-separated variants without a PEFT row (e.g. eva: PEFT's "
                    "EVA init cycles the data until its components settle, with no iteration cap)")
    ap.add_argument("--quick", action="store_true", help="toy sizes, lora + ia3, 3 repeats")
    ap.add_argument("--out", default="results")
    ap.add_argument("--update", action="store_true",
                    help="keep the other models already in the JSON; re-measure only --models")
    ap.add_argument("--coefficients", action="store_true",
                    help="time ll.scaled with a float c against coefficient tensors (and the gain "
                         "family's coeff) instead of the C1 rows; writes <out>/<name or cost_coefficients>.json")
    ap.add_argument("--memory-child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.memory_child:
        print(json.dumps(memory_child(json.loads(a.memory_child))))
        return 0

    torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    shapes = QUICK if a.quick else DEFAULTS
    a.models = a.models or ("tiny,minilm" if a.quick else "minilm,qwen")
    if a.quick:
        a.variants = a.variants or "lora,ia3"
        a.repeats, a.warmup = min(a.repeats, 3), 1
    p = {"rank": a.rank, "repeats": a.repeats, "warmup": a.warmup, "n_calib": a.n_calib,
         "threads": a.threads, "memory": not a.no_memory, "peft": not a.no_peft,
         "skip_peft": parse_list(a.skip_peft),
         "variants": parse_list(a.variants), "quick": a.quick, "device": a.device, "dtype": a.dtype,
         "timing": "training forward (grad on, train mode) and forward+backward of mean(out²); "
                   "medians over interleaved repeats; ratios = medians of paired per-repeat ratios",
         "memory_method": ("in process: torch.cuda.max_memory_allocated over one training step with "
                           "AdamW, reset before each row's step; +MB = peak minus what was allocated "
                           "before the step" if a.device.startswith("cuda") else
                           "fresh process per row: resident high-water mark (reset after loading the "
                           "base) over attach + one training step with AdamW; +MB = peak minus the "
                           "resident size with the base loaded")}
    name = a.name or ("cost_quick" if a.quick else "cost_coefficients" if a.coefficients else "cost")
    path = Path(a.out) / f"{name}.json"
    kinds = parse_list(a.models)
    if a.coefficients:
        models_out = []
        for kind in kinds:
            shape = dict(shapes.get(kind) or DEFAULTS[kind])
            for k in ("batch_size", "seq_len") + (("layers",) if kind != "minilm" else ()):
                if getattr(a, k):
                    shape[k] = getattr(a, k)
            models_out.append(run_coefficients(kind, shape, p))
            write_json(path, {"env": environment(), "protocol": p, "models": models_out})
        print(f"wrote {path}")
        return 0
    kept = [m for m in (read_json(path) or {}).get("models", []) if m["kind"] not in kinds] if a.update else []
    results = {"env": environment(), "protocol": p, "models": kept}
    for kind in kinds:
        shape = dict(shapes.get(kind) or DEFAULTS[kind])
        for k in ("batch_size", "seq_len") + (("layers",) if kind != "minilm" else ()):
            if getattr(a, k):
                shape[k] = getattr(a, k)
        done = list(results["models"])
        run_model(kind, shape, p, save=lambda partial: write_json(path, {**results, "models": done + [partial]}))
        results = read_json(path)
    # a model kept by --update and the ones measured now, in the usual column order
    order = list(DEFAULTS)
    results["models"].sort(key=lambda m: order.index(m["kind"]) if m["kind"] in order else len(order))
    write_json(path, results)
    from . import report

    report.write_cost_file(Path(a.out), name)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
