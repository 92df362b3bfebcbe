"""The official openai client against ``qi serve``, unchanged apart from ``base_url``: the images it gets back
are, pixel for pixel, what the same call gives in-process."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest
from serve_helpers import direct, image, pixels, png, serve_fixture, tiny  # noqa: F401

from qi_core.images import image_settings

STEPS = 2


def client(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "v1", api_key=key, max_retries=0)


def test_generate_b64_is_the_in_process_image(serve):
    pipe = tiny("qwen-image")
    base = serve(pipe)
    out = client(base).images.generate(
        prompt="a red fox in the snow", n=2, size="32x32", response_format="b64_json",
        extra_body={"seed": 7, "num_inference_steps": STEPS, "cfg_scale": 2.5, "negative_prompt": "blur"},
    )  # fmt: skip
    assert [d.seed for d in out.data] == [7, 8] and out.seed == 7  # image j: seed + j
    for j, item in enumerate(out.data):
        got = pixels(base64.b64decode(item.b64_json))
        want = direct(pipe, prompt="a red fox in the snow", height=32, width=32, seed=7 + j,
                      num_inference_steps=STEPS, cfg_scale=2.5, negative_prompt="blur")  # fmt: skip
        np.testing.assert_array_equal(got, want)


def test_generate_url_random_seed_and_reproduction_record(serve, tmp_path):
    pipe = tiny("qwen-image")
    base = serve(pipe, out_dir=tmp_path / "out")
    out = client(base).images.generate(
        prompt="a lighthouse", size="32x16", response_format="url",
        extra_body={"num_inference_steps": 1, "sampler": "heun", "guidance": "cfg-renorm"},
    )  # fmt: skip
    seed = out.data[0].seed
    assert isinstance(seed, int) and out.seed == seed  # no seed given: a random one, returned
    name = out.data[0].url.rsplit("/", 1)[1]
    served = httpx.get(out.data[0].url)
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    assert (tmp_path / "out" / name).read_bytes() == served.content
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]  # no temporary file left behind
    meta = image_settings(tmp_path / "out" / name)
    assert meta["seed"] == seed and meta["pipeline"] == "qwen-image" and meta["model"] == "tiny"
    assert meta["sampler"] == "heun" and meta["guidance"] == "cfg-renorm" and meta["loras"] == []
    assert {"qi_version", "num_inference_steps", "cfg_scale", "height", "width", "prompt"} <= set(meta)
    want = direct(pipe, prompt="a lighthouse", height=16, width=32, seed=seed, num_inference_steps=1,
                  sampler="heun", guidance="cfg-renorm")  # fmt: skip
    np.testing.assert_array_equal(pixels(served.content), want)


def test_output_format_webp_and_models(serve):
    base = serve(tiny("qwen-image"))
    c = client(base)
    assert [m.id for m in c.models.list()] == ["qwen-image"]
    out = c.images.generate(
        prompt="x", size="16x16", output_format="webp", extra_body={"num_inference_steps": 1}
    )
    assert image(base64.b64decode(out.data[0].b64_json)).format == "WEBP"


def test_edit_images_go_to_the_declared_images_parameter(serve):
    """qwen-image-edit: ``image[]`` (two files, as the client sends a list) → edit_image, its images-kind
    parameter the recipe requires."""
    pipe = tiny("qwen-image-edit")
    base = serve(pipe)
    a, b = png(32, 32, seed=1), png(16, 32, seed=2)
    out = client(base).images.edit(
        image=[("a.png", a, "image/png"), ("b.png", b, "image/png")], prompt="make it winter", size="32x32",
        extra_body={"seed": 3, "num_inference_steps": STEPS, "edit_image_auto_resize": False},
    )  # fmt: skip
    want = direct(pipe, prompt="make it winter", height=32, width=32, seed=3, num_inference_steps=STEPS,
                  edit_image=[image(a), image(b)], edit_image_auto_resize=False)  # fmt: skip
    np.testing.assert_array_equal(pixels(base64.b64decode(out.data[0].b64_json)), want)


def test_edit_on_qwen_image_is_img2img_with_mask(serve):
    """qwen-image: ``image`` → input_image (its first image-kind parameter), ``mask`` → inpaint_mask; without a
    size the output takes the image's."""
    pipe = tiny("qwen-image")
    base = serve(pipe)
    src, mask = png(32, 16, seed=4), png(32, 16, seed=5, mode="L")
    out = client(base).images.edit(
        image=("src.png", src, "image/png"), mask=("mask.png", mask, "image/png"), prompt="a boat",
        extra_body={"seed": 11, "num_inference_steps": STEPS, "denoising_strength": 0.6},
    )  # fmt: skip
    want = direct(pipe, prompt="a boat", height=16, width=32, seed=11, num_inference_steps=STEPS,
                  denoising_strength=0.6, input_image=image(src), inpaint_mask=image(mask))  # fmt: skip
    np.testing.assert_array_equal(pixels(base64.b64decode(out.data[0].b64_json)), want)


def test_client_sees_typed_errors(serve):
    base = serve(tiny("qwen-image"))
    with pytest.raises(openai.BadRequestError) as e:
        client(base).images.generate(prompt="x", size="16x16", extra_body={"cfg_scale": -1})
    assert e.value.status_code == 400 and e.value.body["param"] == "cfg_scale"
    with pytest.raises(openai.BadRequestError) as e:
        client(base).images.edit(image=("x.png", io.BytesIO(b"not an image"), "image/png"), prompt="x")
    assert e.value.body["param"] == "image"
