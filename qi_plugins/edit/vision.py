"""Qwen2-VL image preprocessing in torch only (no torchvision): what the text encoder's vision tower reads.

Reproduces transformers' fast (torchvision-backed) ``Qwen2VLImageProcessor`` and ``Qwen2VLProcessor``, which
produced the reference data: PIL image → RGB uint8 (transparency composited on white) → ``smart_resize`` to
sides that are multiples of ``patch_size · merge_size`` → bicubic *antialiased* resize on the uint8 tensor
(torchvision calls ``torch.nn.functional.interpolate`` natively on uint8 on CPU; resampling in float instead
moves pixel values by up to 0.04 and the prompt embedding far outside tolerance) → ``(x − 255·mean) / (255·std)``
in float32 → flattened patches. The prompt's ``<|image_pad|>`` is expanded to one token per merged patch.

Axes: T temporal patch (the image is repeated ``temporal_patch_size`` times) · C channels · (gh, gw) patch grid
· (mh, mw) merge window · (P, Q) pixels in a patch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from PIL import Image

from qi_core.errors import InvalidInputError, ModelLoadError
from qi_core.loading import read_json

IMAGE_TOKEN = "<|image_pad|>"
BICUBIC = 3  # PIL's resample code, as preprocessor_config.json stores it


@dataclass(frozen=True)
class VisionConfig:
    """``processor/preprocessor_config.json`` (defaults = transformers' Qwen2-VL image processor)."""

    patch_size: int = 14  # vision-tower patch side in pixels
    temporal_patch_size: int = 2  # frames per patch; a still image is repeated
    merge_size: int = 2  # patches merged into one LLM token per side
    min_pixels: int = 56 * 56  # smallest resized area ("size.shortest_edge")
    max_pixels: int = 28 * 28 * 1280  # largest resized area ("size.longest_edge"); Qwen-Image-Edit: 12845056
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP mean
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP std
    rescale_factor: float = 1 / 255  # uint8 → [0, 1]
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VisionConfig:
        size = d.get("size") or {}
        kw: dict[str, Any] = {}
        for k in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
            if k in d:
                kw[k] = d[k]
        for k in ("do_resize", "do_rescale", "do_normalize"):
            if k in d:
                kw[k] = bool(d[k])
        # transformers: top-level min/max_pixels override size.shortest/longest_edge
        kw["min_pixels"] = d.get("min_pixels", size.get("shortest_edge", cls.min_pixels))
        kw["max_pixels"] = d.get("max_pixels", size.get("longest_edge", cls.max_pixels))
        for k in ("image_mean", "image_std"):
            if k in d:
                kw[k] = tuple(float(v) for v in d[k])
        resample = d.get("resample", BICUBIC)
        if resample != BICUBIC:
            raise ModelLoadError(
                f"preprocessor_config.json asks for resample={resample}; only bicubic (3), the value of every "
                "Qwen-Image-Edit release, is implemented"
            )
        return cls(**kw)


def smart_resize(height: int, width: int, cfg: VisionConfig) -> tuple[int, int]:
    """Sides that are multiples of ``cfg.factor`` with an area in [min_pixels, max_pixels], aspect kept."""
    f = cfg.factor
    if max(height, width) / min(height, width) > 200:
        raise InvalidInputError(
            f"image of {width}x{height} (WxH) is too elongated for the vision encoder: aspect ratio "
            f"{max(height, width) / min(height, width):.1f} > 200"
        )
    h, w = round(height / f) * f, round(width / f) * f
    if h * w > cfg.max_pixels:
        beta = math.sqrt(height * width / cfg.max_pixels)
        h = max(f, math.floor(height / beta / f) * f)
        w = max(f, math.floor(width / beta / f) * f)
    elif h * w < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (height * width))
        h = math.ceil(height * beta / f) * f
        w = math.ceil(width * beta / f) * f
    return h, w


