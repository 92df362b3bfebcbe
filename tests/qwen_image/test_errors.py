"""Typed, actionable errors for bad input, from the public interface."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from PIL import Image
from safetensors.torch import load_file, save_file

import qi_core as qi
from qi_core.errors import (
    ImageReadError,
    InvalidInputError,
    MissingComponentError,
    UnknownNameError,
    WeightMismatchError,
)

FAST = {"num_inference_steps": 1, "progress_bar_cmd": lambda x: x, "output_type": "latent", "seed": 0}


@pytest.fixture(scope="module")
def pipe():
    return qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)


def test_size_not_multiple_of_16_names_nearest_sizes(pipe):
    with pytest.raises(
        InvalidInputError, match=r"multiples of 16, got 70x64.*heights: 64 or 80, widths: 64$"
    ):
        pipe("x", height=70, width=64, **FAST)
    with pytest.raises(
        InvalidInputError, match="height must be greater than 0, got -16 — height: image height"
    ):
        pipe("x", height=-16, width=64, **FAST)


@pytest.mark.parametrize(
    ("strength", "says"),
    [
        (-0.1, "greater than or equal to 0"),
        (1.5, "less than or equal to 1"),
        ("high", "a valid number, unable to parse string as a number"),
    ],
)
def test_strength_outside_unit_interval(pipe, strength, says):
    with pytest.raises(InvalidInputError, match=f"denoising_strength must be {says}, got"):
        pipe("x", height=32, width=32, denoising_strength=strength, **FAST)


def test_strength_below_one_needs_input_image(pipe):
    with pytest.raises(InvalidInputError, match="needs a starting image"):
        pipe("x", height=32, width=32, denoising_strength=0.5, **FAST)


@pytest.mark.parametrize("steps", [0, -3, 2.5])
def test_steps_below_one(pipe, steps):
    with pytest.raises(InvalidInputError, match="num_inference_steps must be"):
        pipe("x", height=32, width=32, **{**FAST, "num_inference_steps": steps})


def test_unknown_call_parameter_suggests_a_name(pipe):
    with pytest.raises(InvalidInputError, match="Did you mean cfg_scale"):
        pipe("x", height=32, width=32, cfg_scal=2.0, **FAST)


def test_unknown_pipeline_name():
    with pytest.raises(UnknownNameError, match="Known pipelines: .*qwen-image"):
        qi.compose("no-such-pipeline", model=GOLDEN_MODEL)


def test_unreadable_input_image_and_mask(pipe, tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError, match="input_image: .*cannot be read as an image"):
        pipe("x", height=32, width=32, input_image=str(bad), **FAST)
    with pytest.raises(ImageReadError, match="does not exist"):
        pipe("x", height=32, width=32, input_image=str(tmp_path / "missing.png"), **FAST)
    good = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(
        ImageReadError, match=r"inpaint_mask must be an image \(PIL image, file path or array\), got 42"
    ):
        pipe("x", height=32, width=32, input_image=good, inpaint_mask=42, **FAST)
    with pytest.raises(InvalidInputError, match="inpaint_mask needs input_image"):
        pipe("x", height=32, width=32, inpaint_mask=good, **FAST)
    with pytest.raises(InvalidInputError, match="input_image is 32x32 .* asks for 48x32"):
        pipe("x", height=32, width=48, input_image=good, **FAST)


def test_missing_component_folder(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(GOLDEN_MODEL, model)
    shutil.rmtree(model / "vae")
    with pytest.raises(MissingComponentError, match="component folder 'vae' is missing"):
        qi.compose("qwen-image", model=model, progress=False)


def test_not_a_folder_nor_a_hub_id():
    with pytest.raises(MissingComponentError, match="neither a folder nor a hub id"):
        qi.compose("qwen-image", model="./definitely/not/here", progress=False)


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_weight_key_or_shape_mismatch_names_the_key(tmp_path, damage):
    model = tmp_path / "model"
    shutil.copytree(GOLDEN_MODEL, model)
    f = model / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(f)
    if damage == "missing":
        del sd["transformer_blocks.1.attn.to_q.weight"]
        match = "missing 1 key.*transformer_blocks.1.attn.to_q.weight"
    else:
        sd["proj_out.weight"] = torch.zeros(8, 64)
        match = r"proj_out.weight: expected shape \(64, 64\), found \(8, 64\)"
    save_file(sd, f)
    with pytest.raises(WeightMismatchError, match=match):
        qi.compose("qwen-image", model=model, progress=False)


def test_pickle_checkpoints_are_refused(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(GOLDEN_MODEL, model)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (model / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(Exception, match="safetensors files only"):
        qi.compose("qwen-image", model=model, progress=False)


def test_bad_output_type(pipe):
    with pytest.raises(InvalidInputError, match="output_type must be 'pil', 'np' or 'latent'"):
        pipe("x", height=32, width=32, **{**FAST, "output_type": "jpeg"})


def test_bad_config_json(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(GOLDEN_MODEL, model)
    cfg = json.loads((model / "transformer" / "config.json").read_text())
    cfg["axes_dims_rope"] = [8, 12, 10]
    (model / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidInputError, match=r"RoPE axes \(8, 12, 10\) sum to 30, but the head dim is 32"):
        qi.compose("qwen-image", model=model, progress=False)
