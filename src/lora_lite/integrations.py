"""Hooks into training frameworks. Importing this module imports transformers (the `train`
extra); `import lora_lite` alone never does.

LoraLiteCallback: a `transformers.TrainerCallback` that writes a lora-lite checkpoint
(`ll.save`) into every checkpoint folder the Trainer writes, and optionally into `output_dir`
when training ends. The Trainer's own checkpoint is a full-model `save_pretrained` whose
state_dict also holds the `lora_*` tensors; the file this callback writes holds the adapter
only and loads onto a pristine base with `ll.load`.
"""

from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .checkpoint import save


class LoraLiteCallback(TrainerCallback):
    """Write `<checkpoint folder>/<filename>` at each Trainer save (and `<output_dir>/<filename>`
    at the end of training if `save_on_train_end`).

    The Trainer calls callbacks on every process; `ll.save` gathers FSDP2-sharded tensors on all
    of them and only global rank 0 writes.
    """

    def __init__(self, filename: str = "adapter.safetensors", save_on_train_end: bool = True):
        if os.path.basename(filename) != filename or not filename:
            raise ValueError(f"filename must be a plain file name, got {filename!r}")
        self.filename = filename
        self.save_on_train_end = save_on_train_end

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        self._write(model, folder)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.save_on_train_end:
            self._write(model, args.output_dir)

    def _write(self, model, folder: str) -> None:
        if model is None:
            raise RuntimeError("LoraLiteCallback needs the model; the Trainer passes it to callbacks")
        os.makedirs(folder, exist_ok=True)
        save(model, os.path.join(folder, self.filename))
