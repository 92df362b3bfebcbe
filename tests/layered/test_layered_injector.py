"""The ``layered`` injector's checks, the context-image hand-off, and ``qi layered`` writing RGBA PNGs."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN, GOLDEN_MODEL
from PIL import Image

import qi_core as qi
from qi_core.errors import ImageReadError, InvalidInputError
from qi_core.protocols import Injector

LAYERED = GOLDEN / "models" / "qwen_image_layered"


@pytest.fixture(scope="module")
def pipe():
    parts = {"dit": LAYERED / "transformer", "vae": LAYERED / "vae"}
    return qi.compose("qwen-image-layered-control", model=GOLDEN_MODEL, progress=False, components=parts)


def rgba(w: int, h: int) -> Image.Image:
    g = torch.Generator().manual_seed(w * h)
    return Image.fromarray(torch.randint(0, 256, (h, w, 4), generator=g, dtype=torch.uint8).numpy(), "RGBA")


def call(pipe, **kw):
    args = dict(prompt="a layer", height=32, width=48, num_inference_steps=1, seed=0, cfg_scale=1.0,
                layer_input_image=rgba(48, 32), progress_bar_cmd=lambda x: x, output_type="latent")  # fmt: skip
    return pipe(**{**args, **kw})


def test_recipe_defaults_follow_the_seed_examples(pipe):
    assert pipe.parameters()["layer_num"] == 0 and pipe.parameters()["num_inference_steps"] == 30
    layered = next(r for r in qi.pipelines() if r.name == "qwen-image-layered")
    assert layered.defaults["layer_num"] == 3 and layered.defaults["num_inference_steps"] == 50


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"layer_input_image": None}, "layer_input_image is required by pipeline"),
        ({"layer_num": -1}, "layer_num must be greater than or equal to 0, got -1"),
        ({"layer_num": 1.5}, "layer_num must be a valid integer"),
        ({"layer_input_image": rgba(40, 32)}, r"40x32 \(WxH\); both sides must be multiples of 16"),
    ],
)
def test_bad_inputs_fail_with_the_numbers(pipe, kw, match):
    with pytest.raises(InvalidInputError, match=match):
        call(pipe, **kw)


def test_unreadable_layer_input_is_an_image_read_error(pipe, tmp_path):
    with pytest.raises(ImageReadError, match="layer_input_image"):
        call(pipe, layer_input_image=tmp_path / "missing.png")


def test_layer_num_sets_the_frames_and_an_rgb_input_is_converted(pipe):
    latents = call(pipe, layer_num=2, layer_input_image=rgba(48, 32).convert("RGB"))
    assert latents.shape == (3, 16, 4, 6)


def test_one_layer_is_still_a_list_of_rgba_images(pipe):
    out = call(pipe, layer_num=0, output_type="pil")
    assert isinstance(out, list) and [(im.mode, im.size) for im in out] == [("RGBA", (48, 32))]


def test_context_image_is_rgba_resized_and_owned_by_the_context_injector_when_present(pipe):
    seen: dict[str, torch.Tensor] = {}
    pipe.tracer = lambda k, v: seen.__setitem__(k, v)
    try:
        call(pipe, context_image=Image.new("RGB", (20, 20), "white"))
        assert seen["context_latents"].shape == (1, 16, 4, 6)  # resized to width x height

        class ContextImage(Injector):  # stands in for the in-context plugin's injector
            name = "context-image"
            params = {"context_image": None}

        pipe.injectors.append(ContextImage())
        seen.clear()
        call(pipe, context_image=Image.new("RGB", (20, 20), "white"))
        assert "context_latents" not in seen  # left to the context-image injector
    finally:
        pipe.tracer = None
        pipe.injectors[:] = [i for i in pipe.injectors if i.name != "context-image"]


def test_qi_layered_writes_one_rgba_png_per_frame(tmp_path, monkeypatch, capsys):
    """`qi layered` on the built-in tiny layered model (``--model tiny`` builds it into the cache)."""
    from qi_core.cli import main

    monkeypatch.setenv("QI_CACHE_DIR", str(tmp_path / "cache"))
    rgba(32, 48).save(tmp_path / "in.png")
    out = tmp_path / "out" / "layers.png"
    argv = ["layered", str(tmp_path / "in.png"), "--model", "tiny", "--prompt", "a poster", "--layers", "2",
            "--steps", "1", "--seed", "3", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    files = sorted((tmp_path / "out").iterdir())
    assert [f.name for f in files] == ["layers_0.png", "layers_1.png", "layers_2.png"]
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGBA" and im.size == (32, 48)
            assert im.text["qi:layer_num"] == "2" and im.text["qi:pipeline"] == "qwen-image-layered"
    assert "layers_2.png" in capsys.readouterr().out
