"""Shared by the variant training tests: one thread, metadata files, a fixed-draw loss, tiny-model arguments."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qi_plugins.sft import QWEN_LORA_TARGETS

# the tiny DiT's output layers too, so a small LoRA can overfit (as tests/training does)
TINY_TARGETS = QWEN_LORA_TARGETS + ",proj_out,norm_out.linear"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain nothing from more on a shared CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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


def write_metadata(folder: Path, rows: list[dict], kind: str = "csv") -> Path:
    """``metadata.<kind>``; in a csv a list cell is written as a JSON list (the seed's 2509 metadata)."""
    path = Path(folder) / f"metadata.{kind}"
    if kind == "csv":
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(
                [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
            )
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def fixed_loss(pipe, cond, n: int = 12) -> float:
    """The SFT loss averaged over n fixed (timestep, noise) draws: comparable before and after training."""
    from qi_plugins.sft.tasks import SFT

    with torch.no_grad():
        return sum(float(SFT().loss(pipe, cond, torch.Generator().manual_seed(s))) for s in range(n)) / n
