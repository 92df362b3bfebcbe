"""Images ↔ tensors with Pillow and torch only (no torchvision)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from qi_core.errors import ImageReadError, OutputPathError

#: The image formats written by suffix.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def load_image(value: Any, what: str = "image") -> Image.Image:
    """A PIL image from a PIL image, a path, or an (H, W[, C]) uint8 array; ImageReadError otherwise."""
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        try:
            with Image.open(value) as im:
                im.load()
                return im.copy()
        except FileNotFoundError:
            raise ImageReadError(f"{what}: file {os.fspath(value)!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ImageReadError(f"{what}: {os.fspath(value)!r} cannot be read as an image ({e})") from None
    if isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim in (2, 3):
        return Image.fromarray(value)
    raise ImageReadError(
        f"{what}: expected a PIL image, a path to an image file or a uint8 array, got {type(value).__name__}"
    )


def image_to_tensor(image: Image.Image, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels → (1, C, H, W) in [-1, 1]: ``x·(2/255) − 1`` in float32, then cast."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    if arr.ndim == 2:
        arr = arr[..., None]
    x = arr * (2 / 255) - 1
    return x.permute(2, 0, 1)[None].to(dtype)


def tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) decoder output → (H, W, C) uint8: ``clip((x + 1)·127.5, 0, 255)`` truncated (not rounded)."""
    y = ((x.float() + 1) * 127.5).clip(0, 255).to(torch.uint8)
    return y.permute(1, 2, 0).cpu().numpy()


def tensor_to_image(x: torch.Tensor) -> Image.Image:
    arr = tensor_to_uint8(x)
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return Image.fromarray(arr[..., 0] if mode == "L" else arr, mode=mode)


def gaussian_blur(x: torch.Tensor, kernel_size: int, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) with reflect padding (the kernel torchvision's GaussianBlur builds)."""
    sigma_t = torch.tensor(float(sigma), dtype=torch.float32)
    half = (kernel_size - 1) * 0.5
    pos = torch.linspace(-half, half, steps=kernel_size)
    pdf = torch.exp(-0.5 * (pos / sigma_t).pow(2))
    k1 = pdf / pdf.sum()
    k2 = (k1[:, None] * k1[None, :]).to(x.dtype)
    C = x.shape[1]
    pad = kernel_size // 2
    y = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    return torch.nn.functional.conv2d(y, k2.expand(C, 1, kernel_size, kernel_size), groups=C)


def save_image(image: Any, path: str | os.PathLike, meta: dict[str, Any], quality: int = 95) -> None:
    """Write an image in the format its suffix names, with the generation settings, atomically: PNG text chunks
    (``parameters`` = the JSON, and one ``qi:KEY`` chunk per setting); JPEG and WebP carry the JSON in the
    EXIF ImageDescription."""
    from qi_core.atomic import atomic_file

    path = Path(path)
    text = json.dumps(meta, ensure_ascii=False, default=str)
    suffix = path.suffix.lower()
    try:
        with atomic_file(path) as tmp:
            if suffix == ".png":
                from PIL.PngImagePlugin import PngInfo

                info = PngInfo()
                for k, v in meta.items():
                    info.add_text(f"qi:{k}", str(v))
                info.add_text("parameters", text)
                image.save(tmp, format="PNG", pnginfo=info)
            else:
                exif = Image.Exif()
                exif[0x010E] = text  # ImageDescription
                fmt = "WEBP" if suffix == ".webp" else "JPEG"
                image.convert("RGB").save(tmp, format=fmt, quality=quality, exif=exif.tobytes())
    except PermissionError as e:  # the up-front check passed, yet the folder refused (ACLs, a quota …)
        raise OutputPathError(f"cannot write {path}: {e.strerror}; choose a writable --out location") from e


def image_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The generation settings :func:`save_image` wrote into an image file ({} when it has none)."""
    with Image.open(path) as im:
        text = im.info.get("parameters")
        if text is None:
            text = im.getexif().get(0x010E)
    if not text:
        return {}
    try:
        out = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return out if isinstance(out, dict) else {}
