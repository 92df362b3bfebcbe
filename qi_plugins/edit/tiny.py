"""Tiny models for the edit recipes (``model="tiny"``): the tiny base model (it has the ``processor/`` folder of
the Edit repositories) listed as an edit pipeline, plus the Lowres-Fix LoRA (DiffSynth layout) at its hub id
when the LoRA plugin, which applies it, is installed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from qi_plugins.edit.recipes import LOWRES_FIX_FILE, LOWRES_FIX_LORA, lora_plugin_available
from qi_plugins.qwen_image.tiny import hub_folder, make_tiny_model_with, meta_dit


def write_edit(root: Path, seed: int) -> None:
    index = json.loads((root / "model_index.json").read_text())
    index.update(_class_name="QwenImageEditPipeline", processor=["transformers", "Qwen2VLProcessor"])
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if lora_plugin_available():
        from qi_plugins.lora.tiny import save_tiny_lora

        save_tiny_lora(hub_folder(root, LOWRES_FIX_LORA) / LOWRES_FIX_FILE, meta_dit(), seed + 9)


def make_tiny_edit_model(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    return make_tiny_model_with(out_dir, write_edit, seed=seed, overwrite=overwrite)
