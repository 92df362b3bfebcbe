"""Shared pieces of the training tests: tiny datasets, arguments on the golden tiny model, a fixed-draw loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from PIL import Image

from qi_plugins.sft import QWEN_LORA_TARGETS

MODEL = str(GOLDEN_MODEL)
# The tiny DiT (2 blocks, width 64) ends in a frozen adaLN + projection that the block LoRAs cannot rescale
# per timestep; adding the output layers lets a LoRA overfit one image as a real-size one does.
TINY_TARGETS = QWEN_LORA_TARGETS + ",proj_out,norm_out.linear"


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and a second thread that waits on a busy
    shared CPU slows every op down by a scheduler time slice."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_dataset(folder: Path, sizes: list[tuple[int, int]], *, seed: int = 0, kind: str = "csv") -> Path:
    """Images of two coloured rectangles (W, H given) with prompts, and a metadata file; returns the folder."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i, (w, h) in enumerate(sizes):
        arr = np.zeros((h, w, 3), np.uint8)
        arr[:] = rng.integers(0, 255, 3)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        arr[y : y + h // 2, x : x + w // 2] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "prompt": f"a picture number {i}"})
    write_metadata(folder, rows, kind)
    return folder


def write_metadata(folder: Path, rows: list[dict], kind: str = "csv") -> Path:
    import csv
    import json

    path = Path(folder) / f"metadata.{kind}"
    if kind == "csv":
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()  # a list cell is written as a JSON list (the seed's 2509 metadata)
            w.writerows(
                [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
            )
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args_for(ds: Path, out: Path, **kw) -> dict:
    base = dict(dataset_base_path=str(ds), dataset_metadata_path=str(ds / "metadata.csv"), model=MODEL,
                output_path=str(out), lora_target_modules=TINY_TARGETS)  # fmt: skip
    base.update(kw)
    return base


def fixed_loss(pipe, cond, n: int = 16) -> float:
    """The SFT loss averaged over n fixed (timestep, noise) draws: comparable before and after training."""
    from qi_plugins.sft.tasks import SFT

    with torch.no_grad():
        return sum(float(SFT().loss(pipe, cond, torch.Generator().manual_seed(s))) for s in range(n)) / n


def read(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))
