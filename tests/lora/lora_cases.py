"""Helpers of the LoRA tests: one random LoRA for a model, written in each layout by plain key renaming.

The layouts are built here independently of ``qi_plugins.lora.formats`` so the tests check our reader
against the layouts as people share them, not against our own writer.
"""

from __future__ import annotations

import torch
from torch import nn

from qi_core.pipeline import Pipeline

LAYOUTS = ("diffsynth", "peft", "kohya", "comfyui", "comfyui-ab")


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def random_lora(model: nn.Module, rank: int = 4, seed: int = 0, with_alpha: bool = True):
    """name → (A (r, in), B (out, r), alpha or None) for every Linear; alpha on every other module."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(linear_names(model)):
        w = model.get_submodule(name).weight
        a = torch.randn(rank, w.shape[1], generator=g) * 0.2
        b = torch.randn(w.shape[0], rank, generator=g) * 0.2
        alpha = torch.tensor([2.0, 8.0][i % 4 // 2]) if with_alpha and i % 2 else None
        out[name] = (a, b, alpha)
    return out


def layout(lora: dict, fmt: str) -> dict[str, torch.Tensor]:
    """The LoRA as a state dict in one of the layouts people share."""
    sd = {}
    for name, (a, b, alpha) in lora.items():
        if fmt == "diffsynth":
            stem, ka, kb = name, ".lora_A.default.weight", ".lora_B.default.weight"
        elif fmt == "peft":  # no alpha in this layout: diffusers bakes alpha / rank into the weights
            stem, ka, kb = f"transformer.{name}", ".lora_A.weight", ".lora_B.weight"
            if alpha is not None:
                a, alpha = a * (float(alpha) / a.shape[0]), None
        elif fmt == "kohya":
            stem, ka, kb = "lora_unet_" + name.replace(".", "_"), ".lora_down.weight", ".lora_up.weight"
        elif fmt == "comfyui":
            stem, ka, kb = f"diffusion_model.{name}", ".lora_down.weight", ".lora_up.weight"
        else:  # comfyui-ab: ComfyUI / lightx2v files with A/B names
            stem, ka, kb = f"diffusion_model.{name}", ".lora_A.weight", ".lora_B.weight"
        sd[stem + ka], sd[stem + kb] = a.clone(), b.clone()
        if alpha is not None:
            sd[stem + ".alpha"] = alpha.clone()
    return sd


def expected_weight(w: torch.Tensor, a, b, alpha, scale: float = 1.0) -> torch.Tensor:
    """``W + scale · (alpha/rank) · B @ A`` in float32, or in float64 for a float64 ``W``."""
    s = 1.0 if alpha is None else float(alpha) / a.shape[0]
    c = torch.promote_types(w.dtype, torch.float32)
    return (w.to(c) + scale * (b.to(c) @ (a.to(c) * s))).to(w.dtype)


def dit_pipe(dit: nn.Module) -> Pipeline:
    """A minimal pipeline holding only a DiT (adapters only need ``components``)."""
    return Pipeline("qwen-image", {"dit": dit}, scheduler=None, injectors=[])
