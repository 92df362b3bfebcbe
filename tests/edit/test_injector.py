"""The edit-image injector: what it hands the DiT (against diffusers' zero_cond_t transformer), typed errors,
and the recipes it serves."""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from edit_helpers import QUIET, edit_pipe
from PIL import Image
from tolerance import TINY_DIT_TERMS, check_vs_reference

import qi_core as qi
from qi_core.errors import ImageReadError, InvalidInputError, MissingComponentError
from qi_core.plugin_host import host
from qi_plugins.edit.recipes import LOWRES_FIX_ADAPTER, lora_plugin_available

FAST = {"num_inference_steps": 2, "output_type": "latent", "seed": 0, "height": 32, "width": 48, **QUIET}


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


class Spy:
    """Stands in for the DiT and keeps every DenoiseInput it is called with."""

    def __init__(self, dit):
        self.dit, self.calls = dit, []

    def __getattr__(self, name):
        return getattr(self.dit, name)

    def __call__(self, inp):
        self.calls.append(inp)
        return self.dit(inp)

    def forward_many(self, inputs):  # the CFG sides batched, when the pipeline does that
        self.calls.extend(inputs)
        return self.dit.forward_many(inputs)


def denoise_inputs(pipe, **kwargs):
    dit = pipe.components["dit"]
    pipe.components["dit"] = spy = Spy(dit)
    try:
        pipe(**kwargs)
    finally:
        pipe.components["dit"] = dit
    return spy.calls


def pack(x):
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), C * 4)


