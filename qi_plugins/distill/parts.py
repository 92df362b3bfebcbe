"""The Distill-LoRA adapter and a DiT loader for weight-only repositories (imported when used)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qi_core.loading import Load, load_module, read_json, weight_files
from qi_plugins.lora.preset import PresetLoRA
from qi_plugins.qwen_image.dit import DiTConfig, QwenImageDiT


class DistillLoRA(PresetLoRA):
    """DiffSynth-Studio/Qwen-Image-Distill-LoRA fused, 15 steps, cfg 1 (the "Qwen-Image" schedule stays)."""

    name = "distill-lora"
    model_id = "DiffSynth-Studio/Qwen-Image-Distill-LoRA"
    file = "model.safetensors"
    default_steps = 15


def dit_weights(root: Path, folder: Path | list[Path], device: Any, dtype: torch.dtype,
                load: Load | None = None) -> QwenImageDiT:  # fmt: skip
    """A Qwen-Image DiT from a folder (or files) of weights; ``config.json`` is optional.

    Weight-only repositories such as Distill-Full ship the official key set, sometimes without the official
    ``config.json``; the official Qwen-Image configuration (:class:`DiTConfig` defaults) is used then.
    """
    files = weight_files(folder)
    cfg_path = (
        Path(folder) if not isinstance(folder, list) and Path(folder).is_dir() else files[0].parent
    ) / ("config.json")
    config = DiTConfig.from_dict(read_json(cfg_path)) if cfg_path.is_file() else DiTConfig()
    return load_module(
        lambda: QwenImageDiT(config), files, device=device, dtype=dtype, what=f"DiT ({folder})", load=load
    )
