"""Declared call parameters: every pipeline lists typed, described parameters; bad values fail with a typed
error naming the parameter before any weight is loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from PIL import Image

import qi_core as qi
from qi_core.cli import main
from qi_core.composer import check_call, describe
from qi_core.errors import InvalidInputError
from qi_core.params import CallParams, param, specs, validate
from qi_core.protocols import Injector

# the seed's call parameters (SPEC.md), plus the layered ones
SEED_PARAMS = (
    "prompt negative_prompt cfg_scale input_image denoising_strength inpaint_mask inpaint_blur_size "
    "inpaint_blur_sigma height width seed rand_device num_inference_steps exponential_shift_mu "
    "blockwise_controlnet_inputs eligen_entity_prompts eligen_entity_masks eligen_enable_on_negative edit_image "
    "edit_image_auto_resize edit_rope_interpolation context_image tiled tile_size tile_stride progress_bar_cmd "
    "layer_num layer_input_image"
).split()


@pytest.fixture(scope="module")
def listing(capsys_module=None):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["pipelines", "--json"]) == 0
    return json.loads(out.getvalue())


def test_every_pipeline_lists_typed_described_parameters(listing):
    assert {p["name"] for p in listing} == {r.name for r in qi.pipelines()}
    for p in listing:
        assert set(p) >= {"name", "default_model", "tiny", "parameters"}
        assert isinstance(p["tiny"], bool)
        for spec in p["parameters"]:
            assert set(spec) >= {"name", "type", "default", "description", "required"}, spec
            assert spec["description"], f"{p['name']}: {spec['name']} has no description"
            assert isinstance(spec["type"], dict)


def test_the_seed_call_parameters_are_all_declared(listing):
    declared = {s["name"]: s for p in listing for s in p["parameters"]}
    missing = [k for k in SEED_PARAMS if k not in declared]
    assert not missing, missing
    assert len(SEED_PARAMS) == 28  # 26 from the seed's list + layer_num, layer_input_image
    assert declared["cfg_scale"]["type"]["type"] == "number"
    assert declared["seed"]["type"]["anyOf"][0]["maximum"] == 2**64 - 1
    assert declared["edit_image"]["kind"] == "images" and declared["inpaint_mask"]["kind"] == "mask"


def test_recipe_defaults_and_required_inputs_show(listing):
    by_name = {p["name"]: {s["name"]: s for s in p["parameters"]} for p in listing}
    assert by_name["qwen-image-layered"]["layer_num"]["default"] == 3
    assert by_name["qwen-image-edit"]["edit_image"]["required"]
    assert not by_name["qwen-image"]["prompt"]["required"]


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({"cfg_scale": float("nan")}, "cfg_scale must be a finite number, got nan"),
        ({"cfg_scale": float("inf")}, "cfg_scale must be a finite number"),
        (
            {"prompt": ["a fox", 3]},
            "prompt must be a string or a non-empty list of strings, got ['a fox', 3]",
        ),
        ({"rand_device": ["cpu"]}, "rand_device must be a valid string, got ['cpu']"),
        ({"seed": -1}, "seed must be greater than or equal to 0"),
        ({"num_inference_steps": True}, "num_inference_steps must be a number, not True/False"),
        ({"tiled": "yes"}, "tiled must be True or False"),
        ({"input_image": 3}, "input_image must be an image"),
    ],
)
def test_bad_values_fail_before_anything_loads(values, says):
    """``check_call`` needs no weights: only the recipe's declarations."""
    with pytest.raises(InvalidInputError) as e:
        check_call("qwen-image", values)
    assert says in str(e.value)


def test_cli_rejects_nan_before_loading(capsys):
    assert main(["generate", "x", "--cfg-scale", "nan", "--model", "/no/such/model", "--out", "x.png"]) == 2
    assert "--cfg-scale must be a finite number" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pipe():
    return qi.compose(
        "qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32, progress=False
    )


def test_wrong_size_mask_is_an_error(pipe):
    image = Image.fromarray(np.zeros((32, 48, 3), np.uint8))
    mask = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InvalidInputError, match=r"inpaint_mask is 32x32 \(WxH\) but input_image is 48x32"):
        pipe("x", input_image=image, inpaint_mask=mask, height=32, width=48, num_inference_steps=1,
             progress_bar_cmd=lambda x: x)  # fmt: skip


def test_list_prompt_is_a_batch_other_lists_are_refused(pipe):
    small = dict(
        height=32, width=32, num_inference_steps=1, output_type="latent", progress_bar_cmd=lambda x: x
    )
    out = pipe(["a", "b c d"], seed=0, **small)
    assert isinstance(out, list) and len(out) == 2  # a list of prompts is a batch (tests/core/test_batch.py)
    with pytest.raises(InvalidInputError, match="rand_device must be a valid string"):
        pipe("a", rand_device=["cpu"], **small)
    with pytest.raises(InvalidInputError, match=r"negative_prompt is a list of 3 for 2 prompt\(s\)"):
        pipe(["a", "b"], negative_prompt=["x", "y", "z"], **small)
    with pytest.raises(InvalidInputError, match="prompt must be a string or a non-empty list of strings"):
        pipe([], **small)


def test_required_input_is_named():
    recipe = next(r for r in qi.pipelines() if r.name == "qwen-image-edit")
    assert "edit_image" in recipe.required
    assert any(p["name"] == "edit_image" and p["required"] for p in describe(recipe)["parameters"])


def test_undeclared_injector_gets_an_open_declaration():
    class Old(Injector):
        name = "old"
        params = {"strength_of_x": 0.5}

    assert Old.Params.model_fields["strength_of_x"].default == 0.5
    assert validate([Old.Params], {"strength_of_x": "anything"})["strength_of_x"] == "anything"


def test_declared_injector_derives_its_defaults():
    class New(Injector):
        name = "new"

        class Params(CallParams):
            amount: float = param(0.5, "how much", ge=0, le=1)

    assert New.params == {"amount": 0.5}
    (spec,) = specs([New.Params])
    assert spec == {"name": "amount", "type": {"maximum": 1, "minimum": 0, "type": "number"}, "default": 0.5,
                    "description": "how much", "required": False, "kind": None}  # fmt: skip
    with pytest.raises(InvalidInputError, match="amount must be less than or equal to 1, got 2"):
        validate([New.Params], {"amount": 2})
