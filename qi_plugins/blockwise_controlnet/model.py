"""The blockwise ControlNet: one small residual block per DiT block (DiffSynth-Studio's
``QwenImageBlockWiseControlNet``, same state-dict keys).

``img_in`` projects the patchified control latents once; after DiT block ``b`` the residual
``output_proj(GELU(input_proj(x_rms(img) + y_rms(cond))))`` is added to the target image tokens.

Keys: ``img_in.{weight,bias}``, ``controlnet_blocks.{b}.{x_rms.weight, y_rms.weight, input_proj.*, output_proj.*}``.

Axes: B batch · C latent channels (16, or 17 for the inpaint variant) · (h, w) latent size · (P, Q) = 2x2 patch ·
N = (h/2)(w/2) target tokens · D model dim.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from qi_core.errors import InvalidInputError, ModelLoadError
from qi_core.loading import load_module, read_json, weight_files
from qi_plugins.qwen_image.dit import RMSNorm

LATENT_PATCH_DIM = 64  # 16 latent channels x 2x2 patch: what the DiT's own img_in reads


@dataclass(frozen=True)
class ControlNetConfig:
    """Constructor arguments of DiffSynth's ``QwenImageBlockWiseControlNet`` (defaults = the released models)."""

    num_layers: int = 60  # control blocks; one per DiT block (Qwen-Image has 60)
    in_dim: int = LATENT_PATCH_DIM  # patchified control-latent features (16 channels x 2x2)
    additional_in_dim: int = 0  # extra patchified features: 4 for the inpaint variant (mask channel x 2x2)
    dim: int = 3072  # model dim; must equal the DiT's inner dim

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if (
                not isinstance(v, int)
                or isinstance(v, bool)
                or v < (0 if f.name == "additional_in_dim" else 1)
            ):
                raise ModelLoadError(f"ControlNet config: {f.name} must be a positive integer, got {v!r}")

    @property
    def input_channels(self) -> int:
        """Latent channels of the conditioning before patchifying (16, or 17 with the inpaint mask)."""
        return (self.in_dim + self.additional_in_dim) // 4

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ControlNetConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class ControlBlock(nn.Module):
    """``output_proj(GELU(input_proj(x_rms(x) + y_rms(y))))``; exact (erf) GELU as in DiffSynth."""

    def __init__(self, dim: int):
        super().__init__()
        self.x_rms = RMSNorm(dim)
        self.y_rms = RMSNorm(dim)
        self.input_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.output_proj(F.gelu(self.input_proj(self.x_rms(x) + self.y_rms(y))))


