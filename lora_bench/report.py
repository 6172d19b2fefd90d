"""Tables and plots from the benchmark JSON; the result blocks of docs/benchmarks.md are generated here.

    python -m lora_bench report            rewrite results/*.md, results/quality.png and the doc's blocks
    python -m lora_bench report --check    exit 1 if the doc's blocks differ from what the JSON renders

The blocks sit between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` markers in the
page `--doc` names (docs/benchmarks.md by default) and are never edited by hand. A block in
OPTIONAL_BLOCKS is rendered only where its markers exist.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from pathlib import Path

from .common import read_json
from .steer_report import steer_markdown, write_steer_file

ROOT = Path(__file__).resolve().parents[1]
FRONTIER = read_json(ROOT / "results" / "frontier_grid.json")["frontier"]  # the frontier's row
OPTIONAL_BLOCKS = {"frontier", "frontier-claim", "frontier-steering"}  # results/frontier.md stands alone until a doc has markers
DOCS = (ROOT / "docs" / "benchmarks.md", ROOT / "README.md")  # where the generated blocks live
ANCHOR_LABELS = {"head": "head-only", "full": "full fine-tune", "peft:lora": "PEFT LoRA"}


def _label(row: str) -> str:
    return ANCHOR_LABELS.get(row) or (f"PEFT {row[5:]}" if row.startswith("peft:") else row)


def _sci(x: float) -> str:
    """1e-3, 5e-4; a second digit only where one is not exact (1.2e-3, an edge extension)."""
    m, e = f"{x:.0e}".split("e")
    if float(f"{m}e{e}") != x:
        m, e = f"{x:.1e}".split("e")
    return f"{m}e{int(e)}"


def _count(n: int) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.2f}M"
    if n >= 1e4:
        return f"{n / 1e3:.1f}K"
    return f"{n:,}"


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---- C2 quality -------------------------------------------------------------------------------

def _knob_text(knobs: dict | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in (knobs or {}).items())


def _runs_by_arm(data: dict, requested_first: bool = False) -> dict[str, list[dict]]:
    """{arm id: its runs (one per seed)}, arms in the benchmark's canonical row order (anchors,
    then the variant table; arms of one row in the order they were requested), or with
    `requested_first` in the order the arms were requested, whatever order the runs were
    appended in; unknown rows last."""
    from .adapters import settings
    from .arms import ANCHORS, arm_id

    order = {row: i for i, row in enumerate([*ANCHORS, *settings()])}
    requested = {a: i for i, a in enumerate(data.get("arms", []))}
    by_arm: dict[str, list[dict]] = {}
    for r in data["runs"]:
        key = arm_id(r["row"], r.get("knobs") or {}, r["lr"], r["steps"], r.get("schedule", "constant"),
                     r.get("warmup_steps", 0))
        by_arm.setdefault(key, []).append(r)
    def key(kv):
        row, req = order.get(kv[1][0]["row"], len(order)), requested.get(kv[0], len(requested))
        return (req, row) if requested_first else (row, req)

    return dict(sorted(by_arm.items(), key=key))


def _runs_by_row(data: dict) -> dict[str, list[dict]]:
    """{row: its runs}, rows in canonical order (the sweep table: one row, many lrs)."""
    by_row: dict[str, list[dict]] = {}
    for runs in _runs_by_arm(data).values():
        by_row.setdefault(runs[0]["row"], []).extend(runs)
    return by_row


def _schedule(r: dict) -> str:
    from .arms import schedule_label

    return schedule_label(r.get("schedule", "constant"), r.get("warmup_steps", 0))


def quality_rows(data: dict, requested_first: bool = False) -> list[dict]:
    """One summary per arm, in canonical order: mean/std accuracy over seeds, params, time."""
    out = []
    for arm, runs in _runs_by_arm(data, requested_first).items():
        accs = [r["acc"] for r in runs]
        row = runs[0]["row"]
        out.append({
            "row": row, "arm": arm, "knobs": runs[0].get("knobs") or {}, "family": runs[0]["family"],
            "lr": runs[0]["lr"], "steps": runs[0]["steps"], "schedule": _schedule(runs[0]), "n": len(runs),
            "seeds": [r["seed"] for r in runs], "accs": accs,
            "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "params": runs[0]["params"], "head_params": runs[0]["head_params"],
            "train_s": statistics.fmean(r["train_s"] for r in runs),
            "init_s": statistics.fmean(r["init_s"] for r in runs),
            "lib": "PEFT" if row.startswith("peft:") else ("anchor" if row in ("head", "full") else "lora-lite"),
        })
    head = next((s for s in out if s["row"] == "head"), None)
    for s in out:
        # "beats head-only": the mean gain exceeds the larger of the two seed spreads; no verdict
        # while either side has a single seed (no spread to compare with)
        s["beats_head"] = None if head is None or s is head or min(s["n"], head["n"]) < 2 else (
            s["mean"] - head["mean"] > max(s["std"], head["std"]))
    return out


def _arm_label(s: dict, many: set[str]) -> str:
    """Row name (code-formatted for our variants) plus what distinguishes its arm in this file."""
    label = f"`{s['row']}`" if s["lib"] == "lora-lite" else _label(s["row"])
    extra = [_knob_text(s["knobs"])] if s["knobs"] else []
    extra += [f"{s['steps']} steps"] if "steps" in many else []
    extra += [s["schedule"]] if "schedule" in many else []
    return label + (f" ({'; '.join(extra)})" if extra else "")


def _varying(summary: list[dict]) -> set[str]:
    return {k for k in ("steps", "schedule") if len({s[k] for s in summary}) > 1}


def quality_markdown(data: dict) -> str:
    p = data["protocol"]
    rows, summary = [], quality_rows(data)
    many = _varying(summary)
    for s in summary:
        beats = {None: "", True: "yes", False: "**no**"}[s["beats_head"]]
        rows.append([_arm_label(s, many), s["lib"],
                     _sci(s["lr"]), _count(s["params"] + s["head_params"]),
                     f"{s['mean']:.3f} ± {s['std']:.3f}", f"{s['train_s']:.0f}", beats])
    seeds = "/".join(sorted({str(s["n"]) for s in summary}))
    head = ["row", "library", "lr", "trainable params", f"accuracy (mean ± std, {seeds} seeds)",
            "train s", "beats head-only"]
    steps = "/".join(str(x) for x in sorted({s["steps"] for s in summary}))
    sched = "/".join(sorted({s["schedule"] for s in summary}))
    sched = "" if sched == "constant" else f" ({sched} lr schedule)"
    note = (f"MiniLM-L6, task `{p['task']}`, {steps} steps{sched} × batch {p['batch_size']}, "
            f"{p['n_train']} train / {p['n_test']} held-out sentences, rank {p['rank']} "
            f"(SVD-steering family: larger r, see `lora_bench/adapters.py`), head lr {_sci(p['head_lr'])}; "
            f"trainable params include the {summary[0]['head_params']}-parameter head. "
            f"\"beats head-only\": mean gain larger than the larger of the two seed std devs. Train "
            f"seconds are wall time on a shared machine (noise; C1 has the cost ratios). "
            f"{data['env']['cpu_count']}-core {data['env']['cpu']}, torch {data['env']['torch']}.\n\n")
    return note + _table(head, rows, "llrrrrl") + diagnosis_markdown(data)


def sweep_markdown(data: dict) -> str:
    from .arms import best_lrs, family

    best = best_lrs(data)
    by_row = _runs_by_row(data)
    rows = []
    for row, runs in by_row.items():
        cells = []
        for r in sorted(runs, key=lambda r: r["lr"]):
            cell = f"{_sci(r['lr'])}: {r['acc']:.3f}"
            cells.append(f"**{cell}**" if r["lr"] == best.get(family(row)) else cell)
        rows.append([_label(row), family(row), ", ".join(cells)])
    p = data["protocol"]
    note = (f"One seed ({data['runs'][0]['seed']}), {data['runs'][0]['steps']} steps × batch {p['batch_size']}, "
            f"accuracy on a held-out set re-sampled with that seed. Bold = the lr chosen for the "
            f"row's family: best mean accuracy over the family's rows (ties to the smaller lr).\n\n")
    return note + _table(["row", "lr family", "lr: accuracy"], rows, "lll")


def quality_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = quality_rows(data)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {"anchor": "tab:gray", "PEFT": "tab:orange", "lora-lite": "tab:blue"}
    # rows with (nearly) the same parameter count are spread sideways so their error bars stay
    # readable; the spread is a few percent on the log axis and the labels give the rows
    clusters: dict[int, list[dict]] = {}
    for s in rows:
        clusters.setdefault(round(20 * math.log10(s["params"] + s["head_params"])), []).append(s)
    placed: list[tuple[float, float, float]] = []  # (log10 x from, to, y) of the labels drawn
    for members in clusters.values():
        for k, s in enumerate(members):
            x = (s["params"] + s["head_params"]) * 1.15 ** (k - (len(members) - 1) / 2)
            ax.errorbar(x, s["mean"], yerr=s["std"], fmt="o", capsize=3, color=colors[s["lib"]],
                        label=s["lib"])
            # a label that would overlap one already drawn nearby moves up, with a leader line
            # (a character of 8-pt text spans about 0.04 decades of this axis)
            label, y = _label(s["row"]), s["mean"] + 0.006
            lo = math.log10(x * 1.1)
            hi = lo + 0.04 * len(label)
            while any(lo < b and a < hi and abs(y - ly) < 0.016 for a, b, ly in placed):
                y += 0.016
            placed.append((lo, hi, y))
            moved = y - s["mean"] > 0.01
            ax.annotate(label, (x, s["mean"]), xytext=(x * 1.1, y), fontsize=8,
                        arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.5"} if moved else None)
    head = next((s for s in rows if s["row"] == "head"), None)
    if head:
        ax.axhline(head["mean"], color="tab:gray", ls="--", lw=0.8)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), loc="lower right")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (adapter + 770-parameter head), log scale; "
                  "rows with equal counts are spread sideways")
    ax.set_ylabel(f"held-out accuracy (mean ± std over {rows[0]['n']} seeds)")
    p = data["protocol"]
    steps = "/".join(str(x) for x in sorted({s["steps"] for s in rows}))
    ax.set_title(f"MiniLM-L6 on '{p['task']}': {steps} steps × {p['batch_size']}; dashed = head-only")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def diagnosis_markdown(data: dict) -> str:
    """Last-logged diagnostics per arm (means over seeds), for runs made with --diagnose."""
    from .diagnose import summary

    lines = []
    for arm, runs in _runs_by_arm(data).items():
        diags = [summary(r["diag"]) for r in runs if r.get("diag") and r["diag"]["steps"]]
        if not diags:
            continue

        def mean(key, sub=None):
            vals = [(d.get(sub) or {}).get(key) if sub else d.get(key) for d in diags]
            vals = [v for v in vals if v is not None]
            return statistics.fmean(vals) if vals else None

        grads = sorted({k for d in diags for k in d["grad"]})
        scalars = sorted({k for d in diags for k in d if k not in ("step", "grad", "dw_mean", "dw_max", "topr")})
        lines.append([f"`{arm}`", str(diags[0]["step"]), _opt(mean("dw_mean"), ".2e"), _opt(mean("dw_max"), ".2e"),
                      _opt(mean("topr"), ".2f"),
                      ", ".join(f"{g} {mean(g, 'grad'):.2e}" for g in grads),
                      ", ".join(f"{k} {mean(k):.3g}" for k in scalars if mean(k) is not None)])
    if not lines:
        return ""
    note = ("\n**Diagnostics at the last logged step** (means over seeds; lora_bench/diagnose.py): ‖ΔW‖_F/‖W‖_F "
            "mean and max over target layers, the share of ‖ΔW‖ inside W's own top-r singular subspaces, "
            "gradient norms per trainable family, variant state.\n\n")
    return note + _table(["arm", "step", "ΔW/W mean", "ΔW/W max", "top-r share", "‖grad‖", "state"], lines,
                         "lrrrrll")


def rerun_markdown(before: dict, after: dict, name: str = "quality_rerun") -> str:
    """Before → after: every arm of a rerun (`results/<name>.json`, e.g. `quality_rerun`: longer
    budget, other lrs and knobs) beside its row's result in the C2 table (`before`: the row's bench
    setting), with each seed's accuracy, the mean ‖ΔW‖/‖W‖ at the last logged step (a column only
    when a run logged it, `--diagnose`) and the head-only verdict."""
    from .diagnose import summary as diag_summary

    old = {s["row"]: s for s in quality_rows(before)}
    runs_by_arm = _runs_by_arm(after)
    rows, shown = [], set()
    summaries = quality_rows(after)
    many = _varying(summaries)
    for s in summaries:
        b = old.get(s["row"]) if s["row"] not in shown else None
        shown.add(s["row"])
        dws = [diag_summary(r["diag"])["dw_mean"] for r in runs_by_arm[s["arm"]]
               if r.get("diag") and r["diag"]["steps"]]
        beats = {None: "", True: "yes", False: "**no**"}[s["beats_head"]]
        rows.append([
            _arm_label(s, many),
            f"{b['mean']:.3f} ± {b['std']:.3f} (lr {_sci(b['lr'])})" if b else "",
            _sci(s["lr"]), f"{s['mean']:.3f} ± {s['std']:.3f} ({s['n']})",
            ", ".join(f"{acc:.3f}" for _, acc in sorted(zip(s["seeds"], s["accs"]))),
            _opt(statistics.fmean(dws) if dws else None, ".3f"), beats])
    r0, b0 = after["runs"][0], before["runs"][0]
    diag = any(r[5] != "—" for r in rows)
    note = (f"Before: the C2 table above ({b0['steps']} steps, {_schedule(b0)} lr, the row's bench setting, "
            f"first line of each row). After: `results/{name}.md`, {r0['steps']} steps, {_schedule(r0)} lr "
            f"schedule, device {r0.get('device', 'cpu')} ({after['env'].get('cuda') or after['env']['cpu']}); "
            f"accuracies per seed in seed order; "
            + ("ΔW/W = ‖W_eff − W‖_F/‖W‖_F at the last step, mean over target layers and seeds; " if diag else "")
            + "\"beats head-only\" as in the C2 table, against this run's head-only.\n\n")
    head = ["row (knobs)", f"{b0['steps']} steps: mean ± std", "lr", f"{r0['steps']} steps: mean ± std (seeds)",
            "per seed", "ΔW/W", "beats head-only"]
    if not diag:
        head, rows = head[:5] + head[6:], [r[:5] + r[6:] for r in rows]
    return note + _table(head, rows, "lrrrrrl" if diag else "lrrrrl")


def _steps_together(a: list[float], b: list[float], tol: float) -> int:
    """How many steps, from the first, two logged training-loss curves stay within tol."""
    return next((t for t, (x, y) in enumerate(zip(a, b)) if abs(x - y) > tol), min(len(a), len(b)))


def peft_pairs_markdown(data: dict, tol: float = 1e-3) -> str | None:
    """Each PEFT row beside our row of the same method, lr and knobs, seed by seed: test accuracy
    and how long the two training-loss curves stay within `tol` of each other (same seed: the same
    data order and head init; PEFT's row starts from our adapter tensors, `quality.prepare`).
    None when the file has no such pair."""
    summaries = quality_rows(data)
    ours = {(s["row"], s["lr"], s["steps"], tuple(sorted(s["knobs"].items()))): s
            for s in summaries if s["lib"] == "lora-lite"}
    curves = {(r["row"], r["lr"], r["steps"], r["seed"]): r.get("curve") for r in data["runs"]}
    rows = []
    for p in (s for s in summaries if s["lib"] == "PEFT"):
        o = ours.get((p["row"][5:], p["lr"], p["steps"], tuple(sorted(p["knobs"].items()))))
        seeds = sorted(set(p["seeds"]) & set(o["seeds"])) if o else []
        if not seeds:
            continue
        acc_o, acc_p = dict(zip(o["seeds"], o["accs"])), dict(zip(p["seeds"], p["accs"]))
        departs = []
        for seed in seeds:
            co, cp = curves.get((o["row"], o["lr"], o["steps"], seed)), curves.get((p["row"], p["lr"], p["steps"], seed))
            if co and cp:
                n, end = _steps_together(co["loss"], cp["loss"], tol), min(len(co["loss"]), len(cp["loss"]))
                departs.append(f"all {n}" if n == end else str(n))
            else:
                departs.append("—")
        rows.append([f"`{o['row']}`" + (f" ({_knob_text(o['knobs'])})" if o["knobs"] else ""), _sci(p["lr"]),
                     ", ".join(f"{acc_o[s]:.3f}" for s in seeds), ", ".join(f"{acc_p[s]:.3f}" for s in seeds),
                     f"{statistics.fmean(acc_o[s] - acc_p[s] for s in seeds):+.3f}",
                     str(sum(acc_o[s] == acc_p[s] for s in seeds)) + f" of {len(seeds)}", ", ".join(departs)])
    if not rows:
        return None
    r0 = data["runs"][0]
    note = (f"Ours against PEFT on the same runs: {r0['steps']} steps, {_schedule(r0)} lr, the same lr and seed (data "
            f"order, head init); PEFT's row starts from our row's adapter tensors, copied into its slots "
            f"(`copy_to_peft`; EVA keeps PEFT's own data-driven init). Per seed in seed order. \"Loss within "
            f"{tol:g}\" = the number of steps, from the first, whose logged training losses (4 decimals) stay within "
            f"{tol:g} of PEFT's before the first that does not.\n\n")
    head = ["method", "lr", "ours: test acc per seed", "PEFT: test acc per seed", "ours − PEFT (mean)",
            "seeds with equal acc", f"steps with loss within {tol:g}"]
    return note + _table(head, rows, "lrrrrrr")


def curves_plot(data: dict, path: Path) -> bool:
    """Training loss (moving average over 10 steps) and held-out accuracy against the step, one
    line per arm (mean over seeds). False when no run has a curve."""
    arms = {arm: [r for r in runs if r.get("curve")] for arm, runs in _runs_by_arm(data).items()}
    arms = {a: runs for a, runs in arms.items() if runs}
    if not arms:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 5.5 + 0.2 * ((len(arms) + 2) // 3)))
    cmap = plt.get_cmap("tab20")
    # words every arm id shares (steps, schedule) go to the title, not the legend
    words = [arm.split(" ") for arm in arms]
    common = set(words[0][1:]).intersection(*(w[1:] for w in words)) if len(arms) > 1 else set()
    for i, (arm, runs) in enumerate(arms.items()):
        color = cmap(i % 20)
        n = min(len(r["curve"]["loss"]) for r in runs)
        loss = [statistics.fmean(r["curve"]["loss"][t] for r in runs) for t in range(n)]
        w = 10
        smooth = [statistics.fmean(loss[max(0, t - w + 1): t + 1]) for t in range(n)]
        label = " ".join(x for x in arm.split(" ") if x not in common and x != "constant") + f" ({len(runs)} seeds)"
        ax_loss.plot(range(n), smooth, color=color, lw=1, label=label)
        steps = runs[0]["curve"].get("eval_steps") or []
        if steps and all(r["curve"].get("eval_steps") == steps for r in runs):
            acc = [statistics.fmean(r["curve"]["eval_acc"][k] for r in runs) for k in range(len(steps))]
            ax_acc.plot(steps, acc, "o-", ms=3, color=color, lw=1, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (mean over seeds, 10-step moving average)")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel(f"held-out accuracy on the first {data.get('eval_n', 250)} test sentences")
    for ax in (ax_loss, ax_acc):
        ax.grid(True, alpha=0.3)
    ax_acc.axhline(0.5, color="tab:gray", ls="--", lw=0.8)
    handles, labels = ax_loss.get_legend_handles_labels()
    rows = (len(arms) + 2) // 3
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(3, len(arms)), frameon=False)
    shared = " ".join(x for x in words[0][1:] if x in common)
    fig.suptitle(f"MiniLM-L6 on '{data['protocol']['task']}': training curves" + (f" ({shared})" if shared else ""))
    fig.tight_layout(rect=(0, 0.035 * rows + 0.02, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---- steering ----------------------------------------------------------------------------------

def steering_rows(data: dict) -> list[dict]:
    """Per arm with a steering record: mean held-out accuracy over seeds at each coefficient,
    through ll.scaled ("scaled") and, where the variant has it, its run-time coeff ("coeff")."""
    out = []
    for arm, runs in _runs_by_arm(data).items():
        runs = [r for r in runs if r.get("steer")]
        if not runs:
            continue
        for how in ("scaled", "coeff"):
            if how not in runs[0]["steer"]:
                continue
            cols = list(zip(*(r["steer"][how] for r in runs)))
            accs = [None if None in col else statistics.fmean(col) for col in cols]
            out.append({"arm": arm, "row": runs[0]["row"], "knobs": runs[0].get("knobs") or {}, "lr": runs[0]["lr"],
                        "steps": runs[0]["steps"], "schedule": _schedule(runs[0]), "n": len(runs), "how": how,
                        "coeffs": runs[0]["steer"]["coeffs"], "accs": accs})
    return out


def steering_markdown(data: dict) -> str:
    """Accuracy against the steering coefficient; "reversal" = acc(−1) − acc(0), the push the
    reversed adapter gives (negative: the other way), beside acc(+1) − acc(0)."""
    rows_ = steering_rows(data)
    if not rows_:
        return ""
    coeffs = rows_[0]["coeffs"]
    many = {k for k in ("steps", "schedule") if len({s[k] for s in rows_}) > 1}
    i0, ip, im = coeffs.index(0.0), coeffs.index(1.0), coeffs.index(-1.0)
    rows = []
    for s in rows_:
        a = s["accs"]
        extra = [_knob_text(s["knobs"])] if s["knobs"] else []
        extra += [f"{s['steps']} steps"] if "steps" in many else []
        extra += [s["schedule"]] if "schedule" in many else []
        label = f"`{s['row']}`" + (f" ({'; '.join(extra)})" if extra else "")
        diff = lambda j: "—" if a[j] is None else f"{a[j] - a[i0]:+.3f}"  # noqa: E731
        rows.append([label, _sci(s["lr"]), "`ll.scaled`" if s["how"] == "scaled" else "`coeff`", str(s["n"]),
                     *("—" if x is None else f"{x:.3f}" for x in a), diff(ip), diff(im)])
    r0 = data["runs"][0]
    note = (f"Held-out accuracy ({data['protocol']['n_test']} sentences) of each trained arm at steering "
            f"coefficient c, mean over seeds: `ll.scaled` gives y + c·Δy at every target (every variant); "
            f"`coeff` sets the config's run-time coefficient to c times its trained value (the AntiPaSTO "
            f"family: S ⊙ (1 + ELU(c·g)), not linear in c). c = 0 is the base encoder with the trained "
            f"head (bit-exact, tests/test_variants.py). Training: {r0['steps']} steps, {_schedule(r0)}.\n\n")
    head = ["arm", "lr", "via", "seeds", *(f"c = {c:g}" for c in coeffs), "acc(+1) − acc(0)", "acc(−1) − acc(0)"]
    return note + _table(head, rows, "lrlr" + "r" * (len(coeffs) + 2))


def steering_plot(data: dict, path: Path) -> bool:
    rows_ = steering_rows(data)
    if not rows_:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    cmap = plt.get_cmap("tab10")
    colors = {}
    for s in rows_:
        color = colors.setdefault(s["arm"], cmap(len(colors) % 10))
        pts = [(c, a) for c, a in zip(s["coeffs"], s["accs"]) if a is not None]
        ax.plot(*zip(*pts), "o-" if s["how"] == "scaled" else "s--", color=color, ms=4, lw=1.2,
                label=f"{s['row']}{' ' + _knob_text(s['knobs']) if s['knobs'] else ''} lr {_sci(s['lr'])} "
                      f"({'ll.scaled' if s['how'] == 'scaled' else 'coeff'})")
    ax.axhline(0.5, color="tab:gray", ls=":", lw=0.8)
    ax.axvline(0.0, color="tab:gray", ls=":", lw=0.8)
    ax.set_xlabel("steering coefficient c (0 = base encoder + trained head)")
    ax.set_ylabel("held-out accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"MiniLM-L6 on '{data['protocol']['task']}': steering both ways")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- ablations ----------------------------------------------------------------------------------

def seed_gsm8k(results: Path) -> dict[tuple[str, str], float]:
    """{(row, knob text): GSM8K %} of the seed's single-seed results (results/seed_gsm8k.json)."""
    data = read_json(results / "seed_gsm8k.json") or {"arms": []}
    return {(a["row"], a["knobs"]): a["gsm8k"] for a in data["arms"]}


T_975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # df -> t


def ablation_markdown(name: str, data: dict, seed_results: dict[tuple[str, str], float] | None = None) -> str:
    """One ablation: per arm mean ± std over seeds, the paired difference to the first arm
    (mean ± std of per-seed differences, t = mean / (std/√n)), init time and the seed's GSM8K
    result of the same arm (`seed_gsm8k`)."""
    summary = quality_rows(data, requested_first=True)  # the first requested arm is the reference
    if not summary:
        return ""
    ref = summary[0]
    rows = []
    for s in summary:
        seed = (seed_results or {}).get((s["row"], _knob_text(s["knobs"])))
        if s is ref:
            diff, t, sig = "(reference)", "", ""
        else:
            pairs = dict(zip(ref["seeds"], ref["accs"]))
            d = [acc - pairs[seed_] for seed_, acc in zip(s["seeds"], s["accs"]) if seed_ in pairs]
            if len(d) > 1:
                m, sd = statistics.fmean(d), statistics.stdev(d)
                tval = m / (sd / math.sqrt(len(d))) if sd > 0 else math.inf * (1 if m >= 0 else -1)
                diff, t = f"{m:+.3f} ± {sd:.3f} (n={len(d)})", f"{tval:+.2f}"
                sig = "yes" if abs(tval) > T_975.get(len(d) - 1, 1.96) else "no"
            else:
                diff, t, sig = "—", "", ""
        rows.append([_arm_label(s, _varying(summary)), f"{s['mean']:.3f} ± {s['std']:.3f}", str(s["n"]), diff, t, sig,
                     f"{s['init_s']:.2f}", f"{s['train_s']:.0f}", _opt(seed, ".1f")])
    p, r0 = data["protocol"], data["runs"][0]
    env = data["env"]
    note = (f"**{name}**: {r0['steps']} steps ({_schedule(r0)}, lr {_sci(ref['lr'])}) × batch {p['batch_size']}, "
            f"rank {p['rank']} setting, seeds {','.join(str(x) for x in ref['seeds'])} (paired: same data order "
            f"and init RNG per seed), device {r0.get('device', 'cpu')}, {env.get('cuda') or env['cpu']}. "
            f"Difference = this arm − the first arm, per seed; \"beyond noise\" = |t| above the two-sided 95% "
            f"t quantile for n−1 degrees of freedom. Init s = attach time (SVDs, calibration). Seed GSM8K % = "
            f"the seed's single-seed result for the same arm on Qwen3.5-0.8B / GSM8K.\n\n")
    head = ["arm", "accuracy (mean ± std)", "seeds", "paired difference (mean ± std)", "t", "beyond noise",
            "init s", "train s", "seed GSM8K %"]
    return note + _table(head, rows, "lrrrrlrrr")


def ablations(results: Path) -> str | None:
    files = sorted(results.glob("ablation_*.json"))
    seed = seed_gsm8k(results)
    parts = [ablation_markdown(f.stem.removeprefix("ablation_"), read_json(f), seed) for f in files]
    parts = [x for x in parts if x]
    return "\n".join(parts) if parts else None


def write_quality_file(out: Path, name: str, *, sweep: bool = False) -> None:
    """name.md (table, diagnostics) and its plots; ablation files also rewrite ablations.md."""
    data = read_json(out / f"{name}.json")
    if not data or not data["runs"]:
        return
    if name.startswith("ablation_"):
        text = ablations(out)
        if text:
            (out / "ablations.md").write_text(text)
    else:
        (out / f"{name}.md").write_text((sweep_markdown if sweep else quality_markdown)(data))
        if not sweep:
            quality_plot(data, out / f"{name}.png")
        if steering_plot(data, out / f"{name}_steering.png"):
            (out / f"{name}_steering.md").write_text(steering_markdown(data))
    curves_plot(data, out / f"{name}_curves.png")


def write_quality(out: Path, *, sweep: bool = False, suffix: str = "") -> None:
    write_quality_file(out, f"quality{'_sweep' if sweep else ''}{suffix}", sweep=sweep)


# ---- C2 against trainable params (lora_bench.frontier) ------------------------------------------

FRACTION = 0.1  # "LoRA quality at a fraction of the parameters": under this share of the largest LoRA's


def frontier_summary(data: dict) -> list[dict]:
    """Per arm of the grid: params (measured where a run exists), the first seed's validation
    accuracy per lr (the grid's and any edge extension, `arms.first_seed_sweep`), the chosen lr (None
    until every one of them ran) and the test accuracy of every seed at it."""
    from .arms import MAX_EDGE_STEPS, first_seed_sweep, frontier_run, lr_of, run_id

    seeds, steps, warmup = data["seeds"], data["steps"], data["warmup_steps"]
    by_id = {run_id(r): r for r in data["runs"]}
    out = []
    for arm in data["grid"]:
        lrs, scores = first_seed_sweep(arm, data["runs"], seeds[0], steps, warmup)
        lr = lr_of(lrs, scores)
        runs = [] if lr is None else [by_id[i] for seed in seeds
                                      if (i := run_id(frontier_run(arm, lr, seed, steps, warmup))) in by_id]
        accs = [r["acc"] for r in runs]
        measured = {r["params"] for r in data["runs"] if r["row"] == arm["row"] and r["knobs"] == arm["knobs"]}
        capped = lr in (lrs[0], lrs[-1]) and len(lrs) == len(arm["lrs"]) + MAX_EDGE_STEPS
        out.append({**arm, "params": measured.pop() if len(measured) == 1 else arm["params"],
                    "scores": scores, "lr": lr, "capped": capped, "seeds": [r["seed"] for r in runs], "accs": accs,
                    "complete": len(runs) == len(seeds),
                    "mean": statistics.fmean(accs) if accs else None,
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0})
    return out


def seed_tolerance(f_mean: float, f_std: float, n_test: int | None) -> float:
    """How far one seed may sit from the frontier's mean and still read as "on" it: two of
    the frontier's seed stds, floored at two binomial standard errors of an accuracy measured
    on n_test sentences (a 3-seed std can come out near 0)."""
    se = math.sqrt(f_mean * (1 - f_mean) / n_test) if n_test else 0.0
    return 2 * max(f_std, se)


def frontier_position(lora: list[tuple[int, float, float]], params: int, accs: list[float],
                      n_test: int | None = None) -> dict:
    """Where an arm with per-seed test accuracies `accs` at `params` sits against the LoRA
    points (params, mean, std): the frontier's mean and std interpolated linearly in log10
    params, or outside its range the nearest end's. Each seed reads "above" / "below" when it
    is more than `seed_tolerance` from that mean, else "on"; the arm is "above" or "below" when
    every seed is, "on" when no seed is below and not all are above, else "mixed" (some seeds
    on or above, some below), so one collapsed seed cannot hide inside a wide std."""
    pts = sorted(lora)
    xs = [math.log10(p) for p, _, _ in pts]
    x = math.log10(params)
    if xs[0] <= x <= xs[-1]:
        i = max(j for j in range(len(pts)) if xs[j] <= x)
        k = min(i + 1, len(pts) - 1)
        t = 0.0 if xs[k] == xs[i] else (x - xs[i]) / (xs[k] - xs[i])
        f_mean = pts[i][1] + t * (pts[k][1] - pts[i][1])
        f_std = pts[i][2] + t * (pts[k][2] - pts[i][2])
        side, between = None, (i, k)
    else:
        end = 0 if x < xs[0] else len(pts) - 1
        _, f_mean, f_std = pts[end]
        side, between = ("fewer" if end == 0 else "more"), (end, end)
    tol = seed_tolerance(f_mean, f_std, n_test)
    each = ["above" if a - f_mean > tol else "below" if f_mean - a > tol else "on" for a in accs]
    below, above = each.count("below"), each.count("above")
    verdict = ("above" if above == len(each) else "below" if below == len(each)
               else "on" if below == 0 else "mixed")
    return {"verdict": verdict, "side": side, "between": between, "frontier_mean": f_mean,
            "frontier_std": f_std, "diff": statistics.fmean(accs) - f_mean, "tol": tol,
            "below": below, "above": above, "n": len(each)}


def _pm(mean: float, std: float) -> str:
    return f"{mean:.3f} ± {std:.3f}"


def _seeds_said(pos: dict, accs: list[float]) -> str:
    """'difference +0.004; every seed within ±0.016' or '1 of 3 seeds more than 0.016 below'."""
    tol = f"{pos['tol']:.3f}"
    parts = [f"difference {pos['diff']:+.3f}"]
    if pos["below"] == 0 and pos["above"] == 0:
        parts.append(f"every seed within ±{tol}")
    for side in ("below", "above"):
        if 0 < pos[side]:
            lo = min(accs) if side == "below" else max(accs)
            parts.append(f"{pos[side]} of {pos['n']} seeds more than {tol} {side} "
                         f"({'lowest' if side == 'below' else 'highest'} {lo:.3f})")
    return "; ".join(parts)


def _cell(pos: dict) -> str:
    return f"mixed ({pos['below']} of {pos['n']} seeds below)" if pos["verdict"] == "mixed" else pos["verdict"]


def frontier_statement(s: dict, lora: list[dict], n_test: int | None = None) -> tuple[str, str]:
    """(table cell, sentence) for one non-LoRA arm `s` against the finished LoRA arms `lora`:
    the cell is the verdict, or outside the frontier's range the verdict against its nearest end."""
    points = [(q["params"], q["mean"], q["std"]) for q in lora]
    pos = frontier_position(points, s["params"], s["accs"], n_test)
    ends = sorted(lora, key=lambda q: q["params"])
    v, said = pos["verdict"], _seeds_said(pos, s["accs"])
    me = f"`{s['label']}` ({_count(s['params'])} params, {_pm(s['mean'], s['std'])})"
    if pos["side"] is None:
        lo, hi = (ends[j]["label"] for j in pos["between"])
        where = f"between `{lo}` and `{hi}`" if lo != hi else f"at `{lo}`"
        return _cell(pos), (f"{me} is **{v}** {'against ' if v == 'mixed' else ''}the LoRA frontier: at equal params it reads "
                            f"{_pm(pos['frontier_mean'], pos['frontier_std'])} (interpolated in log10 params "
                            f"{where}; {said}).")
    end = ends[0] if pos["side"] == "fewer" else ends[-1]
    ratio = s["params"] / end["params"]
    head = (f"{me} is outside the frontier's range ({pos['side']} params than `{end['label']}`, "
            f"{_count(end['params'])}); against that nearest end ({_pm(end['mean'], end['std'])}) it is **{v}** "
            f"({said})")
    if pos["side"] == "fewer":
        tail = {"above": f": it beats the smallest LoRA with {ratio:.1%} of its params.",
                "on": f": as good as the smallest LoRA, with {ratio:.1%} of its params.",
                "mixed": f": some seeds match the smallest LoRA with {ratio:.1%} of its params, others fall "
                         "below it.",
                "below": ": no LoRA this small was run, so whether it is below the frontier at its own size "
                         "is not measured."}[v]
    else:
        tail = (f": better than every LoRA point, but with {ratio:.1f}x the largest one's params."
                if v == "above" else f": no better than the largest LoRA with {ratio:.1f}x its params.")
    return f"outside; {_cell(pos)} vs `{end['label']}`", head + tail


def fraction_claim(rows: list[dict], lora: list[dict], n_test: int | None = None) -> str:
    """Whether "LoRA quality at a fraction of the parameters" holds: an arm with fewer than
    FRACTION of the largest LoRA's params that is "on" or "above" that LoRA (no seed more than
    `seed_tolerance` below its mean)."""
    ref = max(lora, key=lambda q: q["params"])
    small = [s for s in rows if s["params"] < FRACTION * ref["params"]]
    at_ref = [(ref["params"], ref["mean"], ref["std"])]
    tol = seed_tolerance(ref["mean"], ref["std"], n_test)

    def verdict(accs):
        return frontier_position(at_ref, ref["params"], accs, n_test)["verdict"]

    def who(s):
        return f"`{s['label']}` ({s['params'] / ref['params']:.1%} of the params, {_pm(s['mean'], s['std'])})"

    intro = (f"**LoRA quality at a fraction of the parameters** (an arm with < {FRACTION:.0%} of "
             f"`{ref['label']}`'s {_count(ref['params'])} params none of whose seeds is more than {tol:.3f} "
             f"below its {ref['mean']:.3f}): ")
    hits = [s for s in small if verdict(s["accs"]) in ("on", "above")]
    mixed = [s for s in small if verdict(s["accs"]) == "mixed"]
    if hits:
        text = "holds for " + ", ".join(who(s) for s in hits) + "."
    elif small:
        best = max(small, key=lambda s: s["mean"])
        text = f"holds for no arm; the best under {FRACTION:.0%} is {who(best)}."
    else:
        text = f"no arm has fewer than {FRACTION:.0%} of its params."
    if mixed:
        text += " Some seeds but not all: " + ", ".join(
            f"{who(s)}, lowest seed {min(s['accs']):.3f}" for s in mixed) + "."
    own = [q for q in lora if q["params"] < FRACTION * ref["params"]]
    for q in own:  # the frontier's own small end is the baseline such a claim has to beat
        v = verdict(q["accs"])
        said = {"on": "holds it too", "above": "holds it too", "below": "does not",
                "mixed": "holds it on some seeds"}[v]
        text += f" For comparison, {who(q)} {said}."
    return intro + text


def frontier_verdicts(rows: list[dict], n_test: int) -> tuple[list[dict], dict[str, tuple[str, str]]]:
    """(the finished LoRA arms, {label: (cell, sentence)} for every other finished arm). Only
    finished arms (every seed at the chosen lr) are compared: one seed has no spread to read."""
    lora = [s for s in rows if s["row"] == FRONTIER and s["complete"]]
    if not lora:
        return [], {}
    return lora, {s["label"]: frontier_statement(s, lora, n_test)
                  for s in rows if s["row"] != FRONTIER and s["complete"]}


def frontier_claim_markdown(data: dict) -> str:
    """The README's short form of the frontier: the LoRA points and the SVD-family arms (the
    variants whose claim this tests) with their verdicts, then the fraction-of-parameters claim."""
    from .arms import members

    rows = frontier_summary(data)
    lora, verdicts = frontier_verdicts(rows, data["protocol"]["n_test"])
    svd = set(members("svd"))
    shown = sorted((s for s in rows if s["complete"] and (s["row"] == FRONTIER or s["row"] in svd)),
                   key=lambda s: s["params"])
    waiting = [s["label"] for s in rows if not s["complete"]]
    out = ["| arm | trainable params | test accuracy (3 seeds) | vs LoRA frontier at equal params |",
           "| --- | ---: | ---: | --- |"]
    out += [f"| `{s['label']}` | {s['params']:,} | {_pm(s['mean'], s['std'])} | "
            f"{'frontier' if s['row'] == FRONTIER else verdicts[s['label']][0]} |" for s in shown]
    text = "\n".join(out) + "\n"
    if lora:
        text += "\n" + fraction_claim([s for s in rows if s["row"] != FRONTIER and s["complete"]], lora,
                                      data["protocol"]["n_test"]) + "\n"
    if waiting:
        text += (f"\nNot finished (`python -m lora_bench frontier --jobs 2` resumes them): "
                 f"{', '.join(f'`{w}`' for w in waiting)}.\n")
    return text


def frontier_markdown(data: dict) -> str:
    from .arms import EDGE_FACTOR, FRONTIER_SCHEDULE, MAX_EDGE_STEPS

    p, env = data["protocol"], data["env"]
    rows = frontier_summary(data)
    lora, verdicts = frontier_verdicts(rows, p["n_test"])
    table = []
    for s in rows:
        tried = ", ".join(f"**{_sci(lr)}: {acc:.3f}**" if lr == s["lr"] else f"{_sci(lr)}: {acc:.3f}"
                          for lr, acc in sorted(s["scores"].items()))
        acc = f"{_pm(s['mean'], s['std'])} ({len(s['accs'])})" if s["mean"] is not None else "lr not chosen yet"
        where = "frontier" if s["row"] == FRONTIER else verdicts.get(s["label"], ("",))[0]
        chosen = "" if s["lr"] is None else _sci(s["lr"]) + (" (edge†)" if s["capped"] else "")
        table.append(f"| `{s['label']}` | {s['params']:,} | {acc} | {chosen} | {tried or '—'} | {where} |")
    r0, rest = data["runs"][0], ",".join(map(str, data["seeds"][1:])) or "—"
    note = (f"MiniLM-L6, task `{p['task']}`, {data['steps']} steps ({FRONTIER_SCHEDULE}, "
            f"{data['warmup_steps']} warm-up) × batch {p['batch_size']}; {p['n_train']} training sentences, "
            f"{p['n_val']} validation and {p['n_test']} test sentences, their operand pairs disjoint from each "
            f"other (`lora_lite.tasks`, val_fraction {p['val_fraction']}). Each arm's lr is chosen on the "
            f"validation accuracy of seed {data['seeds'][0]} (bold; ties to the smaller lr; when the best is at the "
            f"grid's edge, one lr {EDGE_FACTOR:g}x past it runs too, at most {MAX_EDGE_STEPS} times), and seeds {rest} run "
            f"at it besides; the test accuracy column is the only place the test split is read. Trainable "
            f"params: the adapter's (a {r0['head_params']}-parameter head trains in every arm besides). Device "
            f"{r0.get('device', 'cpu')} ({env.get('cuda') or env['cpu']}), torch {env['torch']}. "
            f"Plot: `results/{data.get('name', 'frontier')}.png`.\n\n")
    head = ("| arm | trainable params | test accuracy (mean ± std, seeds) | chosen lr | validation accuracy per lr "
            "(first seed) | vs LoRA frontier |\n| --- | ---: | ---: | ---: | --- | --- |\n")
    out = note + head + "\n".join(table) + "\n"
    if any(s["capped"] for s in rows):
        out += (f"\n† the best lr is still the edge after {MAX_EDGE_STEPS} extensions: this arm might do better "
                f"further out.\n")
    if verdicts:
        out += ("\n**Against the LoRA frontier** (its mean and seed std interpolated linearly in log10 params; "
                "a seed is above or below it when it is more than twice the frontier's seed std away, floored at two "
                "binomial standard errors of a test score; an arm is above or below when every seed is, on when no "
                "seed is below, mixed otherwise):\n\n")
        out += "".join(f"- {text}\n" for _, text in verdicts.values())
    if lora:
        out += "\n" + fraction_claim([s for s in rows if s["row"] != FRONTIER and s["complete"]], lora,
                                      p["n_test"]) + "\n"
    return out


def frontier_plot(data: dict, path: Path) -> bool:
    """Accuracy against trainable params (log10 axis): the LoRA frontier as a line, every other
    finished arm as a labelled marker, all with ±std error bars. False when nothing finished."""
    rows = [s for s in frontier_summary(data) if s["mean"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5.8))
    lora = sorted((s for s in rows if s["row"] == FRONTIER), key=lambda s: s["params"])
    if lora:
        ax.errorbar([s["params"] for s in lora], [s["mean"] for s in lora], yerr=[s["std"] for s in lora],
                    fmt="o-", color="black", capsize=3, lw=1.5, label="LoRA frontier")
        for s in lora:
            ax.annotate(f"r={s['size']}", (s["params"], s["mean"]), xytext=(4, -12), textcoords="offset points",
                        fontsize=8)
    others = [s for s in rows if s["row"] != FRONTIER]
    markers, cmap, styles = "sD^v<>pP*Xh", plt.get_cmap("tab10"), {}
    # arms with nearly equal counts (e.g. r = 256 gains and LoRA-XS r = 16) spread sideways and
    # stack their labels, so each stays readable; the table has the exact numbers
    clusters: dict[int, list[dict]] = {}
    for s in others:
        clusters.setdefault(round(20 * math.log10(s["params"])), []).append(s)
    for members in clusters.values():
        for k, s in enumerate(members):
            m, c = styles.setdefault(s["row"], (markers[len(styles) % len(markers)], cmap(len(styles) % 10)))
            x = s["params"] * 1.12 ** (k - (len(members) - 1) / 2)
            ax.errorbar(x, s["mean"], yerr=s["std"], fmt=m, color=c, capsize=3, ms=6, label=s["row"])
            ax.annotate(s["label"], (x, s["mean"]), xytext=(6, 4 + 10 * k), textcoords="offset points", fontsize=7,
                        color=c, arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"} if k else None)
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8, loc="best")
    ax.set_xscale("log")
    ax.set_xlabel(f"trainable adapter parameters (log scale; the {data['runs'][0]['head_params']}-parameter "
                  f"head trains in every arm)")
    ax.set_ylabel(f"test accuracy (mean ± std over up to {len(data['seeds'])} seeds)")
    ax.set_title(f"MiniLM-L6 on '{data['protocol']['task']}': {data['steps']} steps, lr chosen on validation")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def frontier_steering_data(data: dict) -> dict:
    """The frontier's runs at each arm's chosen lr (every seed there), for the steering table:
    a run at a rejected lr says nothing about the arm."""
    from .arms import frontier_run, run_id

    keep = {run_id(frontier_run(s, s["lr"], seed, data["steps"], data["warmup_steps"]))
            for s in frontier_summary(data) if s["lr"] is not None for seed in data["seeds"]}
    return {**data, "runs": [r for r in data["runs"] if run_id(r) in keep]}


def write_frontier_file(out: Path, name: str) -> None:
    """name.md and name.png from name.json; name_steering.md/.png where runs at a chosen lr
    carry a steering record."""
    data = read_json(out / f"{name}.json")
    if not data or not data["runs"]:
        return
    data["name"] = name
    (out / f"{name}.md").write_text(frontier_markdown(data))
    frontier_plot(data, out / f"{name}.png")
    chosen = frontier_steering_data(data)
    if steering_plot(chosen, out / f"{name}_steering.png"):
        (out / f"{name}_steering.md").write_text(steering_markdown(chosen))


# ---- C1 cost ----------------------------------------------------------------------------------

MODEL_LABELS = {"minilm": "MiniLM-L6", "qwen": "Qwen3-0.6B-shaped decoder", "tiny": "toy Qwen3",
                "tiny64": "64-wide Qwen3 (per-target overhead)"}


def _model_title(m: dict) -> str:
    layers = f"{m['layers']} layers, " if m["kind"] != "minilm" else ""
    return (f"{MODEL_LABELS.get(m['kind'], m['kind'])} ({layers}batch {m['batch_size']} × "
            f"{m['seq_len']} tokens, base {m['base_macs_per_token'] / 1e6:.1f}M MACs/token)")


def _opt(x, fmt: str, none: str = "—") -> str:
    return none if x is None else format(x, fmt)


def _bytes(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def cost_markdown(data: dict) -> str:
    p, env = data["protocol"], data["env"]
    device = p.get("device", "cpu")
    where = (f"{env.get('cuda') or device}, base in {p.get('dtype', 'float32')}" if device != "cpu"
             else f"{env['cpu_count']}-core {env['cpu']}")
    if p.get("dtype", "float32") != "float32" and device == "cpu":
        where += f", base in {p['dtype']}"
    out = [f"Rank {p['rank']} (SVD-steering family: larger r), targets q/k/v/o + MLP projections of "
           f"every block, {p['repeats']} interleaved repeats after {p['warmup']} warmups, "
           f"{p['threads']} torch thread(s), {where}, torch {env['torch']}, "
           f"PEFT {env['peft']}. Timing: {p['timing']}. Peak memory: "
           f"{p['memory_method']}. \"+MACs\" is analytic (SPEC B2) per token, with its share of the "
           f"base's forward MACs. \"step +%\" is the forward+backward overhead over the frozen base "
           f"step measured in the same loop.\n"]
    saved = any("saved_mb" in r for m in data["models"] for r in m["rows"])
    cuda = p.get("device", "cpu") != "cpu"
    head = ["method", "library", "trainable params", "+MACs/token", "fwd ms", "fwd+bwd ms", "step +%",
            "ours / PEFT", "attach s", "peak CUDA MB (+ over resident)" if cuda else "peak RSS MB (+ over base)",
            "checkpoint", "save ms", "load ms"]
    if saved:
        out.append("\"saved MiB\": activation memory, the unique storages autograd saves for backward "
                   "in one training forward (parameters excluded), and in brackets that minus the "
                   "frozen base step's; \"ours / PEFT\" of the bracketed amounts.\n")
        head += ["saved MiB (+ over base)", "saved ours / PEFT"]
    for m in data["models"]:
        rows = []
        for r in m["rows"]:
            macs = (f"{_count(r['macs_per_token'])} ({r['macs_pct']:.1f}%)" if "macs_per_token" in r else "—")
            ratio = (f"**{r['ratio_vs_peft']:.2f}**" if "ratio_vs_peft" in r else "")
            load = _opt(r.get("load_ms"), ".0f", "n/a" if "load_error" in r else "—")
            rows.append([
                {"base": "frozen base", "full": "full fine-tune"}.get(r["lib"], f"`{r['variant']}`"
                                                                       if r["lib"] == "ours" else r["method"]),
                {"base": "", "full": "", "ours": "lora-lite", "peft": "PEFT"}[r["lib"]],
                _count(r["params"]), macs, f"{r['fwd_ms']:.1f}", f"{r['step_ms']:.1f}",
                _opt(r.get("step_overhead_pct"), "+.0f"), ratio, _opt(r.get("attach_s"), ".2f"),
                (f"{r['peak_rss_mb']:.0f} (+{r['peak_over_model_mb']:.0f})" if "peak_rss_mb" in r else
                 f"{r['peak_cuda_mb']:.0f} (+{r['peak_over_model_mb']:.0f})" if "peak_cuda_mb" in r else "—"),
                _bytes(r.get("bytes")),
                _opt(r.get("save_ms"), ".1f"), load,
            ] + ([f"{r['saved_mb']:.1f}" + (f" (+{r['saved_over_base_mb']:.1f})" if "saved_over_base_mb" in r else ""),
                  _opt(r.get("saved_ratio_vs_peft"), ".2f", "")] if saved else []))
        chosen = "every known variant" if not m.get("variants") else ", ".join(m["variants"])
        out.append(f"\n**{_model_title(m)}**, measured {m.get('date', env['date'])}; variants requested: "
                   f"{chosen}\n\n" + _table(head, rows, "ll" + "r" * (len(head) - 2)))
    notes = sorted({f"{r['method']}: {r['load_error']}" for m in data["models"] for r in m["rows"]
                    if "load_error" in r})
    if notes:
        out.append("\nload n/a: " + "; ".join(notes) + "\n")
    return "".join(out)


def ratio_markdown(data: dict, name: str = "cost") -> str:
    """Our step / PEFT step per method, one column pair per model."""
    models = data["models"]
    methods: dict[str, dict] = {}
    for m in models:
        for r in m["rows"]:
            if r["lib"] in ("ours", "peft"):
                methods.setdefault(r["group"], {}).setdefault(m["kind"], {})[r["lib"]] = r
    saved = any("saved_over_base_mb" in r for m in models for r in m["rows"])
    head = ["method"]
    for m in models:
        t = MODEL_LABELS.get(m["kind"], m["kind"])
        head += [f"{t}: ours / PEFT step", f"{t}: step +% ours / PEFT"]
        head += [f"{t}: saved for backward +MiB ours / PEFT"] if saved else []
    rows = []
    for group, per_model in methods.items():
        peft_rows = [p["peft"] for p in per_model.values() if "peft" in p]
        cells = [f"`{group}`" + (f" ↔ {peft_rows[0]['method']}" if peft_rows else "")]
        for m in models:
            pair = per_model.get(m["kind"], {})
            ours, peft = pair.get("ours"), pair.get("peft")
            if ours and "ratio_vs_peft" in ours:
                ratio = f"**{ours['ratio_vs_peft']:.2f}** ({ours['ratio_q1']:.2f}–{ours['ratio_q3']:.2f})"
            else:
                ratio = ("no PEFT method" if ours else
                         "variant not in this build" if peft else "not measured")
            over = " / ".join(_opt(x and x.get("step_overhead_pct"), "+.0f") for x in (ours, peft))
            cells += [ratio, over]
            if saved:
                cells.append(" / ".join(_opt(x and x.get("saved_over_base_mb"), ".1f") for x in (ours, peft)))
        rows.append(cells)
    when = ", ".join(f"{MODEL_LABELS.get(m['kind'], m['kind'])} {m.get('date', data['env']['date'])}" for m in models)
    note = ("Median of paired per-repeat ratios (interquartile range in brackets); < 1 means lora-lite's "
            f"training step is faster. Measured: {when}. Full tables: `results/{name}.md`.\n\n")
    return note + _table(head, rows, "l" + "r" * (len(head) - 1))


def per_target_markdown(data: dict) -> str | None:
    """µs each hooked layer adds to a training step (ours, PEFT), per method, for every model
    that has the per-target columns; None when none has them."""
    models = [m for m in data["models"] if any("step_us_per_target" in r for r in m["rows"])]
    if not models:
        return None
    out = ["Per-target overhead: (step − the paired frozen-base step) / number of hooked layers, "
           "median over interleaved repeats, in µs per hooked layer per training step (forward µs "
           "in brackets). On the 64-wide model each layer's own compute is negligible, so this is "
           "the cost of the hook or PEFT module call itself.\n"]
    for m in models:
        rows = []
        pairs: dict[str, dict] = {}
        for r in m["rows"]:
            if "step_us_per_target" in r:
                pairs.setdefault(r["group"], {})[r["lib"]] = r
        for group, pair in pairs.items():
            ours, peft = pair.get("ours"), pair.get("peft")

            def cell(r):
                return "—" if r is None else f"{r['step_us_per_target']:.0f} ({r['fwd_us_per_target']:.0f})"
            rows.append([f"`{group}`", str((ours or peft)["targets"]), cell(ours), cell(peft),
                         f"**{ours['ratio_vs_peft']:.2f}**" if ours and "ratio_vs_peft" in ours else "—"])
        out.append(f"\n**{_model_title(m)}**, measured {m.get('date', data['env']['date'])}\n\n" + _table(
            ["method", "targets", "ours µs/target (fwd)", "PEFT µs/target (fwd)", "ours / PEFT step"],
            rows, "lrrrr"))
    return "".join(out)


def cost_summary_markdown(data: dict) -> str | None:
    """The README's short C1: per method PEFT shares, our step / PEFT's on each model, and on the
    64-wide model (whose step is the hooks' own cost) the µs each hooked layer adds, ours / PEFT."""
    pairs: dict[str, dict] = {}
    for m in data["models"]:
        for r in m["rows"]:
            if r["lib"] == "peft" or r["lib"] == "ours" and "ratio_vs_peft" in r:
                pairs.setdefault(r["group"], {}).setdefault(m["kind"], {})[r["lib"]] = r
    shared = [g for g, per in pairs.items() if any("ours" in p and "peft" in p for p in per.values())]
    if not shared:
        return None
    head, rows = ["method"], []
    for m in data["models"]:
        t = MODEL_LABELS.get(m["kind"], m["kind"])
        per_target = m["kind"] == "tiny64"
        head.append(f"{t}: µs per target, ours / PEFT (step ratio)" if per_target else f"{t}: ours / PEFT step")
    for g in shared:
        cells = [f"`{g}` ↔ {next(p['peft']['method'] for p in pairs[g].values() if 'peft' in p)}"]
        for m in data["models"]:
            ours, peft = (pairs[g].get(m["kind"], {}).get(k) for k in ("ours", "peft"))
            if not (ours and peft):
                cells.append("—")
            elif m["kind"] == "tiny64":
                cells.append(f"{ours['step_us_per_target']:.0f} / {peft['step_us_per_target']:.0f} "
                             f"(**{ours['ratio_vs_peft']:.2f}**)")
            else:
                cells.append(f"**{ours['ratio_vs_peft']:.2f}**")
        rows.append(cells)
    when = ", ".join(sorted({m.get("date", data["env"]["date"])[:10] for m in data["models"]}))
    note = (f"Training step, lora-lite / HF PEFT on the same targets, one CPU thread (median of paired "
            f"repeats; < 1 is faster), measured {when}; the full tables, memory and checkpoint "
            f"sizes: [docs/benchmarks.md](docs/benchmarks.md#c1-cost).\n\n")
    return note + _table(head, rows, "l" + "r" * (len(head) - 1))


def write_cost_file(out: Path, name: str) -> None:
    data = read_json(out / f"{name}.json")
    rows = [r for m in (data or {}).get("models", []) for r in m["rows"]]
    if rows and all("lib" in r for r in rows):  # a cost run (cost --coefficients files are ratios only)
        per_target = per_target_markdown(data)
        (out / f"{name}.md").write_text(ratio_markdown(data, name) + "\n" + (per_target + "\n" if per_target else "")
                                        + cost_markdown(data))


def write_cost(out: Path, suffix: str = "") -> None:
    write_cost_file(out, f"cost{suffix}")


# ---- doc blocks ------------------------------------------------------------------------------

def blocks(results: Path) -> dict[str, str]:
    """Marker name -> generated markdown, for every results file present."""
    out = {}
    cost = read_json(results / "cost.json")
    if cost and cost["models"]:
        # the 64-wide model isolates the per-target cost: its own table, not ratio columns
        small = [m for m in cost["models"] if m["kind"] == "tiny64"]
        out["cost"] = ratio_markdown({**cost, "models": [m for m in cost["models"] if m["kind"] != "tiny64"]})
        if small:
            out["cost"] += "\n" + per_target_markdown({**cost, "models": small})
        summary = cost_summary_markdown(cost)
        if summary:
            out["cost-summary"] = summary
    gpu = read_json(results / "cost_gpu.json")
    if gpu and gpu["models"]:
        out["cost-gpu"] = ratio_markdown(gpu, "cost_gpu")
    quality = read_json(results / "quality.json")
    if quality and quality["runs"]:
        out["quality"] = quality_markdown(quality)
    for block, name in (("quality-rerun", "quality_rerun"), ("quality-600", "quality_600")):
        rerun = read_json(results / f"{name}.json")
        if quality and quality["runs"] and rerun and rerun["runs"]:
            out[block] = rerun_markdown(quality, rerun, name)
        pairs = peft_pairs_markdown(rerun) if block == "quality-600" and rerun and rerun["runs"] else None
        if pairs:
            out["quality-600-peft"] = pairs
    sweep = read_json(results / "quality_sweep.json")
    if sweep and sweep["runs"]:
        out["quality-sweep"] = sweep_markdown(sweep)
    abl = ablations(results)
    if abl:
        out["ablations"] = abl
    steering = read_json(results / "steer.json")
    if steering and steering["runs"]:
        out["steer"] = steer_markdown(steering)
    front = read_json(results / "frontier.json")
    if front and front["runs"]:
        out["frontier"] = frontier_markdown({**front, "name": "frontier"})
        out["frontier-claim"] = frontier_claim_markdown(front)
        steering = steering_markdown(frontier_steering_data(front))
        if steering:
            out["frontier-steering"] = steering
    return out


def render_docs(texts: dict[str, str], generated: dict[str, str]) -> dict[str, str]:
    """Each generated block into every doc (name -> text) holding its markers; a block that no
    doc holds is an error unless it is in OPTIONAL_BLOCKS."""
    out = dict(texts)
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- bench:{name}:start -->\n).*?(<!-- bench:{name}:end -->)", re.S)
        holders = [doc for doc, text in out.items() if pattern.search(text)]
        if not holders and name not in OPTIONAL_BLOCKS:
            raise ValueError(f"no doc has <!-- bench:{name}:start/end --> markers")
        for doc in holders:
            out[doc] = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), out[doc])
    return out


