"""Extra inputs reach training through the same injectors as generation: a plugin's injector declaring a call
parameter trains with ``--extra_inputs NAME`` and no training code. Checked with an in-process injector that
appends a reference image's latents as an extra image segment (what an edit injector does)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import GOLDEN_MODEL
from PIL import Image
from training_helpers import args_for, make_dataset, one_thread, write_metadata  # noqa: F401

import qi_core as qi
from qi_core.errors import InvalidInputError
from qi_core.images import image_to_tensor, load_image
from qi_core.protocols import ImageSegment, Injector
from qi_plugins.sft import train
from qi_plugins.sft.batching import collate
from qi_plugins.sft.encoding import encode_sample, load_conditioning, save_conditioning
from qi_plugins.sft.tasks import SFT

RECIPE = "test-training-ref-image"


class RefImage(Injector):
    name = "test-training-ref-image"
    params = {"ref_image": None}

    def prepare(self, pipe, state):
        if state.params["ref_image"] is None:
            return
        x = image_to_tensor(load_image(state.params["ref_image"]).convert("RGB"), state.dtype).to(
            state.device
        )
        with pipe.using("vae") as vae:
            state.data[self.name] = (vae or pipe.components["vae"]).encode(x)

    def denoise_input(self, pipe, state, side, step, inp):
        if self.name in state.data:
            inp.images.append(ImageSegment(state.data[self.name], modulation=0))


@pytest.fixture(scope="module")
def recipe():
    """An in-process plugin (rolled back afterwards): the injector and a recipe using it."""
    from qi_core.plugin_host import host, plugin_module

    base = host().registry.get("pipeline", "qwen-image").load()
    plugin = plugin_module(
        "test_training_ref_image",
        qi_register_injectors=lambda register: register(RefImage.name, RefImage),
        qi_register_pipelines=lambda register: register(
            dataclasses.replace(base, name=RECIPE, injectors=(*base.injectors, RefImage.name))
        ),
    )
    qi.register_plugin(plugin)
    yield RECIPE
    host().unregister_plugin("test_training_ref_image")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    ds = make_dataset(tmp_path_factory.mktemp("ref"), [(32, 32), (32, 32)])
    write_metadata(ds, [{"image": f"images/{i}.png", "prompt": f"picture {i}", "ref_image": f"images/{1 - i}.png"}
                        for i in range(2)])  # fmt: skip
    return ds


def test_extra_input_becomes_an_image_segment_and_caches(recipe, dataset, tmp_path):
    pipe = qi.compose(recipe, model=GOLDEN_MODEL, progress=False)
    with Image.open(dataset / "images" / "0.png") as a, Image.open(dataset / "images" / "1.png") as b:
        sample = {
            "image": a.convert("RGB"),
            "prompt": "picture 0",
            "ref_image": b.convert("RGB"),
            "_where": "r",
        }
    cond = encode_sample(pipe, sample, extra_inputs=("ref_image",))
    assert len(cond.images) == 1 and cond.images[0].latents.shape == (1, 16, 4, 4)
    plain = encode_sample(pipe, {k: v for k, v in sample.items() if k != "ref_image"})
    with torch.no_grad():
        with_ref = SFT().loss(pipe, cond, torch.Generator().manual_seed(0))
        without = SFT().loss(pipe, plain, torch.Generator().manual_seed(0))
    assert abs(float(with_ref) - float(without)) > 1e-6  # the denoiser saw the extra tokens
    loaded = load_conditioning(save_conditioning(cond, tmp_path / "c.safetensors"))
    assert torch.equal(loaded.images[0].latents, cond.images[0].latents)
    assert torch.equal(loaded.text[0].emb, cond.text[0].emb) and loaded.params[0]["prompt"] == "picture 0"
    with torch.no_grad():
        again = SFT().loss(pipe, loaded, torch.Generator().manual_seed(0))
    assert float(again) == float(with_ref)
    batch = collate([cond, cond])
    assert batch.images[0].latents.shape[0] == 2 and batch.batch_size == 2


def test_training_with_an_extra_input(recipe, dataset, tmp_path):
    result = train(args_for(dataset, tmp_path / "out", pipeline=recipe, extra_inputs="ref_image",
                            data_file_keys="image,ref_image", lora_base_model="dit", lora_rank=4, batch_size=2))  # fmt: skip
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.losses)).all()


def test_extra_input_errors_name_the_row(recipe, dataset, tmp_path):
    # a column no row has is named up front (tests/training/test_bad_input_training.py has the details)
    with pytest.raises(
        InvalidInputError, match=r"metadata.csv has no column 'seed' \(named in --extra_inputs\)"
    ):
        train(args_for(dataset, tmp_path / "a", extra_inputs="seed", lora_base_model="dit", lora_rank=4))
    with pytest.raises(InvalidInputError, match=r"row 1 of metadata.csv.*does not accept 'ref_image'"):
        train(args_for(dataset, tmp_path / "b", extra_inputs="ref_image", data_file_keys="image,ref_image",
                       lora_base_model="dit", lora_rank=4))  # fmt: skip
