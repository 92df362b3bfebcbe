"""Shared pieces of the control-training tests: one training image with a control image, entity masks and a
context image (the seed's metadata forms), and the pipelines they are checked with."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from training_helpers import MODEL, TINY_TARGETS, fixed_loss, read, write_metadata  # noqa: E402, F401

CALL = dict(prompt="a red box", height=32, width=32, num_inference_steps=2, seed=1, output_type="np",
            progress_bar_cmd=lambda x: x)  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_control_dataset(folder: Path) -> Path:
    """``images/target.png`` (a red box on grey), ``control.png`` (its white outline on black: a canny-like
    control image), ``mask_box.png`` / ``mask_rest.png`` (entity masks), all 32×32."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    target = np.full((32, 32, 3), 120, np.uint8)
    target[8:24, 4:20] = (220, 30, 30)
    box = np.zeros((32, 32), bool)
    box[8:24, 4:20] = True
    edge = box & ~np.pad(box[1:-1, 1:-1], 1)
    Image.fromarray(target).save(folder / "images" / "target.png")
    Image.fromarray(np.repeat(edge[..., None] * 255, 3, -1).astype(np.uint8)).save(
        folder / "images" / "control.png"
    )
    Image.fromarray((box * 255).astype(np.uint8)).convert("RGB").save(folder / "images" / "mask_box.png")
    Image.fromarray((~box * 255).astype(np.uint8)).convert("RGB").save(folder / "images" / "mask_rest.png")
    return folder


def rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")
