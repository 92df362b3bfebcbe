"""Tiny models for the EliGen recipes (``model="tiny"``): the tiny base model plus a small random LoRA (DiffSynth
layout, ``model.safetensors``) for each released EliGen repository.
"""

from __future__ import annotations

import os
from pathlib import Path

from qi_plugins.eligen import _VARIANTS
from qi_plugins.lora.tiny import save_tiny_lora
from qi_plugins.qwen_image.tiny import hub_folder, make_tiny_model_with, meta_dit


def write_eligen_loras(root: Path, seed: int) -> None:
    dit = meta_dit()
    for k, (_, lora_id, _, _) in enumerate(_VARIANTS):
        save_tiny_lora(hub_folder(root, lora_id) / "model.safetensors", dit, seed + 20 + k)


def make_tiny_eligen_model(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    return make_tiny_model_with(out_dir, write_eligen_loras, seed=seed, overwrite=overwrite)