def render_doc(text: str, generated: dict[str, str]) -> str:
    return render_docs({"doc": text}, generated)["doc"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lora_bench report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--doc", action="append",
                    help="a markdown page holding <!-- bench:NAME:start/end --> blocks (repeatable; default: "
                         "docs/benchmarks.md and README.md)")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    ap.add_argument("--no-doc", action="store_true", help="only the files under --results")
    a = ap.parse_args(argv)
    results = Path(a.results)
    docs = [] if a.no_doc else [Path(d) for d in a.doc or DOCS]
    texts = {str(d): d.read_text() for d in docs}
    new = render_docs(texts, blocks(results)) if docs else {}
    stale = [d for d in texts if new[d] != texts[d]]
    if a.check:
        for d in stale:
            print(f"{d}: generated blocks are stale; run `python -m lora_bench report`")
        return 1 if stale else 0
    for f in sorted(results.glob("*.json")):
        data = read_json(f)
        if f.stem.startswith("cost"):
            write_cost_file(results, f.stem)
        elif data.get("bench") == "steer":
            write_steer_file(results, f.stem)
        elif data.get("bench") == "frontier":
            write_frontier_file(results, f.stem)
        elif f.stem in ("quality", "quality_sweep") or data.get("bench") == "quality":
            write_quality_file(results, f.stem, sweep=f.stem == "quality_sweep")
    for d in stale:
        Path(d).write_text(new[d])
    print(f"rewrote {', '.join(stale) or 'no doc blocks'} and the markdown/plots under {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
