"""Tables and plots of the steering benchmark (`lora_bench.steer`): results/NAME.md,
NAME_shift.png (concept logit shift against c) and NAME_cost.png (flip rate against the drift
outside the concept), and the docs/benchmarks.md block "steer" (`lora_bench.report`)."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .arms import arm_id
from .common import read_json

PEER_LABELS = {"mean-diff": "mean-diff vectors (steering-vectors)", "pca": "PCA vectors (repeng's method)"}
VIA_LABELS = {"scaled": "`ll.scaled`", "coeff": "`coeff`", "peft": "PEFT `scaling`", "vector": "added at block outputs"}


def _label(row: str, via: str) -> str:
    if via == "vector":
        return PEER_LABELS.get(row, row)
    name = "PEFT LoRA" if row == "peft:lora" else f"`{row}`"
    return f"{name} (coeff)" if via == "coeff" else name


def _mean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.fmean(xs) if xs else float("nan")


def _sd(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def _f(x: float, digits: int = 2) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.{digits}f}"


def steer_rows(data: dict) -> list[dict]:
    """One summary per arm (in the JSON's arm order), its runs' metrics averaged over seeds."""
    by_arm: dict[str, list[dict]] = {}
    for r in data["runs"]:
        by_arm.setdefault(arm_id(r["row"], r["knobs"], r["lr"], r["steps"]), []).append(r)
    out = []
    for arm in data.get("arms", by_arm):
        runs = sorted(by_arm.get(arm, []), key=lambda r: r["seed"])
        if not runs:
            continue
        r0 = runs[0]
        i_plus, i_minus = r0["coeffs"].index(1.0), r0["coeffs"].index(-1.0)
        eq = [r["equal_cost"] for r in runs]
        eqn = [r["equal_number"] for r in runs]
        out.append({
            "label": _label(r0["row"], r0["knobs"]["via"]), "row": r0["row"], "via": r0["knobs"]["via"],
            "seeds": len(runs), "params": r0["params"] or r0["vector_params"], "trained": bool(r0["params"]),
            "lr": r0["lr"], "steps": r0["steps"],
            "loss": _mean(r["loss"][-1] for r in runs if r["loss"]),
            "spearman": _mean(r["spearman"] for r in runs), "symmetry": _mean(r["symmetry"] for r in runs),
            "symmetry_sd": _sd(r["symmetry"] for r in runs),
            "flip_plus": _mean(r["flip"]["+1"] for r in runs), "flip_minus": _mean(r["flip"]["-1"] for r in runs),
            "number_acc": _mean(min(r["number_acc"][i_plus], r["number_acc"][i_minus]) for r in runs),
            "drift": _mean((r["drift"][i_plus] + r["drift"][i_minus]) / 2 for r in runs),
            "budget": _mean(e["budget"] for e in eq),
            "c_plus": _mean(e["+"]["c"] for e in eq), "c_minus": _mean(e["-"]["c"] for e in eq),
            "reached": all(e["+"]["reached"] and e["-"]["reached"] for e in eq),
            "eq_flip": _mean((e["+"]["flip"] + e["-"]["flip"]) / 2 for e in eq),
            "eq_flip_sd": _sd((e["+"]["flip"] + e["-"]["flip"]) / 2 for e in eq),
            "n_c_plus": _mean(e["+"]["c"] for e in eqn), "n_c_minus": _mean(e["-"]["c"] for e in eqn),
            "n_reached": all(e["+"]["reached"] and e["-"]["reached"] for e in eqn),
            "n_flip": _mean((e["+"]["flip"] + e["-"]["flip"]) / 2 for e in eqn),
            "n_flip_sd": _sd((e["+"]["flip"] + e["-"]["flip"]) / 2 for e in eqn),
            "number_change": _mean((r["number_change"][i_plus] + r["number_change"][i_minus]) / 2 for r in runs),
            "coeffs": r0["coeffs"],
            "shift": [_mean(r["shift"][i] for r in runs) for i in range(len(r0["coeffs"]))],
            "drift_c": [_mean(r["drift"][i] for r in runs) for i in range(len(r0["coeffs"]))],
        })
    return out


def _count(n: int) -> str:
    return f"{n / 1e3:.1f}k" if n >= 1e3 else str(n)


def steer_markdown(data: dict) -> str:
    """The summary table: per arm, monotonicity, symmetry, flip rate at ±1 and at equal
    coherence cost, coherence at ±1, parameters."""
    rows = steer_rows(data)
    p = data["protocol"]
    lines = [
        f"Concept: sentiment of generated sentences, read by a frozen probe on the base MiniLM's pooled "
        f"output; adapters on every linear of encoder blocks {', '.join(map(str, p['layers']))} (r = {p['rank']} "
        f"where the variant has a rank), peers added at those blocks' outputs; {p['n_pairs']} training pairs per "
        f"seed, {max(s['steps'] for s in rows)} steps of {p['batch_size']} rows (half at +1, half at −1), "
        f"{p['n_test']} held-out sentences. Mean over seeds ({data['env']['date']}, "
        f"commit {data['env']['commit']}).",
        "",
        "| arm | steered through | params | final loss | Spearman(c, shift) | symmetry | flip +1 / −1 "
        "| number probe acc / change at ±1 | drift at ±1 | equal drift: c (+ / −) | flip there "
        "| equal number-probe change: c (+ / −) | flip there |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in rows:
        lines.append(
            f"| {s['label']} | {VIA_LABELS[s['via']]} | {_count(s['params'])}{'' if s['trained'] else ' (vectors)'} "
            f"| {_f(s['loss'], 3)} | {_f(s['spearman'])} | {_f(s['symmetry'])} ± {_f(s['symmetry_sd'])} "
            f"| {_f(s['flip_plus'])} / {_f(s['flip_minus'])} | {_f(s['number_acc'])} / {_f(s['number_change'])} "
            f"| {_f(s['drift'], 3)} | {_f(s['c_plus'])} / {_f(s['c_minus'])}{'' if s['reached'] else ' (cap)'} "
            f"| {_f(s['eq_flip'])} ± {_f(s['eq_flip_sd'])} "
            f"| {_f(s['n_c_plus'])} / {_f(s['n_c_minus'])}{'' if s['n_reached'] else ' (cap)'} "
            f"| {_f(s['n_flip'])} ± {_f(s['n_flip_sd'])} |")
    natural = _mean(r["pair_drift"] for r in data["runs"])
    lines += ["", f"{rows[0]['seeds'] if rows else 0} seeds per arm; ± is the seeds' std. Symmetry: shift(−1) / "
                  f"−shift(+1). At ±1 (held-out sentences): the number probe's worst accuracy of the two signs, "
                  f"and its logits' mean change over their mean magnitude; the drift outside the concept direction "
                  f"over the representation's norm. Equal drift: each sign's c where the reference sentences' drift "
                  f"reaches {p['drift_budget']:g} (swapping the sentiment word itself drifts {natural:.2f}). Equal "
                  f"number-probe change: each sign's c where the number probe's logits on the reference sentences "
                  f"move by {p['number_budget']:g} of their mean magnitude. \"(cap)\": under the budget up to "
                  f"c = ±16, scored there."]
    return "\n".join(lines) + "\n"


def shift_markdown(data: dict) -> str:
    """Mean concept-logit shift against c = 0 at every c, per arm."""
    rows = steer_rows(data)
    if not rows:
        return ""
    coeffs = rows[0]["coeffs"]
    lines = ["| arm | " + " | ".join(f"c = {c:g}" for c in coeffs) + " |",
             "| --- | " + " | ".join("---:" for _ in coeffs) + " |"]
    for s in rows:
        lines.append(f"| {s['label']} | " + " | ".join(_f(x) for x in s["shift"]) + " |")
    return "\n".join(lines) + "\n"


def plot_steer(data: dict, out: Path, name: str) -> list[Path]:
    """NAME_shift.png (shift against c per arm) and NAME_cost.png (flip rate against drift
    outside the concept, over c = 0.5, 1, 2 of both signs, with the equal-cost budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = steer_rows(data)
    if not rows:
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5.5))
    colors = [plt.cm.turbo(i / max(1, len(rows) - 1)) for i in range(len(rows))]  # 24 arms: tab10 repeats
    for s, color in zip(rows, colors):
        style = "--" if not s["trained"] else "-"
        ax.plot(s["coeffs"], s["shift"], style, marker="o", ms=3, color=color, label=s["label"].replace("`", ""))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set(xlabel="coefficient c", ylabel="concept probe logit shift vs c = 0 (held-out mean)",
           title="Steering both ways: concept shift against c")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(out / f"{name}_shift.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    panels = (("drift", "equal_cost", "drift outside the concept direction"),
              ("number_change", "equal_number", "number probe's logit change / its mean magnitude"))
    for ax, (key, budget_key, what) in zip(axes, panels):
        for s, color in zip(rows, colors):
            runs = [r for r in data["runs"] if r["row"] == s["row"] and r["knobs"]["via"] == s["via"]]
            xs, ys = [], []
            for c in (c for c in s["coeffs"] if c > 0):
                i, j = s["coeffs"].index(c), s["coeffs"].index(-c)
                xs.append(_mean((r[key][i] + r[key][j]) / 2 for r in runs))
                ys.append(_mean((r["flip_c"][i] + r["flip_c"][j]) / 2 for r in runs))
            ax.plot(xs, ys, "--" if not s["trained"] else "-", marker="o", ms=3, color=color,
                    label=s["label"].replace("`", ""))
        ax.axvline(data["runs"][0][budget_key]["budget"], color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set(xlabel=f"{what} (held-out, c = ±0.5, ±1, ±2)", title=f"flip rate against {key.replace('_', ' ')}")
    axes[0].set_ylabel("flip rate toward the steered side (mean of both signs)")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    paths.append(out / f"{name}_cost.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_steer_file(out: Path, name: str) -> None:
    data = read_json(out / f"{name}.json")
    if not data or not data["runs"]:
        return
    plot_steer(data, out, name)
    (out / f"{name}.md").write_text(f"# Steering benchmark ({name}.json)\n\n" + steer_markdown(data)
                                    + "\nConcept logit shift against c (mean over seeds):\n\n" + shift_markdown(data)
                                    + f"\n![shift]({name}_shift.png)\n![cost]({name}_cost.png)\n")
