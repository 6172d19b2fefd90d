"""Tables and plots from the benchmark JSON; the README's result blocks are generated here.

    lora-lite bench report            rewrite results/*.md, results/quality.png and the README blocks
    lora-lite bench report --check    exit 1 if the README blocks differ from what the JSON renders

README blocks sit between `<!-- bench:NAME:start -->` and `<!-- bench:NAME:end -->` markers and
are never edited by hand.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from pathlib import Path

from .common import read_json

ROOT = Path(__file__).resolve().parents[3]
ANCHOR_LABELS = {"head": "head-only", "full": "full fine-tune", "peft:lora": "PEFT LoRA"}


def _label(row: str) -> str:
    return ANCHOR_LABELS.get(row) or (f"PEFT {row[5:]}" if row.startswith("peft:") else row)


def _sci(x: float) -> str:
    m, e = f"{x:.0e}".split("e")
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

def _runs_by_row(data: dict) -> dict[str, list[dict]]:
    """{row: its runs}, rows in the benchmark's canonical order (anchors, then the variant
    table), whatever order the runs were appended in; unknown rows last."""
    from .adapters import SETTINGS
    from .quality import ANCHORS

    order = {row: i for i, row in enumerate([*ANCHORS, *SETTINGS])}
    by_row: dict[str, list[dict]] = {}
    for r in data["runs"]:
        by_row.setdefault(r["row"], []).append(r)
    return dict(sorted(by_row.items(), key=lambda kv: order.get(kv[0], len(order))))


def quality_rows(data: dict) -> list[dict]:
    """One summary per row, in canonical order: mean/std accuracy over seeds, params, time."""
    by_row = _runs_by_row(data)
    out = []
    for row, runs in by_row.items():
        accs = [r["acc"] for r in runs]
        out.append({
            "row": row, "family": runs[0]["family"], "lr": runs[0]["lr"], "n": len(runs),
            "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "params": runs[0]["params"], "head_params": runs[0]["head_params"],
            "train_s": statistics.fmean(r["train_s"] for r in runs),
            "lib": "PEFT" if row.startswith("peft:") else ("anchor" if row in ("head", "full") else "lora-lite"),
        })
    head = next((s for s in out if s["row"] == "head"), None)
    for s in out:
        # "beats head-only": the mean gain exceeds the larger of the two seed spreads
        s["beats_head"] = None if head is None or s is head else (
            s["mean"] - head["mean"] > max(s["std"], head["std"]))
    return out


def quality_markdown(data: dict) -> str:
    p = data["protocol"]
    rows, summary = [], quality_rows(data)
    for s in summary:
        beats = {None: "", True: "yes", False: "**no**"}[s["beats_head"]]
        rows.append([f"`{s['row']}`" if s["lib"] == "lora-lite" else _label(s["row"]), s["lib"],
                     _sci(s["lr"]), _count(s["params"] + s["head_params"]),
                     f"{s['mean']:.3f} ± {s['std']:.3f}", f"{s['train_s']:.0f}", beats])
    seeds = "/".join(sorted({str(s["n"]) for s in summary}))
    head = ["row", "library", "lr", "trainable params", f"accuracy (mean ± std, {seeds} seeds)",
            "train s", "beats head-only"]
    note = (f"MiniLM-L6, task `{p['task']}`, {p['steps']} steps × batch {p['batch_size']}, "
            f"{p['n_train']} train / {p['n_test']} held-out sentences, rank {p['rank']} "
            f"(SVD-steering family: larger r, see `bench/adapters.py`), head lr {_sci(p['head_lr'])}; "
            f"trainable params include the {summary[0]['head_params']}-parameter head. "
            f"\"beats head-only\": mean gain larger than the larger of the two seed std devs. Train "
            f"seconds are wall time on a shared machine (noise; C1 has the cost ratios). "
            f"{data['env']['cpu_count']}-core {data['env']['cpu']}, torch {data['env']['torch']}.\n\n")
    return note + _table(head, rows, "llrrrrl")


def sweep_markdown(data: dict) -> str:
    from .quality import best_lrs, family

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
    note = (f"One seed ({data['runs'][0]['seed']}), {p['steps']} steps × batch {p['batch_size']}, "
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
    ax.set_title(f"MiniLM-L6 on '{p['task']}': {p['steps']} steps × {p['batch_size']}; dashed = head-only")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_quality(out: Path, *, sweep: bool = False, suffix: str = "") -> None:
    name = f"quality{'_sweep' if sweep else ''}{suffix}"
    data = read_json(out / f"{name}.json")
    if not data or not data["runs"]:
        return
    (out / f"{name}.md").write_text((sweep_markdown if sweep else quality_markdown)(data))
    if not sweep:
        quality_plot(data, out / f"{name}.png")


# ---- C1 cost ----------------------------------------------------------------------------------

MODEL_LABELS = {"minilm": "MiniLM-L6", "qwen": "Qwen3-0.6B-shaped decoder", "tiny": "toy Qwen3"}


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
    out = [f"Rank {p['rank']} (SVD-steering family: larger r), targets q/k/v/o + MLP projections of "
           f"every block, {p['repeats']} interleaved repeats after {p['warmup']} warmups, "
           f"{p['threads']} torch thread(s), {env['cpu_count']}-core {env['cpu']}, torch {env['torch']}, "
           f"PEFT {env['peft']}. Timing: {p['timing']}. Peak memory: "
           f"{p['memory_method']}. \"+MACs\" is analytic (SPEC B2) per token, with its share of the "
           f"base's forward MACs. \"step +%\" is the forward+backward overhead over the frozen base "
           f"step measured in the same loop.\n"]
    head = ["method", "library", "trainable params", "+MACs/token", "fwd ms", "fwd+bwd ms", "step +%",
            "ours / PEFT", "attach s", "peak RSS MB (+ over base)", "checkpoint", "save ms", "load ms"]
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
                (f"{r['peak_rss_mb']:.0f} (+{r['peak_over_model_mb']:.0f})" if "peak_rss_mb" in r else "—"),
                _bytes(r.get("bytes")),
                _opt(r.get("save_ms"), ".1f"), load,
            ])
        chosen = "every known variant" if not m.get("variants") else ", ".join(m["variants"])
        out.append(f"\n**{_model_title(m)}**, measured {m.get('date', env['date'])}; variants requested: "
                   f"{chosen}\n\n" + _table(head, rows, "llrrrrrrrrrrr"))
    notes = sorted({f"{r['method']}: {r['load_error']}" for m in data["models"] for r in m["rows"]
                    if "load_error" in r})
    if notes:
        out.append("\nload n/a: " + "; ".join(notes) + "\n")
    return "".join(out)


def ratio_markdown(data: dict) -> str:
    """Our step / PEFT step per method, one column pair per model."""
    models = data["models"]
    methods: dict[str, dict] = {}
    for m in models:
        for r in m["rows"]:
            if r["lib"] in ("ours", "peft"):
                methods.setdefault(r["group"], {}).setdefault(m["kind"], {})[r["lib"]] = r
    head = ["method"]
    for m in models:
        t = MODEL_LABELS.get(m["kind"], m["kind"])
        head += [f"{t}: ours / PEFT step", f"{t}: step +% ours / PEFT"]
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
        rows.append(cells)
    note = ("Median of paired per-repeat ratios (interquartile range in brackets); < 1 means lora-lite's "
            "training step is faster. Full tables: `results/cost.md`.\n\n")
    return note + _table(head, rows, "l" + "r" * (len(head) - 1))


def write_cost(out: Path, suffix: str = "") -> None:
    data = read_json(out / f"cost{suffix}.json")
    if data and data["models"]:
        (out / f"cost{suffix}.md").write_text(ratio_markdown(data) + "\n" + cost_markdown(data))


# ---- README blocks ----------------------------------------------------------------------------

def blocks(results: Path) -> dict[str, str]:
    """Marker name -> generated markdown, for every results file present."""
    out = {}
    cost = read_json(results / "cost.json")
    if cost and cost["models"]:
        out["cost"] = ratio_markdown(cost)
    quality = read_json(results / "quality.json")
    if quality and quality["runs"]:
        out["quality"] = quality_markdown(quality)
    sweep = read_json(results / "quality_sweep.json")
    if sweep and sweep["runs"]:
        out["quality-sweep"] = sweep_markdown(sweep)
    return out


def render_readme(text: str, generated: dict[str, str]) -> str:
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- bench:{name}:start -->\n).*?(<!-- bench:{name}:end -->)", re.S)
        if not pattern.search(text):
            raise ValueError(f"README has no <!-- bench:{name}:start/end --> markers")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lora-lite bench report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default=str(ROOT / "results"))
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    a = ap.parse_args(argv)
    results, readme = Path(a.results), Path(a.readme)
    text = readme.read_text()
    new = render_readme(text, blocks(results))
    if a.check:
        if new != text:
            print(f"{readme}: generated blocks are stale; run `lora-lite bench report`")
            return 1
        return 0
    write_cost(results)
    write_quality(results)
    write_quality(results, sweep=True)
    readme.write_text(new)
    print(f"rewrote {readme} blocks and the markdown/plots under {results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
