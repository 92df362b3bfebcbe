"""Tiny models for the Distill recipes (``model="tiny"``): the tiny base model, the Distill-LoRA (DiffSynth
layout) and a differently seeded "distilled" DiT at the Distill-Full repository's root (weights + config.json).
"""

from __future__ import annotations

import os
from pathlib import Path

from qi_plugins.distill.parts import DistillLoRA
from qi_plugins.lora.tiny import save_tiny_lora
from qi_plugins.qwen_image.tiny import hub_folder, make_tiny_model_with, meta_dit, save_dit, tiny_dit

FULL_MODEL = "DiffSynth-Studio/Qwen-Image-Distill-Full"  # the recipe's dit component


def write_distill(root: Path, seed: int) -> None:
    save_dit(tiny_dit(seed + 7), hub_folder(root, FULL_MODEL))
    save_tiny_lora(hub_folder(root, DistillLoRA.model_id) / DistillLoRA.file, meta_dit(), seed + 8)


def make_tiny_distill_model(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    return make_tiny_model_with(out_dir, write_distill, seed=seed, overwrite=overwrite)
