"""Shared models for the tests: a random-init Qwen3 decoder and the real pretrained MiniLM.

Both are built once per session; tests get a deep copy (`fresh`) so every test starts from a
pristine base. Everything runs offline in fp32 on the CPU.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tests' tensors are small: on a 2-core box a second thread only contends (a 128 x 64 SVD
# takes ~20x longer with 2 threads). Results are compared against independent computations
# made in the same process, so they do not depend on this.
torch.set_num_threads(1)

from lora_lite.demo import load_minilm  # noqa: E402

import toy_variant  # noqa: E402,F401  (registers the test-only variant every generic suite runs)

SENTENCES = [
    "Adapters attach to the linear layers with forward hooks.",
    "thirty-one is more than 29",
    "The quick brown fox jumps over the lazy dog near the river bank.",
]


class Bench:
    """A base model, one input batch, and how to read its output tensor."""

    def __init__(self, kind, model, batch, targets, calibration):
        self.kind, self.model, self.batch, self.targets = kind, model, batch, targets
        self.dtype = next(model.parameters()).dtype
        self.calibration = calibration  # list of dict batches (with padding) for calibrated variants

    def fresh(self):
        return copy.deepcopy(self.model)

    def out(self, model, batch=None):
        """Model output with padded positions zeroed: their values are unused downstream and so
        ill-conditioned on MiniLM that fp32 rounding moves them 5-30x more than real tokens."""
        batch = self.batch if batch is None else batch
        with torch.no_grad():
            return self.output(model(**batch)) * batch["attention_mask"][..., None]

    def output(self, res):
        return res.logits if self.kind in ("qwen", "gpt2") else res.last_hidden_state


def make_qwen():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        attn_implementation="eager",
    )
    model = Qwen3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    calibration = []
    for _ in range(4):
        c_ids = torch.randint(0, 256, (3, 12), generator=g)
        c_mask = torch.ones_like(c_ids)
        c_mask[0, :4] = 0
        calibration.append({"input_ids": c_ids, "attention_mask": c_mask})
    return Bench("qwen", model, {"input_ids": ids, "attention_mask": mask}, (), calibration)


def make_gpt2():
    """A random-init GPT-2 (n_embd 64, 2 blocks): its attention and MLP layers are transformers'
    Conv1D, which stores W transposed as (d_in, d_out); wte is tied to lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )
    model = GPT2LMHeadModel(cfg).eval()
    model.loss_type = "ForCausalLM"  # unset, transformers logs a warning at every loss: a graph break
    with torch.no_grad():  # GPT-2 initialises biases to 0: make the bias paths (ia3, road) count
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)
    qwen = make_qwen()  # the same token batches (vocabulary 256)
    return Bench("gpt2", model, qwen.batch, (r"(c_attn|c_proj|c_fc)$",), qwen.calibration)


def make_qwen_moe():
    """A random-init Qwen3-MoE (2 blocks, 4 experts, top-2): transformers 5 keeps each block's
    experts as fused parameters gate_up_proj (4, 64, 64) and down_proj (4, 64, 32)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, attn_implementation="eager",
    )
    model = Qwen3MoeForCausalLM(cfg).eval()
    qwen = make_qwen()
    return Bench("qwen", model, qwen.batch, (), qwen.calibration)


def make_minilm():
    model, tok = load_minilm()
    batch = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    from lora_lite.tasks import make_split

    texts = [t for t, _ in make_split("comparison", "train", 64, seed=0)]
    calibration = [dict(tok(texts[i : i + 16], padding=True, return_tensors="pt")) for i in range(0, 64, 16)]
    return Bench("minilm", model.eval(), batch, (r"^encoder\.",), calibration)


def pytest_addoption(parser):
    parser.addoption("--run-optin", action="store_true", help="also run the opt-in tests (marker optin)")


def pytest_collection_modifyitems(config, items):
    """Opt-in tests are deselected unless --run-optin."""
    if config.getoption("--run-optin"):
        return
    optin = [item for item in items if "optin" in item.keywords]
    if optin:
        config.hook.pytest_deselected(items=optin)
        items[:] = [item for item in items if "optin" not in item.keywords]


@pytest.fixture(scope="session")
def qwen():
    return make_qwen()


@pytest.fixture(scope="session")
def gpt2():
    return make_gpt2()


@pytest.fixture(scope="session")
def qwen_moe():
    return make_qwen_moe()


@pytest.fixture(scope="session")
def minilm():
    return make_minilm()


@pytest.fixture
def one_thread():
    """The benchmarks run single-threaded (see bench/cost.py); so do their tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def qwen_bf16(qwen):
    """The tiny Qwen3 with a bf16 base (weights rounded once from the fp32 model)."""
    return Bench("qwen", copy.deepcopy(qwen.model).to(torch.bfloat16), qwen.batch, qwen.targets, qwen.calibration)


# The real MiniLM's larger layers (384/1536 wide) make its SVDs and eighs the bulk of the
# suite's time: its cases run in the full tier, the tiny Qwen3's in the fast tier too.
@pytest.fixture(params=["qwen", pytest.param("minilm", marks=pytest.mark.slow)])
def bench(request):
    return request.getfixturevalue(request.param)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def snapshot(model) -> dict:
    """Everything attach/load may touch: state_dict tensors, grad flags, hooks, attributes."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "attrs": {id(m): sorted(m.__dict__) for m in model.modules()},
    }


def assert_untouched(model, before: dict) -> None:
    after = snapshot(model)
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), f"{k} changed"
    assert after["flags"] == before["flags"]
    assert after["hooks"] == before["hooks"]
    assert after["attrs"] == before["attrs"]
