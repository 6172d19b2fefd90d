"""transformers.Trainer with an attached adapter, and lora_lite.integrations.LoraLiteCallback.

A few CPU steps on the tiny Qwen3 decoder: only adapter tensors reach the optimizer, the loss
falls, the callback's checkpoints reload exactly with `ll.load`, and the Trainer's own
checkpoint (a full state_dict that holds the `lora_*` tensors too) resumes an attached model.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

import lora_lite as ll

from conftest import make_qwen, rel_err

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from lora_lite.integrations import LoraLiteCallback  # noqa: E402

pytestmark = pytest.mark.slow  # transformers Trainer runs

STEPS, SAVE_EVERY = 8, 4


def dataset():
    """8 random token sequences, seen 4 times each in 8 steps of batch 4: a loss that can fall."""
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": s, "labels": s} for s in torch.randint(0, 256, (8, 16), generator=g)]


def trainer(model, out_dir, callbacks=(), save=True):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=4,
        learning_rate=1e-2, logging_steps=1, save_strategy="steps" if save else "no",
        save_steps=SAVE_EVERY, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )
    return transformers.Trainer(
        model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks)
    )


def attached():
    bench = make_qwen()
    ll.attach(bench.model, ll.LoRAConfig(r=4, alpha=8))
    return bench


def test_trainer_trains_only_the_adapter_and_the_callback_checkpoint_reloads(tmp_path):
    bench = attached()
    model = bench.model
    tr = trainer(model, tmp_path, [LoraLiteCallback()])
    tr.train()

    in_optimizer = {id(p) for group in tr.optimizer.param_groups for p in group["params"]}
    adapter = {id(p) for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad}
    assert adapter and in_optimizer == adapter

    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == STEPS
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses

    files = [tmp_path / f"checkpoint-{s}" / "adapter.safetensors" for s in (SAVE_EVERY, STEPS)]
    assert all(f.is_file() for f in files)
    y = bench.out(model.eval())
    for path in (files[-1], tmp_path / "adapter.safetensors"):  # last Trainer save, train end
        fresh = make_qwen().model
        ll.load(fresh, path)
        assert rel_err(bench.out(fresh), y) <= 1e-6
    early = make_qwen().model
    ll.load(early, files[0])
    assert rel_err(bench.out(early), y) > 1e-4  # step 4 is not step 8


def test_trainer_checkpoint_holds_lora_tensors_and_resumes_an_attached_model(tmp_path):
    full = attached()
    trainer(full.model, tmp_path / "full").train()
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE_EVERY}"
    with safe_open(os.fspath(ckpt / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(".lora_" in k for k in keys) and any(".lora_" not in k for k in keys)

    resumed = attached()  # attach the same config, then resume: the lora_* keys load into it
    trainer(resumed.model, tmp_path / "resumed", save=False).train(resume_from_checkpoint=str(ckpt))
    assert rel_err(full.out(resumed.model.eval()), full.out(full.model.eval())) <= 1e-6


def test_callback_refuses_a_path_as_filename():
    with pytest.raises(ValueError, match="plain file name"):
        LoraLiteCallback(filename="sub/adapter.safetensors")
