"""Control-image preprocessing with Pillow and numpy only (no OpenCV, no torchvision).

* :func:`canny_edges` — white edges on black, the kind of image the Canny ControlNet was trained on
  (DiffSynth's annotator runs OpenCV's ``cv2.Canny(image, 100, 200)``; this is the same algorithm: 3x3 Sobel
  gradients, non-maximum suppression, double threshold, hysteresis).
* :func:`depth_to_image` — a depth map you computed elsewhere (any estimator) as the RGB image the Depth
  ControlNet reads: near = bright.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from qi_core.errors import InvalidInputError
from qi_core.images import load_image

_SOBEL = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float32)


def canny_edges(image: Any, low: float = 100.0, high: float = 200.0, blur_sigma: float = 0.0,
                size: tuple[int, int] | None = None) -> Image.Image:  # fmt: skip
    """Canny edge map of ``image`` (PIL, path or uint8 array) as an RGB image, edges 255 on 0.

    ``low``/``high``: hysteresis thresholds on the 3x3 Sobel gradient magnitude of the 0..255 grey image
    (OpenCV's scale, so ``cv2.Canny`` thresholds carry over). ``blur_sigma``: optional Gaussian pre-blur
    (OpenCV applies none). ``size``: (width, height) to resize the input to first (bicubic), e.g. the output size.
    """
    if not 0 <= low <= high:
        raise InvalidInputError(f"canny thresholds need 0 ≤ low ≤ high, got low={low}, high={high}")
    img = load_image(image, "image").convert("RGB")
    if size is not None:
        img = img.resize(size)
    # ITU-R 601 luma, as OpenCV's RGB→grey conversion
    grey = np.asarray(img, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if blur_sigma > 0:
        grey = _gaussian(grey, blur_sigma)
    gx, gy = _conv3(grey, _SOBEL), _conv3(grey, _SOBEL.T)
    mag = np.hypot(gx, gy)
    thin = _non_max_suppression(mag, gx, gy)
    edges = _hysteresis(thin >= high, thin >= low)
    out = np.where(edges, 255, 0).astype(np.uint8)
    return Image.fromarray(np.stack([out] * 3, axis=-1), mode="RGB")


def depth_to_image(depth: Any, *, invert: bool = False, size: tuple[int, int] | None = None) -> Image.Image:
    """A user-supplied depth map → the RGB control image (min-max normalised to 0..255, near = bright).

    ``depth``: an (H, W) float/int array or a (greyscale or RGB) image. Relative-depth estimators (MiDaS,
    Depth-Anything) output larger = nearer, which is what the ControlNet expects; metric depth (larger = farther)
    needs ``invert=True``. ``size``: (width, height) of the result (bicubic), e.g. the output size.
    """
    if isinstance(depth, np.ndarray) and depth.dtype != np.uint8:
        arr = depth.astype(np.float64)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.ndim != 2:
            raise InvalidInputError(f"a depth array must be (H, W), got shape {depth.shape}")
    else:
        arr = np.asarray(load_image(depth, "depth").convert("L"), dtype=np.float64)
    if not np.isfinite(arr).all():
        raise InvalidInputError("the depth map contains NaN or infinite values; fill or clip them first")
    lo, hi = float(arr.min()), float(arr.max())
    norm = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if invert:
        norm = 1.0 - norm
    grey = np.round(norm * 255).astype(np.uint8)
    img = Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
    return img.resize(size) if size is not None and img.size != tuple(size) else img


# -- helpers ---------------------------------------------------------------------------------------------
def _conv3(x: np.ndarray, k: np.ndarray) -> np.ndarray:
    """3x3 correlation with reflected borders (OpenCV's BORDER_REFLECT_101)."""
    p = np.pad(x, 1, mode="reflect")
    h, w = x.shape
    return sum(k[i, j] * p[i : i + h, j : j + w] for i in range(3) for j in range(3))


def _gaussian(x: np.ndarray, sigma: float) -> np.ndarray:
    r = max(1, int(round(3 * sigma)))
    t = np.arange(-r, r + 1, dtype=np.float32)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    p = np.pad(x, r, mode="reflect")
    rows = sum(g[i] * p[i : i + x.shape[0], :] for i in range(2 * r + 1))
    return sum(g[j] * rows[:, j : j + x.shape[1]] for j in range(2 * r + 1))


def _non_max_suppression(mag: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Keep a pixel only where its magnitude is a maximum across the edge (4 quantised gradient directions)."""
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    p = np.pad(mag, 1)
    h, w = mag.shape

    def nb(di: int, dj: int) -> np.ndarray:
        return p[1 + di : 1 + di + h, 1 + dj : 1 + dj + w]

    horiz = (angle < 22.5) | (angle >= 157.5)
    diag = (angle >= 22.5) & (angle < 67.5)
    vert = (angle >= 67.5) & (angle < 112.5)
    anti = (angle >= 112.5) & (angle < 157.5)
    keep = (
        (horiz & (mag >= nb(0, -1)) & (mag > nb(0, 1)))
        | (diag & (mag >= nb(-1, -1)) & (mag > nb(1, 1)))
        | (vert & (mag >= nb(-1, 0)) & (mag > nb(1, 0)))
        | (anti & (mag >= nb(-1, 1)) & (mag > nb(1, -1)))
    )
    return np.where(keep, mag, 0.0)


def _hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Weak pixels 8-connected (through weak pixels) to a strong one become edges."""
    edges = strong & weak
    while True:
        p = np.pad(edges, 1)
        h, w = edges.shape
        grown = np.zeros_like(edges)
        for di in (-1, 0, 1):
            for dj in (-1, 0, 1):
                grown |= p[1 + di : 1 + di + h, 1 + dj : 1 + dj + w]
        grown &= weak
        if (grown == edges).all():
            return edges
        edges = grown
