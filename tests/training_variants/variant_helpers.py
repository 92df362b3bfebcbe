"""Shared by the variant training tests: one thread, metadata files, a fixed-draw loss, tiny-model arguments."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_helpers import TINY_TARGETS, fixed_loss, one_thread, write_metadata  # noqa: E402, F401


def picture(path: Path, w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    """Two coloured rectangles (RGBA: the second one half transparent on a clear background)."""
    rng = np.random.default_rng(seed)
    channels = len(mode)
    arr = np.zeros((h, w, channels), np.uint8)
    arr[:] = rng.integers(0, 255, channels)
    y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    arr[y : y + h // 2, x : x + w // 2] = rng.integers(0, 255, channels)
    if mode == "RGBA":
        arr[..., 3] = 0
        arr[y : y + h // 2, x : x + w // 2, 3] = 128 + seed % 100
    image = Image.fromarray(arr, mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return image