class BlockwiseControlNet(nn.Module):
    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = c = config
        self.img_in = nn.Linear(c.in_dim + c.additional_in_dim, c.dim)
        self.controlnet_blocks = nn.ModuleList(ControlBlock(c.dim) for _ in range(c.num_layers))

    def init_weights(self) -> None:
        """Zero ``img_in`` and every ``output_proj``: a fresh ControlNet adds exactly nothing (training start)."""
        for layer in (self.img_in, *(b.output_proj for b in self.controlnet_blocks)):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def project(self, cond: torch.Tensor) -> torch.Tensor:
        """Control latents (B, C, h, w) → projected tokens (B, N, D)."""
        tokens = rearrange(cond, "B C (h P) (w Q) -> B (h w) (C P Q)", P=2, Q=2)
        if tokens.shape[-1] != self.img_in.in_features:
            raise InvalidInputError(
                f"this ControlNet reads {self.config.input_channels}-channel conditionings, got "
                f"{cond.shape[1]} channels; the inpaint ControlNet needs inpaint_mask, the others must not get one"
            )
        return self.img_in(tokens.to(self.img_in.weight.dtype))

    def block(self, index: int, img: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Residual of control block ``index`` for image tokens (B, N, D) and projected conditioning (B, N, D)."""
        return self.controlnet_blocks[index](img, cond)

    forward = block


class BlockwiseControlNets(nn.Module):
    """Several ControlNets, indexed by ``ControlNetInput.controlnet_id`` (the order they were loaded in)."""

    def __init__(self, models: list[BlockwiseControlNet], sources: list[str] | None = None):
        super().__init__()
        self.models = nn.ModuleList(models)
        self.sources = list(sources or [f"controlnet {i}" for i in range(len(models))])

    def __len__(self) -> int:
        return len(self.models)

    def __getitem__(self, i: int) -> BlockwiseControlNet:
        return self.models[i]


# -- loading ---------------------------------------------------------------------------------------------
_BLOCK_KEY = re.compile(r"controlnet_blocks\.(\d+)\.")


def config_for(files: list[Path]) -> ControlNetConfig:
    """Sizes from a side-car ``<file>.json`` (``{"init_args": {...}}`` or flat), else ``config.json`` beside the
    file, else inferred from the weight shapes. A JSON without any ControlNet field is ignored."""
    first = files[0]
    known = {f.name for f in fields(ControlNetConfig)}
    for candidate in (first.with_suffix(".json"), first.parent / "config.json"):
        if candidate.is_file():
            d = read_json(candidate)
            d = d.get("init_args", d) if isinstance(d, dict) else {}
            if isinstance(d, dict) and known & set(d):
                return ControlNetConfig.from_dict(d)
    return infer_config(files)


def infer_config(files: list[Path]) -> ControlNetConfig:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                shapes[k] = tuple(fh.get_slice(k).get_shape())
    if "img_in.weight" not in shapes:
        some = ", ".join(sorted(shapes)[:3]) or "no tensors"
        if any(k.startswith("pipe.blockwise_controlnet.") for k in shapes):
            raise ModelLoadError(
                f"{files[0]} was saved by ControlNet training with its module prefix ({some}); train with "
                "--remove_prefix_in_ckpt pipe.blockwise_controlnet.models.0. (the seed's setting) to get "
                "loadable ControlNet keys"
            )
        raise ModelLoadError(
            f"{files[0]} is not a blockwise ControlNet: it has no 'img_in.weight' (found {some}); expected "
            "DiffSynth-Studio's Qwen-Image-Blockwise-ControlNet keys"
        )
    dim, fan_in = shapes["img_in.weight"]
    blocks = {int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))}
    if not blocks:
        raise ModelLoadError(f"{files[0]}: no 'controlnet_blocks.<i>.*' weights")
    return ControlNetConfig(
        num_layers=max(blocks) + 1,
        in_dim=LATENT_PATCH_DIM,
        additional_in_dim=fan_in - LATENT_PATCH_DIM,
        dim=dim,
    )


def load_controlnet(
    files: list[Path], device: Any = "cpu", dtype: torch.dtype | None = None
) -> BlockwiseControlNet:
    config = config_for(files)
    return load_module(
        lambda: BlockwiseControlNet(config), files, device=device, dtype=dtype,
        what=f"blockwise ControlNet ({files[0]})",
    )  # fmt: skip


def controlnet_file_groups(source: Path | list[Path]) -> list[list[Path]]:
    """One group of files per ControlNet: a list gives one ControlNet per entry (in controlnet_id order); a file
    or a folder (single file or shards) gives one ControlNet."""
    if isinstance(source, list):
        if not source:
            raise ModelLoadError("blockwise_controlnet: an empty list of ControlNet files was given")
        return [weight_files(p) if Path(p).is_dir() else [Path(p)] for p in source]
    return [weight_files(Path(source))]


def controlnets(root: Path, folder: Path | list[Path], device: Any = "cpu", dtype: torch.dtype | None = None):
    """Component factory (role ``blockwise_controlnet``)."""
    groups = controlnet_file_groups(folder)
    models = [load_controlnet(g, device=device, dtype=dtype) for g in groups]
    return BlockwiseControlNets(models, [str(g[0]) for g in groups])
