"""Loaders of the base plugin's components from the official folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qi_core.loading import Load, load_module, read_json, weight_files
from qi_plugins.qwen_image.dit import DiTConfig, QwenImageDiT


def load_dit(folder: str | Path, device: Any = "cpu", dtype: torch.dtype | None = torch.float32,
             cls: type[QwenImageDiT] = QwenImageDiT, load: Load | None = None) -> QwenImageDiT:  # fmt: skip
    """``load``: the loader a factory was handed (a memory policy's; see :func:`qi_core.loading.load_module`)."""
    folder = Path(folder)
    config = DiTConfig.from_dict(read_json(folder / "config.json"))
    return load_module(lambda: cls(config), weight_files(folder), device=device, dtype=dtype,
                       what=f"DiT ({folder})", load=load)  # fmt: skip
