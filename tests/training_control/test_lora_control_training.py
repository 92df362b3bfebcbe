"""EliGen and In-Context LoRA training with the seed's metadata forms: a JSON row with ``eligen_entity_prompts``
(a list) and ``eligen_entity_masks`` (a list of mask paths), a csv row with a ``context_image`` path. The LoRA
overfits the row and loads back as the recipe's ``lora`` component."""

from __future__ import annotations

import json

import numpy as np
import pytest
from control_helpers import (
    CALL,
    MODEL,
    TINY_TARGETS,
    fixed_loss,
    make_control_dataset,
    read,
    rgb,
    write_metadata,
)  # noqa: F401

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_plugins.sft import train
from qi_plugins.sft.encoding import encode_sample

ENTITIES = ["a red box", "a grey wall"]
MASKS = ["images/mask_box.png", "images/mask_rest.png"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_control_dataset(tmp_path_factory.mktemp("lora_control"))


def run_lora(ds, out, metadata, pipeline, extra, **kw):
    return train(dict(
        dataset_base_path=str(ds), dataset_metadata_path=str(metadata), model=MODEL, pipeline=pipeline,
        model_paths=json.dumps({"lora": []}),  # train on the bare base, not on the released LoRA
        lora_base_model="dit", lora_rank=8, lora_target_modules=TINY_TARGETS, learning_rate=1e-2,
        dataset_repeat=60, data_file_keys=f"image,{extra[-1]}", extra_inputs=",".join(extra),
        output_path=str(out), **kw,
    ))  # fmt: skip


def loss_with(pipeline, lora, sample, extra):
    pipe = qi.compose(pipeline, model=MODEL, progress=False, components={"lora": lora})
    cond = encode_sample(pipe, sample, extra_inputs=extra)
    return pipe, cond, fixed_loss(pipe, cond)


def test_eligen_lora_training_with_entity_prompts_and_masks(dataset, tmp_path):
    (dataset / "eligen.json").write_text(json.dumps([{"image": "images/target.png", "prompt": "a red box on a wall",
                                                       "eligen_entity_prompts": ENTITIES, "eligen_entity_masks": MASKS}]))  # fmt: skip
    extra = ("eligen_entity_prompts", "eligen_entity_masks")
    result = run_lora(dataset, tmp_path / "out", dataset / "eligen.json", "qwen-image-eligen", extra)
    assert result.global_step == 60
    sd = read(result.checkpoints[-1])
    assert "transformer_blocks.0.attn.to_q.lora_A.default.weight" in sd  # the seed's LoRA layout
    sample = {"image": rgb(dataset / "images/target.png"), "prompt": "a red box on a wall",
              "eligen_entity_prompts": ENTITIES, "eligen_entity_masks": [rgb(dataset / m) for m in MASKS],
              "_where": "test"}  # fmt: skip
    base, cond, before = loss_with("qwen-image-eligen", [], sample, extra)
    assert cond.attention_mask is not None and len(cond.text) == 3  # two entity segments + the global prompt
    trained, _, after = loss_with("qwen-image-eligen", [result.checkpoints[-1]], sample, extra)
    assert after <= 0.5 * before, f"fixed-draw loss {before:.4f} → {after:.4f}"
    call = dict(CALL, eligen_entity_prompts=ENTITIES, eligen_entity_masks=sample["eligen_entity_masks"])
    assert np.abs(trained(**call) - base(**call)).max() > 1e-2


def test_in_context_lora_training_with_a_context_image(dataset, tmp_path):
    write_metadata(
        dataset,
        [{"image": "images/target.png", "prompt": "a red box", "context_image": "images/control.png"}],
    )
    pipeline, extra = "qwen-image-in-context-control-union", ("context_image",)
    result = run_lora(dataset, tmp_path / "out", dataset / "metadata.csv", pipeline, extra)
    assert result.global_step == 60
    sample = {"image": rgb(dataset / "images/target.png"), "prompt": "a red box",
              "context_image": rgb(dataset / "images/control.png"), "_where": "test"}  # fmt: skip
    base, cond, before = loss_with(pipeline, [], sample, extra)
    assert len(cond.images) == 1 and cond.images[0].latents.shape == (1, 16, 4, 4)  # the context tokens
    assert cond.params[0]["prompt"].startswith("Context_Control. ")  # trained with the LoRA's prompt prefix
    trained, _, after = loss_with(pipeline, [result.checkpoints[-1]], sample, extra)
    assert after <= 0.5 * before, f"fixed-draw loss {before:.4f} → {after:.4f}"
    call = dict(CALL, context_image=sample["context_image"])
    assert np.abs(trained(**call) - base(**call)).max() > 1e-2


def test_entity_mask_count_mismatch_names_the_row(dataset, tmp_path):
    (dataset / "bad.json").write_text(json.dumps([{"image": "images/target.png", "prompt": "p",
                                                    "eligen_entity_prompts": ENTITIES, "eligen_entity_masks": MASKS[:1]}]))  # fmt: skip
    with pytest.raises(InvalidInputError, match=r"item 0 of bad.json.*2 eligen_entity_prompts but 1"):
        run_lora(dataset, tmp_path / "out", dataset / "bad.json", "qwen-image-eligen",
                 ("eligen_entity_prompts", "eligen_entity_masks"), max_steps=1)  # fmt: skip
