"""Factories the base plugin registers (imported only when a pipeline is composed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qi_plugins.qwen_image.scheduler import FlowMatchSchedule


def text_encoder(root: Path, folder: Path, device: Any, dtype: torch.dtype):
    from qi_plugins.qwen_image.text_encoder import load_text_encoder

    return load_text_encoder(root, folder, device=device, dtype=dtype)


def dit(root: Path, folder: Path, device: Any, dtype: torch.dtype, load: Any = None):
    from qi_plugins.qwen_image.loading import load_dit

    return load_dit(folder, device=device, dtype=dtype, load=load)


def vae(root: Path, folder: Path, device: Any, dtype: torch.dtype, load: Any = None):
    from qi_plugins.qwen_image.vae import load_vae

    return load_vae(folder, device=device, dtype=dtype, load=load)


def scheduler() -> FlowMatchSchedule:
    return FlowMatchSchedule("qwen-image")
