"""Shared pieces of the front-door tests: a DiffSynth ``./models`` folder made of the golden tiny models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from conftest import GOLDEN, GOLDEN_MODEL
from conftest import golden_call as call_args  # noqa: F401

QI = GOLDEN_MODEL
LAYERED = GOLDEN / "models" / "qwen_image_layered"
EXTRA = GOLDEN / "models" / "extra"

# DiffSynth's ./models/<model_id>/... layout, pointing at the golden tiny files. The EliGen and In-Context
# repositories hold a random DiffSynth-format LoRA in place of their real model.safetensors.
LAYOUT: dict[str, dict[str, Path]] = {
    "Qwen/Qwen-Image": {d: QI / d for d in ("transformer", "text_encoder", "vae", "tokenizer")},
    "Qwen/Qwen-Image-Edit": {"transformer": QI / "transformer", "processor": QI / "processor"},
    "Qwen/Qwen-Image-Edit-2511": {"transformer": QI / "transformer"},
    "Qwen/Qwen-Image-Layered": {"transformer": LAYERED / "transformer", "vae": LAYERED / "vae"},
    "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny": {
        "model.safetensors": EXTRA / "controlnet_canny.safetensors"
    },
    "DiffSynth-Studio/Qwen-Image-EliGen": {"model.safetensors": EXTRA / "lora_diffsynth.safetensors"},
    "DiffSynth-Studio/Qwen-Image-In-Context-Control-Union": {
        "model.safetensors": EXTRA / "lora_diffsynth.safetensors"
    },
}

QUIET = {"output_type": "np", "progress_bar_cmd": lambda x: x}


def make_models_dir(base: Path, layout: dict[str, dict[str, Path]] = LAYOUT) -> Path:
    """``base/models/<model_id>/<name>`` as symlinks (copies where links are refused)."""
    import shutil

    for model_id, entries in layout.items():
        for name, src in entries.items():
            dst = base / "models" / model_id / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(src, dst, target_is_directory=src.is_dir())
            except OSError:
                (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst)
    return base / "models"


def same(a: Any, b: Any) -> bool:
    """Bit-identical outputs (arrays or lists of arrays)."""
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a.shape == b.shape and np.array_equal(a, b)
