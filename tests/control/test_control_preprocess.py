"""Control-image preprocessing without OpenCV or torchvision: Canny edges and user-supplied depth maps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from qi_core.errors import InvalidInputError
from qi_plugins.blockwise_controlnet.preprocess import canny_edges, depth_to_image


def square(size: int = 48, lo: int = 12, hi: int = 35) -> Image.Image:
    img = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(img).rectangle([lo, lo, hi, hi], fill=(255, 255, 255))
    return img


def test_canny_finds_the_outline_of_a_square():
    edges = canny_edges(square())
    arr = np.asarray(edges)
    assert edges.mode == "RGB" and edges.size == (48, 48)
    assert set(np.unique(arr)) == {0, 255} and (arr[..., 0] == arr[..., 1]).all()
    e = arr[..., 0] > 0
    ys, xs = np.nonzero(e)
    # every edge pixel lies within one pixel of the square's border (11.5 … 35.5), none inside or outside
    on_border = (np.minimum(np.abs(ys - 11.5), np.abs(ys - 35.5)) <= 1) | (
        np.minimum(np.abs(xs - 11.5), np.abs(xs - 35.5)) <= 1
    )
    assert on_border.all()
    assert not e[20:28, 20:28].any() and not e[:8].any()
    # thin and closed: each side of the outline is found along its whole length, 1-2 pixels wide
    assert 1 <= e[24, :].sum() <= 4 and 1 <= e[:, 24].sum() <= 4


def test_canny_thresholds_and_resize():
    faint = Image.new("RGB", (32, 32), (0, 0, 0))
    ImageDraw.Draw(faint).rectangle([8, 8, 23, 23], fill=(20, 20, 20))  # gradient ≈ 80 < low
    assert not np.asarray(canny_edges(faint)).any()
    assert np.asarray(canny_edges(faint, low=10, high=20)).any()
    assert canny_edges(square(), size=(96, 64)).size == (96, 64)
    with pytest.raises(InvalidInputError, match="low ≤ high"):
        canny_edges(square(), low=200, high=100)


def test_depth_map_to_control_image():
    depth = np.array([[0.0, 1.0], [2.0, 4.0]], dtype=np.float32)
    img = depth_to_image(depth)
    assert img.mode == "RGB" and np.asarray(img)[..., 0].tolist() == [[0, 64], [128, 255]]
    assert np.asarray(depth_to_image(depth, invert=True))[..., 0].tolist() == [[255, 191], [128, 0]]
    assert depth_to_image(depth, size=(8, 4)).size == (8, 4)
    grey = Image.fromarray(np.array([[10, 20], [30, 40]], dtype=np.uint8))
    assert np.asarray(depth_to_image(grey))[..., 0].tolist() == [[0, 85], [170, 255]]
    assert not np.asarray(depth_to_image(np.ones((3, 3)))).any()  # flat depth: no structure


@pytest.mark.parametrize(
    ("depth", "words"), [(np.array([[0.0, np.nan]]), "NaN"), (np.zeros((2, 2, 2)), "must be (H, W)")]
)
def test_depth_errors(depth, words):
    with pytest.raises(InvalidInputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        depth_to_image(depth)
