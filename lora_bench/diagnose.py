"""Training diagnostics for C2 (`python -m lora_bench quality --diagnose`): why a row does or does not learn.

At every logged step (after backward, before the optimizer step) a `Probe` records

    grad      {family: ‖∇‖₂ over every target layer}   family = tensor name (lora_A, lora_g, ...)
    dw        {layer: ‖W_eff − W‖_F / ‖W‖_F}          W_eff from the variant's effective_weight,
                                                       W the pristine base weight (an untouched copy)
    topr      ‖P_U ΔW P_V‖_F / ‖ΔW‖_F over all layers  P = projectors on W's own top-r singular
                                                       subspaces (r = the bench rank): how much of
                                                       the update lives where LoRA-XS can reach
    scalars   variant-specific state, when the tensors exist:
              gain_slope   median over layers of the least-squares slope of log|∂L/∂g_i| on log S_i
                           (1 = the gain's gradient is proportional to S_i)
              g_absmax, g_by_s  max |g| and mean |g| in the top / middle / bottom third of S
              lambda       DeLoRA's λ (mean over layers); b_clamped the fraction of B columns whose
                           norm is still under the 1e-4 clamp
              alpha        ablation strength: mean, min, max, fraction ≤ 0 and ≥ 1 (clamp edges)
              R_norm       LoRA-XS core ‖R‖_F (mean over layers)

Full fine-tuning gets grad/dw/topr from the weights themselves; PEFT rows and head-only get the
gradient norms only.
"""

from __future__ import annotations

import math
import statistics

import torch
from torch import nn

from lora_lite.variant import REGISTRY


def _family(name: str) -> str:
    return name.rsplit(".", 1)[-1]


class Probe:
    """Per-step diagnostics of one run; `log(step)` after backward, `record` is the JSON."""

    def __init__(self, encoder: nn.Module, pristine: nn.Module, rank: int):
        self.encoder = encoder
        self.state = encoder.__dict__.get("_lora_lite")
        base = dict(pristine.named_modules())
        if self.state is not None:
            self.layers = dict(self.state.targets)
            variant, cfg = REGISTRY[self.state.cfg.variant], self.state.cfg
            self.effective = lambda n, layer: variant.at_target(n, cfg).effective_weight(layer, cfg)
        else:  # full fine-tune: every linear of the encoder that trains
            self.layers = {n: m for n, m in encoder.named_modules()
                           if isinstance(m, nn.Linear) and m.weight.requires_grad}
            self.effective = None
        self.W0 = {n: base[n].weight.detach().float().to(self.layers[n].weight.device)
                   for n in self.layers if n in base}
        self.proj = {}
        for n, W in self.W0.items():  # W's own top-r singular subspaces
            U, _, Vh = torch.linalg.svd(W, full_matrices=False)
            self.proj[n] = (U[:, :rank], Vh[:rank])
        self.record: dict = {"steps": [], "grad": {}, "dw": {n: [] for n in self.W0}, "topr": [], "scalars": {}}

    def _scalar(self, key: str, value: float) -> None:
        self.record["scalars"].setdefault(key, []).append(round(float(value), 6))

    @torch.no_grad()
    def log(self, step: int) -> None:
        rec = self.record
        rec["steps"].append(step)
        sq: dict[str, float] = {}
        for name, p in self.encoder.named_parameters():
            if p.requires_grad and p.grad is not None:
                fam = _family(name) if self.state is not None else "weight" if name.endswith("weight") else "bias"
                sq[fam] = sq.get(fam, 0.0) + float(p.grad.float().square().sum())
        for fam, v in sq.items():
            rec["grad"].setdefault(fam, []).append(float(f"{math.sqrt(v):.4g}"))
        num = den = 0.0
        for n, W0 in self.W0.items():
            layer = self.layers[n]
            W = self.effective(n, layer)[0] if self.effective else layer.weight
            dW = W.detach().float() - W0
            norm = float(dW.norm())
            rec["dw"][n].append(float(f"{norm / float(W0.norm()):.4g}"))
            U, Vh = self.proj[n]
            num += float((U.T @ dW @ Vh.T).square().sum())
            den += norm ** 2
        rec["topr"].append(round(math.sqrt(num / den), 4) if den > 0 else None)
        if self.state is not None:
            self._variant_scalars()

    def _variant_scalars(self) -> None:
        layers = list(self.layers.values())
        first = layers[0]
        if hasattr(first, "lora_g") and hasattr(first, "lora_S"):
            slopes, gmax, thirds = [], 0.0, [[], [], []]
            for layer in layers:
                S, g = layer.lora_S.float(), layer.lora_g.detach().float()
                gmax = max(gmax, float(g.abs().max()))
                for k, part in enumerate(torch.tensor_split(g.abs(), 3)):  # S is descending
                    thirds[k].append(float(part.mean()))
                grad = layer.lora_g.grad
                if grad is None:
                    continue
                keep = (grad.abs() > 0) & (S > 0)
                if keep.sum() > 2:
                    x, y = S[keep].log(), grad[keep].abs().float().log()
                    x = x - x.mean()
                    slopes.append(float((x * (y - y.mean())).sum() / x.square().sum().clamp_min(1e-30)))
            if slopes:
                self._scalar("gain_slope", statistics.median(slopes))
            self._scalar("g_absmax", gmax)
            for k, label in enumerate(("top", "mid", "bottom")):
                self._scalar(f"g_mean_abs_{label}_S", statistics.fmean(thirds[k]))
        if hasattr(first, "lora_lambda"):
            self._scalar("lambda", statistics.fmean(float(layer.lora_lambda) for layer in layers))
            cols = torch.cat([layer.lora_B.detach().norm(dim=0) for layer in layers])
            self._scalar("b_clamped", float((cols < 1e-4).float().mean()))
        if hasattr(first, "lora_strength") and hasattr(first, "lora_c"):
            a = torch.cat([layer.lora_strength.detach().float().flatten() for layer in layers])
            self._scalar("alpha_mean", float(a.mean()))
            self._scalar("alpha_min", float(a.min()))
            self._scalar("alpha_max", float(a.max()))
            self._scalar("alpha_le0", float((a <= 0).float().mean()))
            self._scalar("alpha_ge1", float((a >= 1).float().mean()))
        if hasattr(first, "lora_R"):
            self._scalar("R_norm", statistics.fmean(float(layer.lora_R.detach().norm()) for layer in layers))


def summary(diag: dict) -> dict:
    """The last logged values, condensed: mean/max ‖ΔW‖/‖W‖ over layers, grad norms, scalars."""
    last = {"step": diag["steps"][-1] if diag["steps"] else None}
    dws = [v[-1] for v in diag["dw"].values() if v]
    if dws:
        last["dw_mean"], last["dw_max"] = statistics.fmean(dws), max(dws)
    last["grad"] = {k: v[-1] for k, v in diag["grad"].items()}
    last["topr"] = diag["topr"][-1] if diag["topr"] else None
    last.update({k: v[-1] for k, v in diag["scalars"].items()})
    return last
