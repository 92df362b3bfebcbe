"""Blockwise ControlNet full training (the seed's flow): a zero-initialised ControlNet sized for the DiT, trained
with ``--trainable_models blockwise_controlnet`` on the seed's ``blockwise_controlnet_image`` column; the saved
file loads as a ControlNet component, lowers the fixed-draw loss and changes the output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import GOLDEN_MODEL
from control_helpers import (  # noqa: F401
    CALL,
    MODEL,
    fixed_loss,
    make_control_dataset,
    one_thread,
    read,
    rgb,
    write_metadata,
)

import qi_core as qi
from qi_core.errors import InvalidInputError, ModelLoadError
from qi_plugins.blockwise_controlnet.inputs import ControlNetInput
from qi_plugins.blockwise_controlnet.training import CKPT_PREFIX, columns_to_inputs, init_controlnet, main
from qi_plugins.sft import train
from qi_plugins.sft.encoding import encode_sample, injector_declarations

RECIPE = "qwen-image-blockwise-controlnet-canny"
COLUMN = "blockwise_controlnet_image"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ds = make_control_dataset(tmp_path_factory.mktemp("cn"))
    write_metadata(ds, [{"image": "images/target.png", "prompt": "a red box", COLUMN: "images/control.png"}])
    return ds


def compose(controlnet):
    return qi.compose(RECIPE, model=MODEL, progress=False, components={"blockwise_controlnet": [controlnet]})


def test_init_controlnet_is_zero_and_sized_for_the_dit(tmp_path):
    path = init_controlnet(
        tmp_path / "blockwise_controlnet" / "model.safetensors", GOLDEN_MODEL / "transformer"
    )
    sd = read(path)
    assert sd["img_in.weight"].shape == (64, 64) and sd["controlnet_blocks.1.output_proj.weight"].shape == (
        64,
        64,
    )
    assert not any(k.startswith("controlnet_blocks.2.") for k in sd)  # one control block per DiT block (2)
    zero = [k for k in sd if k.startswith("img_in.") or ".output_proj." in k]
    assert len(zero) == 6 and all(sd[k].abs().max() == 0 for k in zero)
    assert sd["controlnet_blocks.0.input_proj.weight"].abs().max() > 0  # the rest keeps its random start
    assert json.loads(path.with_suffix(".json").read_text())["init_args"]["num_layers"] == 2
    inpaint = init_controlnet(tmp_path / "inpaint.safetensors", compose(path).components["dit"], inpaint=True)
    assert read(inpaint)["img_in.weight"].shape == (64, 68)
    assert (
        main(
            [
                "--dit",
                str(GOLDEN_MODEL / "transformer" / "config.json"),
                "--out",
                str(tmp_path / "c.safetensors"),
            ]
        )
        == 0
    )
    assert torch.equal(read(tmp_path / "c.safetensors")["img_in.weight"], sd["img_in.weight"])
    with pytest.raises(InvalidInputError, match="DiT's folder"):
        init_controlnet(tmp_path / "x.safetensors", tmp_path / "missing")


def test_control_columns_become_one_controlnet_input():
    out = columns_to_inputs(
        {COLUMN: "img", "blockwise_controlnet_inpaint_mask": "m", "blockwise_controlnet_scale": "0.5"}
    )
    assert out == {"blockwise_controlnet_inputs": [ControlNetInput(image="img", inpaint_mask="m", scale=0.5)]}
    with pytest.raises(InvalidInputError, match="no blockwise_controlnet_image"):
        columns_to_inputs({"blockwise_controlnet_inpaint_mask": "m"})
    # the injector declares the adapter, read per run (no global registry)
    from types import SimpleNamespace

    from qi_plugins.blockwise_controlnet.injector import BlockwiseControlNetInjector
    from qi_plugins.blockwise_controlnet.training import COLUMNS

    pipe = SimpleNamespace(injectors=[BlockwiseControlNetInjector()])
    assert injector_declarations(pipe, "column_adapters") == {COLUMNS: columns_to_inputs}
    bad = SimpleNamespace(injectors=[SimpleNamespace(name="x", column_adapters={("some_column",): None})])
    with pytest.raises(InvalidInputError, match="must be callable"):
        injector_declarations(bad, "column_adapters")


def test_controlnet_training_learns_from_zero_and_loads(dataset, tmp_path):
    start = init_controlnet(
        tmp_path / "blockwise_controlnet" / "model.safetensors", GOLDEN_MODEL / "transformer"
    )
    out = tmp_path / "out"
    # the seed's ControlNet script: --model_paths '["models/blockwise_controlnet/model.safetensors"]'
    result = train(dict(
        dataset_base_path=str(dataset), dataset_metadata_path=str(dataset / "metadata.csv"), model=MODEL,
        pipeline=RECIPE, model_paths=json.dumps([str(start)]), trainable_models="blockwise_controlnet",
        data_file_keys=f"image,{COLUMN}", extra_inputs=COLUMN, remove_prefix_in_ckpt=CKPT_PREFIX,
        learning_rate=1e-2, dataset_repeat=80, output_path=str(out),
    ))  # fmt: skip
    assert "blockwise_controlnet" in result.components and result.global_step == 80
    sd = read(result.checkpoints[-1])
    assert set(sd) == set(read(start))  # the ControlNet's own keys: loadable as a component file
    assert sd["img_in.weight"].abs().max() > 0  # gradients reached the conditioning projection
    sample = {"image": rgb(dataset / "images" / "target.png"), "prompt": "a red box",
              COLUMN: rgb(dataset / "images" / "control.png"), "_where": "test"}  # fmt: skip
    zero, trained = compose(start), compose(result.checkpoints[-1])
    before = fixed_loss(zero, encode_sample(zero, sample, extra_inputs=(COLUMN,)))
    after = fixed_loss(trained, encode_sample(trained, sample, extra_inputs=(COLUMN,)))
    assert after <= 0.75 * before, f"fixed-draw loss {before:.4f} → {after:.4f}"
    control = {"blockwise_controlnet_inputs": [{"image": sample[COLUMN]}]}
    base = qi.compose("qwen-image", model=MODEL, progress=False)(**CALL)
    image_zero, image_trained = zero(**CALL, **control), trained(**CALL, **control)
    assert np.abs(image_zero - base).max() < 1e-6  # the zero-initialised ControlNet adds nothing
    assert np.abs(image_trained - image_zero).max() > 1e-2


def test_inpaint_controlnet_trains_on_image_and_mask_columns(tmp_path):
    dataset = make_control_dataset(tmp_path / "ds")
    write_metadata(dataset, [{"image": "images/target.png", "prompt": "a red box", COLUMN: "images/target.png",
                              "blockwise_controlnet_inpaint_mask": "images/mask_box.png"}])  # fmt: skip
    start = init_controlnet(tmp_path / "inpaint.safetensors", GOLDEN_MODEL / "transformer", inpaint=True)
    columns = f"{COLUMN},blockwise_controlnet_inpaint_mask"
    common = dict(dataset_base_path=str(dataset), dataset_metadata_path=str(dataset / "metadata.csv"), model=MODEL,
                  pipeline="qwen-image-blockwise-controlnet-inpaint", trainable_models="blockwise_controlnet",
                  model_paths=json.dumps({"blockwise_controlnet": str(start)}), data_file_keys=f"image,{columns}",
                  extra_inputs=columns, learning_rate=1e-2, dataset_repeat=3)  # fmt: skip
    result = train(dict(common, remove_prefix_in_ckpt=CKPT_PREFIX, output_path=str(tmp_path / "a")))
    assert result.global_step == 3 and np.isfinite(result.losses).all()
    assert read(result.checkpoints[-1])["img_in.weight"].shape == (64, 68)  # the mask channel trained too
    # the default --remove_prefix_in_ckpt (pipe.dit.) keeps the module prefix: the loader says what to pass
    kept = train(dict(common, output_path=str(tmp_path / "b"))).checkpoints[-1]
    with pytest.raises(ModelLoadError, match="--remove_prefix_in_ckpt pipe.blockwise_controlnet.models.0."):
        compose(kept)
