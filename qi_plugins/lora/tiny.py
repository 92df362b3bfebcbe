"""Small random LoRAs for the tiny models (``model="tiny"``): the files a recipe's adapters load (Lightning,
Distill-LoRA, EliGen, In-Context, Lowres-Fix …), in the layout their publisher ships, with the module names and
shapes of the DiT they target, so the adapters' hub path runs end to end offline.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from qi_core.errors import InvalidInputError
from qi_plugins.lora.formats import FORMATS, LoRAWeight, to_format

# The modules DiffSynth-Studio's Qwen-Image LoRA scripts train (its --lora_target_modules)
DIFFSYNTH_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1",
)  # fmt: skip
# lightx2v's few-step LoRAs also cover the first MLP projections
LIGHTX2V_TARGETS = (*DIFFSYNTH_TARGETS, "img_mlp.net.0.proj", "txt_mlp.net.0.proj")
# Layouts: qi's four, plus lightx2v's (ComfyUI's lora_down/lora_up/alpha keys without "diffusion_model.")
LAYOUTS = (*FORMATS, "lightx2v")


def tiny_lora(model: nn.Module, seed: int, *, targets: tuple[str, ...] = DIFFSYNTH_TARGETS, rank: int = 4,
              alpha: float | None = None, std: float = 0.05) -> dict[str, LoRAWeight]:  # fmt: skip
    """A seeded rank-``rank`` LoRA for every ``transformer_blocks.N.<target>`` Linear of ``model`` (a meta-device
    model is enough: only names and shapes are read). ``std`` keeps the update small next to the weights but
    large enough that a test sees it."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, LoRAWeight] = {}
    for name, m in model.named_modules():
        parts = name.split(".", 2)
        if not (isinstance(m, nn.Linear) and parts[0] == "transformer_blocks" and parts[-1] in targets):
            continue
        down = torch.randn(rank, m.in_features, generator=g) / math.sqrt(m.in_features)  # (r, in)
        up = torch.randn(m.out_features, rank, generator=g) * std  # (out, r)
        out[name] = LoRAWeight(down, up, None if alpha is None else torch.tensor(float(alpha)))
    if not out:
        raise InvalidInputError(f"tiny LoRA: the model has no transformer_blocks.N Linear named {targets}")
    return out


def save_tiny_lora(path: str | os.PathLike, model: nn.Module, seed: int, *, layout: str = "diffsynth",
                   **kw: object) -> Path:  # fmt: skip
    """Write :func:`tiny_lora` to ``path`` (safetensors) in ``layout`` (one of :data:`LAYOUTS`)."""
    from safetensors.torch import save_file

    if layout not in LAYOUTS:
        raise InvalidInputError(f"unknown tiny LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    tensors = to_format(tiny_lora(model, seed, **kw), "comfyui" if layout == "lightx2v" else layout)
    if layout == "lightx2v":
        tensors = {k.removeprefix("diffusion_model."): v for k, v in tensors.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path
