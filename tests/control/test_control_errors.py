"""Typed errors of the control plugins: each says what was wrong, with the numbers, and how to fix it."""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN, GOLDEN_MODEL, golden_call, golden_case
from control_golden import compose_for
from PIL import Image

import qi_core as qi
from qi_core.errors import ImageReadError, InvalidInputError, PluginError
from qi_plugins.blockwise_controlnet.injector import BlockwiseControlNetInjector
from qi_plugins.blockwise_controlnet.inputs import ControlNetInput

QUIET = {"progress_bar_cmd": lambda x: x, "output_type": "latent", "num_inference_steps": 1}


@pytest.fixture(scope="module")
def eligen():
    case, _, folder = golden_case("eligen")
    return compose_for("eligen", case), golden_call(case, folder)


@pytest.fixture(scope="module")
def controlnets():
    case, _, folder = golden_case("controlnet_inpaint")  # canny (0), depth (1), inpaint (2)
    pipe = compose_for("controlnet_inpaint", case)
    with Image.open(folder / "input_image.png") as im:
        image = im.copy()
    with Image.open(folder / "inpaint_mask.png") as im:
        mask = im.copy()
    return pipe, {"prompt": "a vase", "height": 64, "width": 96, "seed": 0, **QUIET}, image, mask


@pytest.mark.parametrize(
    ("change", "error", "words"),
    [
        (lambda a: {"eligen_entity_masks": a["eligen_entity_masks"][:1]}, InvalidInputError,
         ["2 eligen_entity_prompts but 1 eligen_entity_masks"]),
        (lambda a: {"eligen_entity_masks": [m.resize((64, 64)) for m in a["eligen_entity_masks"]]},
         InvalidInputError, ["eligen_entity_masks[0] is 64x64", "output is 96x64", "resize((96, 64)"]),
        (lambda a: {"eligen_entity_masks": None}, InvalidInputError, ["one mask image per entity prompt (2 here)"]),
        (lambda a: {"eligen_entity_masks": a["eligen_entity_masks"][0]}, InvalidInputError, ["must be a list"]),
        (lambda a: {"eligen_entity_prompts": "a cat"}, InvalidInputError, ["list of strings"]),
        (lambda a: {"eligen_entity_prompts": ["a cat", 3]}, InvalidInputError, ["eligen_entity_prompts[1]"]),
        (lambda a: {"eligen_enable_on_negative": "yes"}, InvalidInputError, ["True or False"]),
        (lambda a: {"eligen_entity_masks": ["/nonexistent/mask.png", a["eligen_entity_masks"][1]]},
         ImageReadError, ["eligen_entity_masks[0]", "does not exist"]),
    ],
)  # fmt: skip
def test_eligen_errors(eligen, change, error, words):
    pipe, args = eligen
    with pytest.raises(error) as e:
        pipe(**{**args, **QUIET, **change(args)})
    for w in words:
        assert w in str(e.value)


def test_eligen_masks_at_another_scale_are_fine(eligen):
    """Only the aspect ratio must match: half-size masks are accepted (and give the same latent masks here)."""
    pipe, args = eligen
    got = {}
    pipe.tracer = lambda k, v: got.__setitem__(k, v)
    try:
        pipe(**{**args, **QUIET})
        full = got["entity_masks"].clone()
        pipe(**{**args, **QUIET, "eligen_entity_masks": [m.resize((48, 32), Image.NEAREST)
                                                       for m in args["eligen_entity_masks"]]})  # fmt: skip
    finally:
        pipe.tracer = None
    assert torch.equal(got["entity_masks"], full)


@pytest.mark.parametrize(
    ("inputs", "error", "words"),
    [
        (lambda im, m: [ControlNetInput(controlnet_id=3, image=im)], InvalidInputError,
         ["controlnet_id=3", "3 ControlNet(s) are loaded (ids 0..2"]),
        (lambda im, m: [{"controlnet_id": 0}], InvalidInputError, ["image is missing"]),
        (lambda im, m: [{"image": im, "start": 0.2, "end": 0.5}], InvalidInputError, ["start=0.2 < end=0.5"]),
        (lambda im, m: [{"image": im, "strength": 0.5}], InvalidInputError, ["unknown field 'strength'"]),
        (lambda im, m: [{"image": im, "processor_id": "canny"}], InvalidInputError, ["processor_id"]),
        (lambda im, m: [{"image": im, "scale": "big"}], InvalidInputError, ["scale must be a finite number"]),
        (lambda im, m: [{"image": im, "controlnet_id": -1}], InvalidInputError, ["integer ≥ 0"]),
        (lambda im, m: [{"image": im, "inpaint_mask": m}], InvalidInputError,
         ["not an inpaint ControlNet (additional_in_dim=0)"]),
        (lambda im, m: [{"image": im, "controlnet_id": 2}], InvalidInputError, ["needs inpaint_mask"]),
        (lambda im, m: ["canny.png"], InvalidInputError, ["expected a ControlNetInput or a dict"]),
        (lambda im, m: [{"image": "/nonexistent.png"}], ImageReadError, ["blockwise_controlnet_inputs[0].image"]),
    ],
)  # fmt: skip
def test_controlnet_input_errors(controlnets, inputs, error, words):
    pipe, args, image, mask = controlnets
    with pytest.raises(error) as e:
        pipe(**args, blockwise_controlnet_inputs=inputs(image, mask))
    for w in words:
        assert w in str(e.value)


def test_controlnet_inputs_without_a_loaded_controlnet():
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)
    pipe.add_injector(BlockwiseControlNetInjector())
    with pytest.raises(InvalidInputError, match="no ControlNet loaded"):
        pipe(prompt="x", height=64, width=64, blockwise_controlnet_inputs=[{"image": Image.new("RGB", (64, 64))}],
             **QUIET)  # fmt: skip


def test_context_image_must_be_an_image():
    case, _, _ = golden_case("context_image")
    pipe = compose_for("context_image", case)
    with pytest.raises(ImageReadError, match="context_image"):
        pipe(prompt="x", height=64, width=64, context_image=42, **QUIET)


def test_recipe_lora_needs_the_lora_plugin(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "qi_plugins.lora.adapter", None)  # as if the plugin were not installed
    lora = GOLDEN / "models" / "extra" / "lora_diffsynth.safetensors"
    with pytest.raises(PluginError, match="needs the 'lora' plugin"):
        qi.compose("qwen-image-eligen", model=GOLDEN_MODEL, progress=False, components={"lora": lora})
