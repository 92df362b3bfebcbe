"""Layered training with the seed's metadata layout: ``image`` = [composite, layer 1, …] (RGBA), the RGBA
``layer_input_image`` and ``layer_num``; a tiny layered LoRA and a full run overfit and load, the files keep
their alpha, and a row whose frames do not match ``layer_num`` is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import GOLDEN, GOLDEN_MODEL
from PIL import Image
from safetensors.torch import load_file
from variant_helpers import TINY_TARGETS, fixed_loss, one_thread, picture, write_metadata  # noqa: F401

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_core.sizing import SizeSpec
from qi_plugins.layered.training import load_rgba
from qi_plugins.sft import train
from qi_plugins.sft.encoding import encode_sample, load_conditioning
from qi_plugins.sft.validate import load_trained

LAYERED = GOLDEN / "models" / "qwen_image_layered"
PARTS = {"dit": LAYERED / "transformer", "vae": LAYERED / "vae"}
ROW = {"image": ["composite.png", "layers/1.png", "layers/2.png"], "prompt": "a cup on a table",
       "layer_input_image": "composite.png", "layer_num": 2}  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ds = tmp_path_factory.mktemp("layered")
    picture(ds / "composite.png", 32, 32, seed=1, mode="RGBA")
    picture(ds / "layers" / "1.png", 32, 32, seed=2, mode="RGBA")
    picture(ds / "layers" / "2.png", 32, 32, seed=3, mode="RGBA")
    write_metadata(ds, [ROW], "json")
    return ds


def layered_args(ds, out, **kw):
    base = dict(dataset_base_path=str(ds), dataset_metadata_path=str(ds / "metadata.json"),
                model=str(GOLDEN_MODEL), model_paths=json.dumps({k: str(v) for k, v in PARTS.items()}),
                pipeline="qwen-image-layered", output_path=str(out), data_file_keys="image,layer_input_image",
                extra_inputs="layer_input_image,layer_num", lora_target_modules=TINY_TARGETS)  # fmt: skip
    base.update(kw)
    return base


def layered_pipe():
    return qi.compose("qwen-image-layered", model=GOLDEN_MODEL, progress=False, components=PARTS)


def encoded(pipe, ds, mode="RGBA"):
    """The training sample of ROW, its files decoded as the trainer does (RGBA), or as plain RGB."""

    def load(path):
        if mode == "RGBA":
            return load_rgba(str(ds / path), SizeSpec())
        with Image.open(ds / path) as im:
            return im.convert(mode)

    sample = dict(
        ROW, image=[load(p) for p in ROW["image"]], layer_input_image=load(ROW["layer_input_image"])
    )
    return encode_sample(pipe, sample, extra_inputs=("layer_input_image", "layer_num"))


def call(ds):
    with Image.open(ds / "composite.png") as im:
        image = im.convert("RGBA")
    return dict(prompt=ROW["prompt"], layer_input_image=image, layer_num=2, height=32, width=32,
                num_inference_steps=2, cfg_scale=1.0, seed=1, output_type="latent",
                progress_bar_cmd=lambda x: x)  # fmt: skip


def test_layered_lora_overfits_and_loads(dataset, tmp_path):
    result = train(layered_args(dataset, tmp_path / "lora", lora_base_model="dit", lora_rank=8,
                                learning_rate=1e-2, dataset_repeat=80))  # fmt: skip
    assert result.global_step == 80
    pipe = layered_pipe()
    cond = encoded(pipe, dataset)
    # three target frames (composite, then the layers) and the layer input at RoPE frame −1, all RGBA-encoded
    assert cond.target_frames == 3 and cond.latents.shape == (3, 16, 4, 4)
    assert len(cond.images) == 1 and cond.images[0].frame == -1
    before, latents_before = fixed_loss(pipe, cond), pipe(**call(dataset))
    assert load_trained(pipe, result.checkpoints[-1]) == "lora"
    after, latents_after = fixed_loss(pipe, cond), pipe(**call(dataset))
    assert after <= 0.5 * before, f"fixed-draw loss {before:.4f} → {after:.4f}"
    assert (latents_after - latents_before).abs().max() > 1e-3


def test_layered_full_training_overfits_and_saves_the_layered_dit(dataset, tmp_path):
    result = train(layered_args(dataset, tmp_path / "full", trainable_models="dit", learning_rate=1e-3,
                                dataset_repeat=60))  # fmt: skip
    assert result.global_step == 60
    pipe = layered_pipe()
    cond = encoded(pipe, dataset)
    before = fixed_loss(pipe, cond)
    sd = load_file(str(result.checkpoints[-1]))
    # the official layered key set, including the extra timestep condition's embedding
    assert "time_text_embed.addition_t_embedding.weight" in sd
    assert set(sd) == set(pipe.components["dit"].state_dict())
    assert load_trained(pipe, result.checkpoints[-1]) == "full"
    after = fixed_loss(pipe, cond)
    assert after <= 0.5 * before, f"fixed-draw loss {before:.4f} → {after:.4f}"


def test_layered_files_keep_their_alpha(dataset, tmp_path):
    """The trainer decodes the layered pipeline's columns as RGBA (the default RGB loader would make every layer
    opaque): the samples it encodes (here cached by split training's first stage) are the RGBA ones."""
    layer = load_rgba(str(dataset / "layers/1.png"), SizeSpec())
    assert layer.mode == "RGBA" and np.asarray(layer)[..., 3].min() == 0  # the transparent background is kept
    result = train(layered_args(dataset, tmp_path / "cache", task="sft:data_process", lora_base_model="dit"))
    (cache,) = result.cache_files
    cached = load_conditioning(cache)
    pipe = layered_pipe()
    rgba, flat = encoded(pipe, dataset), encoded(pipe, dataset, mode="RGB")
    assert torch.allclose(cached.latents, rgba.latents, atol=1e-6)
    assert torch.allclose(cached.images[0].latents, rgba.images[0].latents, atol=1e-6)
    assert (
        rgba.latents - flat.latents
    ).abs().max() > 1e-2  # so RGB decoding would have trained other targets


@pytest.mark.parametrize(
    "layer_num, match",
    [
        (0, r"layer_num=0 means 1 target frames.*image list has 3"),
        (4, r"expects 5 target frames, the row has 3"),
    ],
)
def test_frames_must_match_layer_num(dataset, tmp_path, layer_num, match):
    write_metadata(tmp_path, [dict(ROW, layer_num=layer_num)], "json")
    args = layered_args(dataset, tmp_path / "out", dataset_metadata_path=str(tmp_path / "metadata.json"),
                        lora_base_model="dit", lora_rank=4, max_steps=1)  # fmt: skip
    with pytest.raises(InvalidInputError, match=match):
        train(args)
