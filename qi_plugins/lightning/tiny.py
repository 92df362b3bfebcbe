"""Tiny models for the Lightning recipes (``model="tiny"``): the tiny base model plus a small random LoRA for
every entry of :data:`~qi_plugins.lightning.parts.LIGHTNING_LORAS` and step count, at its hub id and file name,
in lightx2v's layout (``lora_down``/``lora_up``/``alpha``, no prefix). The base model has a ``processor/``, so
Edit-2511-Lightning composes from it too.
"""

from __future__ import annotations

import os
from pathlib import Path

from qi_plugins.lightning.parts import LIGHTNING_LORAS, LightningAdapter
from qi_plugins.lora.tiny import LIGHTX2V_TARGETS, save_tiny_lora
from qi_plugins.qwen_image.tiny import hub_folder, make_tiny_model_with, meta_dit


def write_lightning_loras(root: Path, seed: int) -> None:
    dit = meta_dit()
    for k, (model_id, file, _) in enumerate(sorted(set(LIGHTNING_LORAS.values()))):
        for steps in LightningAdapter.steps_choices:
            path = hub_folder(root, model_id) / file.format(steps=steps)
            save_tiny_lora(path, dit, seed + 100 + 10 * k + steps, layout="lightx2v", targets=LIGHTX2V_TARGETS,
                           alpha=4.0)  # fmt: skip


def make_tiny_lightning_model(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    return make_tiny_model_with(out_dir, write_lightning_loras, seed=seed, overwrite=overwrite)
