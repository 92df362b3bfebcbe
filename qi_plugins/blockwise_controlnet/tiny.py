"""Tiny models for the blockwise ControlNet recipes (``model="tiny"``): the tiny base model plus one small random
ControlNet per released repository (``model.safetensors``, DiffSynth's keys; sizes read back from the shapes):
one control block per tiny DiT block, the DiT's width, and the inpaint variant's extra mask channel.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from qi_plugins.blockwise_controlnet import _VARIANTS
from qi_plugins.blockwise_controlnet.model import BlockwiseControlNet, ControlNetConfig
from qi_plugins.qwen_image.tiny import TINY_DIT, hub_folder, make_tiny_model_with

INPAINT_EXTRA = 4  # the inpaint ControlNet also reads the mask: 1 channel x 2x2 patch


def tiny_controlnet(seed: int, inpaint: bool = False) -> BlockwiseControlNet:
    dim = TINY_DIT.num_attention_heads * TINY_DIT.attention_head_dim
    extra = INPAINT_EXTRA if inpaint else 0
    config = ControlNetConfig(num_layers=TINY_DIT.num_layers, dim=dim, additional_in_dim=extra)
    # torch's default init (not init_weights, a training start): the residuals are not zero, so they show
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BlockwiseControlNet(config)


def write_controlnets(root: Path, seed: int) -> None:
    from safetensors.torch import save_file

    for k, (suffix, hub_id, _, _) in enumerate(_VARIANTS):
        net = tiny_controlnet(seed + 40 + k, inpaint=suffix == "inpaint")
        folder = hub_folder(root, hub_id)
        folder.mkdir(parents=True)
        sd = {n: t.detach().contiguous() for n, t in net.state_dict().items()}
        save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})


def make_tiny_controlnet_model(out_dir: str | os.PathLike, *, seed: int = 0, overwrite: bool = False) -> Path:
    return make_tiny_model_with(out_dir, write_controlnets, seed=seed, overwrite=overwrite)