def to_rgb_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8; transparency is composited onto white (as transformers does)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def resize_uint8(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic antialiased resize of (3, H, W) uint8, computed on uint8 as torchvision does on CPU."""
    if tuple(x.shape[-2:]) == (height, width):
        return x  # torchvision returns the input untouched
    y = F.interpolate(x[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y[0]


def image_patches(image: Image.Image, cfg: VisionConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Flattened patches (gh·gw, C·T·P·Q) in merge-window order, and the grid (t, gh, gw)."""
    x = to_rgb_uint8(image)
    H, W = x.shape[-2:]
    if cfg.do_resize:
        H, W = smart_resize(H, W, cfg)
        x = resize_uint8(x, H, W)
    if H % cfg.factor or W % cfg.factor:
        raise InvalidInputError(
            f"image of {W}x{H} (WxH) must have sides that are multiples of {cfg.factor} when resizing is off"
        )
    y = x.to(torch.float32)
    mean, std = torch.tensor(cfg.image_mean), torch.tensor(cfg.image_std)
    if cfg.do_normalize:
        # rescale folded into mean/std, as the fast processor does (bit-identical to it)
        scale = cfg.rescale_factor if cfg.do_rescale else 1.0
        y = (y - (mean * (1.0 / scale))[:, None, None]) / (std * (1.0 / scale))[:, None, None]
    elif cfg.do_rescale:
        y = y * cfg.rescale_factor
    m, p = cfg.merge_size, cfg.patch_size
    patches = rearrange(y, "C (gh mh P) (gw mw Q) -> (gh gw mh mw) C P Q", mh=m, mw=m, P=p, Q=p)
    patches = repeat(patches, "N C P Q -> N (C T P Q)", T=cfg.temporal_patch_size)
    return patches, (1, H // p, W // p)


class QwenVLProcessor:
    """Callable like transformers' ``Qwen2VLProcessor(text=[...], images=[...], padding=True)`` (images only)."""

    def __init__(self, tokenizer: Any, config: VisionConfig):
        self.tokenizer, self.config = tokenizer, config

    def images(self, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixel_values`` (Σ gh·gw, C·T·P·Q) float32 and ``image_grid_thw`` (n, 3) int64."""
        out = [image_patches(im, self.config) for im in images]
        pixel_values = torch.cat([p for p, _ in out], dim=0)
        grid = torch.tensor([g for _, g in out], dtype=torch.long)
        return pixel_values, grid

    def expand(self, text: str, grid: torch.Tensor) -> str:
        """Replace the i-th ``<|image_pad|>`` by one pad token per merged patch of image i."""
        parts = text.split(IMAGE_TOKEN)
        if len(parts) - 1 != grid.shape[0]:
            raise InvalidInputError(
                f"the prompt holds {len(parts) - 1} {IMAGE_TOKEN} tokens for {grid.shape[0]} images; "
                f"do not write {IMAGE_TOKEN} in the prompt yourself"
            )
        per_merge = self.config.merge_size**2
        out = parts[0]
        for g, rest in zip(grid.tolist(), parts[1:], strict=True):
            out += IMAGE_TOKEN * (g[0] * g[1] * g[2] // per_merge) + rest
        return out

    def __call__(self, text: Sequence[str], images: Sequence[Image.Image], padding: bool = True,
                 return_tensors: str = "pt", **_: Any) -> dict[str, torch.Tensor]:  # fmt: skip
        if len(text) != 1:
            raise InvalidInputError(f"one prompt at a time, got {len(text)}")
        pixel_values, grid = self.images(list(images))
        enc = self.tokenizer([self.expand(text[0], grid)], padding=padding, return_tensors="pt")
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "pixel_values": pixel_values,
            "image_grid_thw": grid,
        }


def load_processor(folder: Path, root: Path | None = None) -> QwenVLProcessor:
    """``processor/`` of an official Edit repository: its tokenizer (else ``tokenizer/``) and image settings."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = VisionConfig.from_dict(read_json(folder / "preprocessor_config.json"))
    tok_dir = folder
    if not any((folder / f).exists() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        tok_dir = Path(root or folder.parent) / "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the processor's tokenizer from {tok_dir}: {e}") from e
    return QwenVLProcessor(tokenizer, config)


def processor_factory(root: Path, folder: Path, device: Any, dtype: torch.dtype) -> QwenVLProcessor:
    """Encoder factory of the ``processor`` component (no weights: device and dtype are unused)."""
    return load_processor(folder, root)