def test_two_reference_images_with_zero_cond_t_match_official_dit():
    """Our injector's DenoiseInput → our DiT equals diffusers' QwenImageTransformer2DModel(zero_cond_t=True)."""
    diffusers = pytest.importorskip("diffusers")
    pipe = edit_pipe("qwen-image-edit-2511")
    calls = denoise_inputs(pipe, prompt="swap", edit_image=[image(64, 32, 1), image(32, 80, 2)],
                           edit_image_auto_resize=False, cfg_scale=1.0, **FAST)  # fmt: skip
    inp = calls[1]  # step 1: a latent that is not pure noise
    assert [s.modulation for s in inp.images] == [1, 1] and inp.extra_timesteps == [0.0]
    assert [tuple(s.latents.shape[-2:]) for s in inp.images] == [(4, 8), (10, 4)]
    ref = diffusers.QwenImageTransformer2DModel.from_pretrained(
        GOLDEN_MODEL / "transformer", zero_cond_t=True
    )
    assert ref.config.zero_cond_t
    h, w = inp.latents.shape[-2:]

    def both(dit, ref, inp):
        with torch.no_grad():
            return dit(inp), ref.eval()(
                hidden_states=torch.cat([pack(inp.latents), *(pack(s.latents) for s in inp.images)], dim=1),
                encoder_hidden_states=inp.text[0].emb,
                timestep=inp.timestep / 1000,
                img_shapes=[[(1, h // 2, w // 2), (1, 2, 4), (1, 5, 2)]],
                return_dict=False,
            )[0][:, : (h // 2) * (w // 2)]

    # the same call in float64: the maths agree there, each float32 output within its float32 error bound
    inp64 = dataclasses.replace(
        inp,
        latents=inp.latents.double(),
        text=[dataclasses.replace(s, emb=s.emb.double()) for s in inp.text],
        images=[dataclasses.replace(s, latents=s.latents.double()) for s in inp.images],
    )
    ours, want = both(pipe.dit, ref, inp)
    ours64, want64 = both(copy.deepcopy(pipe.dit).double(), copy.deepcopy(ref).double(), inp64)
    check_vs_reference(pack(ours), want, pack(ours64), want64, terms=TINY_DIT_TERMS)
    # and zero_cond_t changes the result (the test can fail)
    inp.images = [type(s)(s.latents) for s in inp.images]
    inp.extra_timesteps = []
    with torch.no_grad():
        assert (pipe.dit(inp) - ours).abs().max().item() > 1e-3


def test_segments_follow_the_call():
    pipe = edit_pipe("qwen-image-edit")
    calls = denoise_inputs(pipe, prompt="x", edit_image=image(32, 16), edit_image_auto_resize=False,
                           edit_rope_interpolation=True, **FAST)  # fmt: skip
    assert len(calls) == 4  # 2 steps x 2 CFG sides, each with the edit image
    for inp in calls:
        (seg,) = inp.images
        assert seg.frame is None and seg.modulation == 0 and seg.rope_from_target  # 2x4 grid vs 4x6 target
        assert inp.extra_timesteps == []
    # same grid as the target: nothing to sample
    calls = denoise_inputs(pipe, prompt="x", edit_image=image(48, 32), edit_image_auto_resize=False,
                           edit_rope_interpolation=True, **FAST)  # fmt: skip
    assert not calls[0].images[0].rope_from_target
    # no edit image: the edit recipes require one (the recipe's ``required``), rather than silently
    # generating from the text alone
    with pytest.raises(InvalidInputError, match="edit_image is required by pipeline 'qwen-image-edit'"):
        denoise_inputs(pipe, prompt="x", zero_cond_t=True, **FAST)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"edit_image": 42},
            ImageReadError,
            r"edit_image must be an image \(PIL image, file path or array\), got 42",
        ),
        (
            {"edit_image": [image(32, 32), "/no/such.png"]},
            ImageReadError,
            r"edit_image\[1\]: file '/no/such.png'",
        ),
        ({"edit_image": []}, InvalidInputError, "edit_image is an empty list"),
        (
            {"edit_image": image(70, 64), "edit_image_auto_resize": False},
            InvalidInputError,
            r"edit_image is 70x64 \(WxH\); with edit_image_auto_resize=False its sides must be multiples of 16\. "
            r"Resize it \(e\.g\. to 64x64\)",
        ),
        (
            {"edit_image": [image(32, 32), image(32, 40)], "edit_image_auto_resize": False},
            InvalidInputError,
            r"edit_image\[1\] is 32x40",
        ),
        (
            {"edit_image": image(32, 32), "zero_cond_t": 1},
            InvalidInputError,
            "zero_cond_t must be True or False",
        ),
        (
            {"edit_image_auto_resize": "yes"},
            InvalidInputError,
            "edit_image_auto_resize must be True or False",
        ),
        (
            {"edit_image": image(32, 32), "negative_prompt": "<|image_pad|>"},
            InvalidInputError,
            "negative_prompt contains",
        ),
        ({"edit_images": image(32, 32)}, InvalidInputError, "Did you mean edit_image"),
    ],
)
def test_typed_errors(kwargs, error, match):
    pipe = edit_pipe("qwen-image-edit")
    args = {"prompt": "x", **FAST, **kwargs}
    with pytest.raises(error, match=match):
        pipe(**args)


def test_missing_processor_folder_is_a_clear_error(tmp_path):
    for sub in os.listdir(GOLDEN_MODEL):
        if sub != "processor":
            src = GOLDEN_MODEL / sub
            (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / sub)
    with pytest.raises(MissingComponentError, match="'processor' is missing"):
        qi.compose("qwen-image-edit", model=tmp_path, progress=False)


def test_recipes():
    reg = host().registry
    for name, model in [
        ("qwen-image-edit", "Qwen/Qwen-Image-Edit"),
        ("qwen-image-edit-2509", "Qwen/Qwen-Image-Edit-2509"),
        ("qwen-image-edit-2511", "Qwen/Qwen-Image-Edit-2511"),
        ("qwen-image-edit-lowres-fix", "Qwen/Qwen-Image-Edit"),
    ]:
        r = reg.get("pipeline", name).load()
        assert r.model == model
        assert {"dit", "vae", "text_encoder", "processor"} <= set(r.components)
        assert r.components["processor"].subfolder == "processor"
        assert "edit-image" in r.injectors
    assert reg.get("pipeline", "qwen-image-edit-2511").load().defaults["zero_cond_t"] is True
    lowres = reg.get("pipeline", "qwen-image-edit-lowres-fix").load()
    assert lowres.defaults["edit_rope_interpolation"] is True
    assert lowres.model_ids == ("DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix",)
    # the LoRA is part of the recipe exactly when the LoRA plugin can provide it
    assert lowres.adapters == ((LOWRES_FIX_ADAPTER,) if lora_plugin_available() else ())
    if lowres.adapters:  # building the adapter fetches nothing yet; it names the hub file
        lora = reg.get("adapter", LOWRES_FIX_ADAPTER).load()()
        assert lora.source == "DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix:model.safetensors"
        assert lora.scale == 1.0 and lora.target == "dit"
    pipe = edit_pipe("qwen-image-edit-2511")
    assert pipe.parameters()["zero_cond_t"] is True and pipe.parameters()["edit_image_auto_resize"] is True


def test_a_list_of_one_uses_the_picture_template_and_rgba_is_flattened():
    pipe = edit_pipe("qwen-image-edit-2509")
    rgba = image(32, 32, 7).convert("RGBA")
    got = {}
    pipe.tracer = lambda k, v: got.__setitem__(k, v)
    try:
        pipe(prompt="x", edit_image=[rgba], edit_image_auto_resize=False, cfg_scale=1.0, **FAST)
        ids_list, lat_list = got["prompt_input_ids"], got["edit_latents_0"]
        pipe(prompt="x", edit_image=rgba.convert("RGB"), edit_image_auto_resize=False, cfg_scale=1.0, **FAST)
    finally:
        pipe.tracer = None
    tok = pipe.processor.tokenizer
    assert "Picture 1: <|vision_start|>" in tok.decode(ids_list[0])
    assert "Picture" not in tok.decode(got["prompt_input_ids"][0])
    assert torch.equal(lat_list, got["edit_latents"])  # the VAE sees the RGB channels of an RGBA image
