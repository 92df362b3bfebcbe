"""A tiny random Qwen-Image-Layered model in the official layout (``model="tiny"``, ``qi make-tiny-model``).

The base plugin's tiny model with an RGBA VAE (``input_channels: 4``) and a layered transformer: the same
tiny sizes plus ``use_additional_t_cond`` / ``use_layer3d_rope`` and a random ``addition_t_embedding``.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from qi_core.atomic import atomic_folder
from qi_plugins.layered.dit import LayeredDiT
from qi_plugins.qwen_image.tiny import TINY_DIT, _config_json, _save, make_tiny_model, tiny_dit


def make_tiny_layered_model(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    """Write the tiny layered model to ``out_dir`` (built next to it, then renamed into place)."""
    out = Path(out_dir)
    with atomic_folder(out, overwrite) as tmp:
        config = replace(TINY_DIT, use_additional_t_cond=True, use_layer3d_rope=True)
        make_tiny_model(tmp, seed=seed, overwrite=True, image_channels=4, dit_config=config)
        dit = LayeredDiT(config)
        dit.load_state_dict(tiny_dit(seed, config).state_dict(), strict=False)  # all but the new embedding
        g = torch.Generator().manual_seed(seed + 2)
        with torch.no_grad():
            emb = dit.time_text_embed.addition_t_embedding.weight
            emb.copy_(torch.randn(emb.shape, generator=g) * 0.5)
        _save(dit, tmp / "transformer", _config_json("QwenImageTransformer2DModel", dit.config))
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = "QwenImageLayeredPipeline"
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out
