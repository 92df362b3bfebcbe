"""Shared pieces of the front-door tests: a DiffSynth ``./models`` folder made of the golden tiny models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from conftest import GOLDEN, GOLDEN_MODEL, golden_case
from conftest import golden_call as call_args  # noqa: F401

QI = GOLDEN_MODEL
LAYERED = GOLDEN / "models" / "qwen_image_layered"
EXTRA = GOLDEN / "models" / "extra"

LORA = EXTRA / "lora_diffsynth.safetensors"  # a random DiffSynth-format LoRA of the tiny DiT
# The LoRA repositories DiffSynth's examples load (model.safetensors each): the random tiny LoRA stands in.
LORA_REPOS = (
    "DiffSynth-Studio/Qwen-Image-EliGen", "DiffSynth-Studio/Qwen-Image-EliGen-V2",
    "DiffSynth-Studio/Qwen-Image-EliGen-Poster", "DiffSynth-Studio/Qwen-Image-In-Context-Control-Union",
    "DiffSynth-Studio/Qwen-Image-Context-Control", "DiffSynth-Studio/Qwen-Image-Distill-LoRA",
    "DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix", "DiffSynth-Studio/Qwen-Image-Edit-2511-ICEdit-LoRA",
    "DiffSynth-Studio/Qwen-Image-Layered-Control-V2",
)  # fmt: skip
LIGHTNING_FILE = "Qwen-Image-Edit-2511-Lightning-4steps-V1.0-bf16.safetensors"

# DiffSynth's ./models/<model_id>/... layout, pointing at the golden tiny files: every repository DiffSynth's
# Qwen-Image examples name. Fine-tunes (2512, FireRed, Distill-Full, Layered-Control) reuse the tiny DiT of
# their architecture; ControlNet and LoRA repositories hold the tiny DiffSynth-format files.
LAYOUT: dict[str, dict[str, Path]] = {
    "Qwen/Qwen-Image": {d: QI / d for d in ("transformer", "text_encoder", "vae", "tokenizer")},
    "Qwen/Qwen-Image-Edit": {"transformer": QI / "transformer", "processor": QI / "processor"},
    **{
        m: {"transformer": QI / "transformer"}
        for m in (
            "Qwen/Qwen-Image-2512",
            "Qwen/Qwen-Image-Edit-2509",
            "Qwen/Qwen-Image-Edit-2511",
            "FireRedTeam/FireRed-Image-Edit-1.0",
            "FireRedTeam/FireRed-Image-Edit-1.1",
        )
    },
    # the distilled DiT sits at its repository's root (origin_file_pattern="diffusion_pytorch_model*.safetensors")
    "DiffSynth-Studio/Qwen-Image-Distill-Full": {
        "diffusion_pytorch_model.safetensors": QI / "transformer" / "diffusion_pytorch_model.safetensors",
        "config.json": QI / "transformer" / "config.json",
    },
    "Qwen/Qwen-Image-Layered": {"transformer": LAYERED / "transformer", "vae": LAYERED / "vae"},
    "DiffSynth-Studio/Qwen-Image-Layered-Control": {"transformer": LAYERED / "transformer"},
    **{
        f"DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-{kind.title()}": {
            "model.safetensors": EXTRA / f"controlnet_{kind}.safetensors"
        }
        for kind in ("canny", "depth", "inpaint")
    },
    **{repo: {"model.safetensors": LORA} for repo in LORA_REPOS},
    "lightx2v/Qwen-Image-Edit-2511-Lightning": {LIGHTNING_FILE: LORA},
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


def within_golden(out: Any, case_name: str) -> float:
    """Max |compat − DiffSynth golden| of the decoded image; asserted within the case's tolerance."""
    case, want, _ = golden_case(case_name)
    ref = want["image_float"]
    ours = np.stack(out) if isinstance(out, list) else out[None]
    diff = float(np.abs(ours - ref.permute(0, 2, 3, 1).numpy().reshape(ours.shape)).max())
    assert diff <= case["tolerances"]["image_float"]["recommended_atol"], diff
    return diff
