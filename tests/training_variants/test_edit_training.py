"""Edit training: ``--extra_inputs edit_image`` with the seed's metadata (a path for Qwen-Image-Edit, a list for
Edit-2509/2511), a tiny Edit LoRA that overfits and loads, and the metadata-form errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from PIL import Image
from variant_helpers import TINY_TARGETS, fixed_loss, one_thread, picture, write_metadata  # noqa: F401

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_plugins.sft import train
from qi_plugins.sft.data import BadRowError
from qi_plugins.sft.encoding import encode_sample
from qi_plugins.sft.validate import load_trained

NO_RESIZE = {"edit_image_auto_resize": False}  # keep the tiny images tiny (the default resizes to ~1024²)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ds = tmp_path_factory.mktemp("edit")
    for i in range(3):
        picture(ds / "images" / f"{i}.png", 32, 32, seed=i)
        picture(ds / "edit" / f"{i}.png", 32, 32, seed=10 + i)
    return ds


def edit_args(ds, out, metadata, **kw):
    base = dict(dataset_base_path=str(ds), dataset_metadata_path=str(metadata), model=str(GOLDEN_MODEL),
                output_path=str(out), lora_target_modules=TINY_TARGETS, extra_inputs="edit_image",
                data_file_keys="image,edit_image", lora_base_model="dit", lora_rank=4, call_params=NO_RESIZE)  # fmt: skip
    base.update(kw)
    return base


def rgb(path):
    with Image.open(path) as im:
        return im.convert("RGB")


def test_edit_lora_overfits_and_its_lora_loads(dataset, tmp_path):
    meta = write_metadata(
        dataset, [{"image": "images/0.png", "prompt": "make it red", "edit_image": "edit/0.png"}]
    )
    result = train(edit_args(dataset, tmp_path / "lora", meta, pipeline="qwen-image-edit", lora_rank=8,
                             learning_rate=1e-2, dataset_repeat=80))  # fmt: skip
    assert result.global_step == 80
    pipe = qi.compose("qwen-image-edit", model=GOLDEN_MODEL, progress=False)
    sample = {
        "image": rgb(dataset / "images/0.png"),
        "prompt": "make it red",
        "edit_image": rgb(dataset / "edit/0.png"),
    }
    cond = encode_sample(pipe, sample, extra_inputs=("edit_image",), overrides=NO_RESIZE)
    assert len(cond.images) == 1 and cond.images[0].latents.shape == (1, 16, 4, 4)  # the edit image's tokens
    call = dict(prompt="make it red", edit_image=sample["edit_image"], height=32, width=32, num_inference_steps=2,
                seed=1, output_type="np", progress_bar_cmd=lambda x: x, **NO_RESIZE)  # fmt: skip
    before, image_before = fixed_loss(pipe, cond), pipe(**call)
    assert load_trained(pipe, result.checkpoints[-1]) == "lora"
    after, image_after = fixed_loss(pipe, cond), pipe(**call)
    assert after <= 0.5 * before, f"fixed-draw loss {before:.4f} → {after:.4f}"
    assert np.abs(image_after - image_before).max() > 1e-3


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_edit_2509_takes_a_list_of_edit_images(dataset, tmp_path, kind):
    """The seed's 2509/2511 metadata: a JSON list in a csv cell or a list in json/jsonl; each image is a segment."""
    rows = [{"image": "images/1.png", "prompt": "swap them", "edit_image": ["edit/1.png", "edit/2.png"]}]
    meta = write_metadata(dataset, rows, kind)
    result = train(edit_args(dataset, tmp_path / kind, meta, pipeline="qwen-image-edit-2509", max_steps=1))
    assert result.global_step == 1 and np.isfinite(result.losses).all()
    pipe = result.pipe
    images = [rgb(dataset / p) for p in rows[0]["edit_image"]]
    sample = {"image": rgb(dataset / "images/1.png"), "prompt": "swap them", "edit_image": images}
    cond = encode_sample(pipe, sample, extra_inputs=("edit_image",), overrides=NO_RESIZE)
    assert [s.latents.shape for s in cond.images] == [torch.Size([1, 16, 4, 4])] * 2


@pytest.mark.parametrize(
    "pipeline, edit_image, match",
    [
        ("qwen-image-edit-2509", "edit/0.png", r"single path .*'qwen-image-edit-2509' takes a list"),
        ("qwen-image-edit-2511", "edit/0.png", r"'qwen-image-edit-2511' takes a list.*even for one image"),
        ("qwen-image-edit", ["edit/0.png", "edit/1.png"], r"list of 2 path.*'qwen-image-edit' takes one"),
        ("qwen-image-edit", ["edit/0.png"], r"list of 1 path.*qwen-image-edit-2509 / qwen-image-edit-2511"),
    ],
)
def test_metadata_form_must_match_the_model(dataset, tmp_path, pipeline, edit_image, match):
    meta = write_metadata(
        dataset, [{"image": "images/0.png", "prompt": "x", "edit_image": edit_image}], "json"
    )
    with pytest.raises(InvalidInputError, match=match):
        train(edit_args(dataset, tmp_path / "out", meta, pipeline=pipeline, max_steps=1))


def test_inference_calls_are_not_form_checked(dataset):
    """Only training metadata is checked: a PIL image given to 2509 at inference runs (single template)."""
    pipe = qi.compose("qwen-image-edit-2509", model=GOLDEN_MODEL, progress=False)
    assert pipe.parameters()["edit_image_form"] == "list"
    out = pipe(prompt="x", edit_image=rgb(dataset / "edit/0.png"), height=32, width=32, num_inference_steps=1,
               output_type="latent", progress_bar_cmd=lambda x: x, **NO_RESIZE)  # fmt: skip
    assert torch.isfinite(out).all()
    with pytest.raises(InvalidInputError, match="edit_image_form must be 'single', 'list' or None"):
        from qi_plugins.edit.training import check_metadata_form

        check_metadata_form("x", "many", "p")


def test_a_broken_json_list_cell_names_the_row(dataset, tmp_path):
    meta = dataset / "metadata.csv"
    meta.write_text('image,prompt,edit_image\nimages/0.png,x,"[""edit/0.png"" ""edit/1.png""]"\n')
    with pytest.raises(BadRowError, match=r"row 1 of metadata.csv.*'edit_image'.*not a JSON list of paths"):
        train(edit_args(dataset, tmp_path / "out", meta, pipeline="qwen-image-edit-2509", max_steps=1))
