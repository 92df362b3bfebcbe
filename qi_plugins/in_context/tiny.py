"""The tiny In-Context-Control-Union model (``model="tiny"``): the tiny base model plus a small random LoRA
(DiffSynth layout, ``model.safetensors``) at the recipe's LoRA repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from qi_plugins.in_context import LORA_ID
from qi_plugins.lora.tiny import save_tiny_lora
from qi_plugins.qwen_image.tiny import hub_folder, make_tiny_model_with, meta_dit


def write_in_context_lora(root: Path, seed: int) -> None:
    save_tiny_lora(hub_folder(root, LORA_ID) / "model.safetensors", meta_dit(), seed + 30)


def make_tiny_in_context_model(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    return make_tiny_model_with(out_dir, write_in_context_lora, seed=seed, overwrite=overwrite)
