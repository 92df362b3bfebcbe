"""Tiny random Qwen-Image-Layered models in the official layout (``model="tiny"``, ``qi make-tiny-model``).

The base plugin's tiny model with an RGBA VAE (``input_channels: 4``) and a layered transformer: the same
tiny sizes plus ``use_additional_t_cond`` / ``use_layer3d_rope`` and a random ``addition_t_embedding``.
Layered-Control takes its text encoder from the base model and its DiT and VAE from two other repositories:
its tiny model is the base one with those (and the Layered-Control-V2 LoRA) under its local hub.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from qi_core.atomic import atomic_folder
from qi_plugins.layered import CONTROL_MODEL, LAYERED_MODEL
from qi_plugins.layered.adapters import LayeredControlV2
from qi_plugins.layered.dit import LayeredDiT
from qi_plugins.lora.tiny import save_tiny_lora
from qi_plugins.qwen_image.tiny import (
    TINY_DIT,
    TINY_VAE,
    hub_folder,
    make_tiny_model,
    make_tiny_model_with,
    save_dit,
    save_vae,
    tiny_dit,
    tiny_vae,
)

LAYERED_DIT = replace(TINY_DIT, use_additional_t_cond=True, use_layer3d_rope=True)


def tiny_layered_dit(seed: int) -> LayeredDiT:
    """The tiny DiT's weights (same seed) plus a random ``addition_t_embedding``."""
    dit = LayeredDiT(LAYERED_DIT)
    dit.load_state_dict(tiny_dit(seed, LAYERED_DIT).state_dict(), strict=False)  # all but the new embedding
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        emb = dit.time_text_embed.addition_t_embedding.weight
        emb.copy_(torch.randn(emb.shape, generator=g) * 0.5)
    return dit


def make_tiny_layered_model(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny layered model to ``out_dir`` (built next to it, then renamed into place)."""
    out = Path(out_dir)
    with atomic_folder(out, overwrite) as tmp:
        make_tiny_model(tmp, seed=seed, overwrite=True, image_channels=4, dit_config=LAYERED_DIT)
        save_dit(tiny_layered_dit(seed), tmp / "transformer")
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = "QwenImageLayeredPipeline"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


def write_layered_control(root: Path, seed: int) -> None:
    dit = tiny_layered_dit(seed + 50)  # a fine-tune of Layered: other weights, same shapes
    save_dit(dit, hub_folder(root, CONTROL_MODEL) / "transformer")
    save_vae(tiny_vae(seed, replace(TINY_VAE, input_channels=4)), hub_folder(root, LAYERED_MODEL) / "vae")
    lora = hub_folder(root, LayeredControlV2.model_id) / LayeredControlV2.file
    save_tiny_lora(lora, dit.to("meta"), seed + 51)


def make_tiny_layered_control_model(
    out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False
) -> Path:
    """The tiny base model with the Layered-Control DiT, the RGBA VAE and the Layered-Control-V2 LoRA."""
    return make_tiny_model_with(out_dir, write_layered_control, seed=seed, overwrite=overwrite)
