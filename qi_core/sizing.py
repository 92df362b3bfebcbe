"""Training image sizes: the seed's rule for the size a sample trains at, and its crop-and-resize.

A metadata column holding files is decoded by a *file loader*, ``loader(path, size) -> value`` (``size``: the
run's :class:`SizeSpec`); :func:`load_rgb` is the default. An injector whose column needs other decoding declares
its own in ``Injector.file_loaders`` (``{column: loader}``); the trainer reads them per run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from qi_core.errors import InvalidInputError

SIZE_MULTIPLE = 16  # VAE factor 8 × DiT patch 2 (the seed's height/width division factor)


@dataclass(frozen=True)
class SizeSpec:
    """How images are sized: fixed (height, width) or dynamic under ``max_pixels``."""

    height: int | None = None  # fixed training height; None = dynamic
    width: int | None = None  # fixed training width
    max_pixels: int = 1024 * 1024  # dynamic: images above this many pixels are scaled down
    multiple: int = SIZE_MULTIPLE  # both sides are floored to a multiple of this

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) an image of ``width``×``height`` is trained at (the seed's rule)."""
        if self.height is not None and self.width is not None:
            return self.height, self.width
        if width * height > self.max_pixels:
            scale = (width * height / self.max_pixels) ** 0.5
            height, width = int(height / scale), int(width / scale)  # truncation, as the seed
        h, w = height // self.multiple * self.multiple, width // self.multiple * self.multiple
        if h == 0 or w == 0:
            raise InvalidInputError(
                f"an image of {width}x{height} (WxH) is smaller than {self.multiple} pixels on a side after "
                f"sizing; training needs at least {self.multiple}x{self.multiple}"
            )
        return h, w


def crop_and_resize(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scale by ``max(target/orig)`` (bilinear), then centre-crop to ``width``×``height`` (the seed's rule)."""
    w0, h0 = image.size
    scale = max(width / w0, height / h0)
    size = (round(w0 * scale), round(h0 * scale))
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    left = int(round((size[0] - width) / 2.0))
    top = int(round((size[1] - height) / 2.0))
    if (left, top, size) == (0, 0, (width, height)):
        return image
    return image.crop((left, top, left + width, top + height))


FileLoader = Callable[[str, SizeSpec], Any]
"""``loader(absolute_path, size_spec) -> value`` handed to the pipeline (usually a PIL image)."""


def load_rgb(path: str, spec: SizeSpec) -> Image.Image:
    """Default file loader: RGB, cropped and resized to the training size."""
    with Image.open(path) as im:
        im.load()
        image = im.convert("RGB")
    return crop_and_resize(image, *spec.target(*image.size))
