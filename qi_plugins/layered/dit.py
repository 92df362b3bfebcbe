"""The Qwen-Image-Layered DiT: the base MMDiT plus an extra timestep condition and layer-3D RoPE.

Two differences from the base transformer (official ``QwenImageTransformer2DModel(use_additional_t_cond=True,
use_layer3d_rope=True)``):

* ``time_text_embed.addition_t_embedding`` — an ``Embedding(2, dim)`` whose row ``addition_t_cond`` (always 0
  in the released pipelines) is added to the timestep embedding;
* layer-3D RoPE — the target's F frames (composite + layers) get frame indices 0..F-1, appended images their
  list position, the layer-input image frame −1 (its :class:`ImageSegment` says ``frame=-1``), and text
  starts at ``max(m, parts - 1)`` instead of ``m`` (m = the largest half grid side, parts = every image part:
  F target frames plus the appended images).

Axes as in :mod:`qi_plugins.qwen_image.dit`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qi_core.loading import Load, load_module, read_json, weight_files
from qi_core.protocols import DenoiseInput, ImageSegment, TextSegment
from qi_plugins.qwen_image.dit import DiTConfig, QwenImageDiT

#: Real Qwen-Image-Layered transformer (used when a checkpoint folder ships no config.json).
LAYERED_CONFIG = DiTConfig(use_additional_t_cond=True, use_layer3d_rope=True)


class LayeredDiT(QwenImageDiT):
    """Qwen-Image-Layered transformer; forward takes a :class:`DenoiseInput` like the base DiT.

    ``DenoiseInput.extras["layered"]["addition_t_cond"]`` selects the embedding row (default 0, as DiffSynth
    and diffusers use).
    """

    def __init__(self, config: DiTConfig):
        # the two layered features are what this class is; the flags are kept true for config round trips
        config = dataclasses.replace(config, use_additional_t_cond=True, use_layer3d_rope=True)
        super().__init__(config)
        self.time_text_embed.addition_t_embedding = nn.Embedding(2, config.inner_dim)

    def _enter(self, inp: DenoiseInput) -> dict:
        # The layer input (frame -1) is the last image part, whichever injector appended its segment last:
        # the other parts then keep DiffSynth's frame numbering (context 1st, edit images next). Moving tokens
        # within the joint sequence changes nothing else (attention does not depend on token order). Done per
        # input as it enters, so the single and the batched (CFG) forward agree.
        last = [s for s in inp.images if s.frame == -1]
        if last:
            rest = [s for s in inp.images if s.frame != -1]
            inp = dataclasses.replace(inp, images=rest + last)
        return super()._enter(inp)

    def extra_conditioning(self, inp: DenoiseInput, temb: torch.Tensor) -> torch.Tensor:
        index = int(inp.extras.get("layered", {}).get("addition_t_cond", 0))
        emb = self.time_text_embed.addition_t_embedding.weight[index]  # (dim,), added to every (K, B) row
        return emb.to(temb.dtype)

    def rope_tables(
        self, inp: DenoiseInput, grids: list[tuple[int, int, int]], segs: list[ImageSegment | None]
    ):
        # Text starts after the largest half grid side *and* after the last frame index (layer-3D RoPE).
        parts = grids[0][0] + len(grids) - 1
        m = max(max(h // 2, w // 2) for _, h, w in grids)
        offset = max(m, parts - 1)
        text = [s if s.rope_offset is not None else TextSegment(s.emb, s.mask, offset) for s in inp.text]
        return super().rope_tables(dataclasses.replace(inp, text=text), grids, segs)


def load_layered_dit(source: str | Path | list[Path], device: Any = "cpu", dtype: torch.dtype | None = torch.float32,
                     load: Load | None = None) -> LayeredDiT:  # fmt: skip
    """Load a layered DiT from an official ``transformer/`` folder or its safetensors file(s), strictly.

    ``config.json`` next to the weights gives the sizes; without one, the real Qwen-Image-Layered sizes.
    ``load``: the loader a factory was handed (a memory policy's; see :func:`qi_core.loading.load_module`).
    """
    files = weight_files(source if isinstance(source, list) else Path(source))
    first = Path(source[0] if isinstance(source, list) else source)
    cfg_file = (first if first.is_dir() else first.parent) / "config.json"
    config = DiTConfig.from_dict(read_json(cfg_file)) if cfg_file.exists() else LAYERED_CONFIG
    return load_module(lambda: LayeredDiT(config), files, device=device, dtype=dtype,
                       what=f"layered DiT ({first})", load=load)  # fmt: skip


def dit(root: Path, folder: Any, device: Any, dtype: torch.dtype, load: Load | None = None) -> LayeredDiT:
    """Denoiser factory registered as ``qwen-image-layered-dit``."""
    return load_layered_dit(folder, device=device, dtype=dtype, load=load)
