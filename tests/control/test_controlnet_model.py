"""The blockwise ControlNet model: block maths, config from side-cars or weight shapes, zero init, loading errors,
the progress window, and what ``blockwise_controlnet_inputs`` accepts."""

from __future__ import annotations

import copy
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import GOLDEN, GOLDEN_MODEL
from safetensors.torch import save_file
from tolerance import F32_ISLAND_TERMS, check_same_maths, float32_bound

import qi_core as qi
from qi_core.errors import InvalidInputError, ModelLoadError, WeightMismatchError
from qi_plugins.blockwise_controlnet.inputs import ControlNetInput, active, as_controlnet_inputs
from qi_plugins.blockwise_controlnet.model import (
    BlockwiseControlNet,
    ControlNetConfig,
    config_for,
    controlnets,
    infer_config,
)

EXTRA = GOLDEN / "models" / "extra"
QUIET = {"progress_bar_cmd": lambda x: x, "output_type": "latent"}


def test_block_maths():
    net = BlockwiseControlNet(ControlNetConfig(num_layers=2, dim=8))
    for p in net.parameters():
        torch.nn.init.normal_(p)
    x, y = torch.randn(1, 5, 8), torch.randn(1, 5, 8)

    def rms(v, w):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    def both(net, x, y):
        b = net.controlnet_blocks[1]
        h = b.input_proj(rms(x, b.x_rms.weight) + rms(y, b.y_rms.weight))
        want = b.output_proj(0.5 * h * (1 + torch.erf(h / 2**0.5)))  # exact (erf) GELU, as DiffSynth
        return net.block(1, x, y), want

    # float64: the same maths, up to the float32 rounding of the RMS statistics the block keeps in float32
    # (the DiT's RMSNorm); float32: each within the float32 bound of a chain of 2 RMS means over 8, two
    # width-8 projections and the GELU (≤ 32 rounded terms), see tests/tolerance.py
    with torch.no_grad():
        got, want = both(net, x, y)
        got64, want64 = both(copy.deepcopy(net).double(), x.double(), y.double())
    island = float32_bound(want64, terms=F32_ISLAND_TERMS)
    check_same_maths(got, want, got64, want64, terms=32, f64_atol=island)
    cond = torch.randn(1, 16, 4, 6)
    assert net.project(cond).shape == (1, 6, 8)  # (4/2)·(6/2) tokens
    with pytest.raises(InvalidInputError, match="17-channel|16-channel"):
        net.project(torch.randn(1, 17, 4, 6))


@pytest.mark.parametrize("name", ["controlnet_canny", "controlnet_depth", "controlnet_inpaint"])
def test_config_from_sidecar_equals_inferred(name, tmp_path):
    f = EXTRA / f"{name}.safetensors"
    from_sidecar = config_for([f])
    assert from_sidecar == ControlNetConfig(
        num_layers=2, dim=64, additional_in_dim=4 if "inpaint" in name else 0
    )
    copy = tmp_path / "model.safetensors"  # no side-car, no config.json: sizes come from the shapes
    shutil.copy(f, copy)
    assert config_for([copy]) == infer_config([copy]) == from_sidecar
    assert config_for([copy]).input_channels == (17 if "inpaint" in name else 16)


def test_sidecar_that_contradicts_the_weights(tmp_path):
    f = tmp_path / "cn.safetensors"
    shutil.copy(EXTRA / "controlnet_canny.safetensors", f)
    (tmp_path / "cn.json").write_text('{"init_args": {"num_layers": 3, "dim": 64}}')
    with pytest.raises(WeightMismatchError, match="missing"):
        controlnets(tmp_path, f)


def test_not_a_controlnet(tmp_path):
    f = tmp_path / "x.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(f))
    with pytest.raises(ModelLoadError, match="not a blockwise ControlNet"):
        controlnets(tmp_path, f)


def test_zero_initialised_controlnet_changes_nothing_and_trained_one_does(tmp_path):
    """init_weights() zeroes img_in and every output_proj: the residual is exactly 0 (the training start)."""
    net = BlockwiseControlNet(ControlNetConfig(num_layers=2, dim=64))
    net.init_weights()
    assert all(not p.any() for n, p in net.named_parameters() if n.startswith("img_in") or "output_proj" in n)
    assert any(p.any() for n, p in net.named_parameters() if "input_proj" in n)  # the rest keeps its init
    zero = tmp_path / "zero.safetensors"
    save_file(net.state_dict(), str(zero))
    files = [zero, EXTRA / "controlnet_canny.safetensors"]
    pipe = qi.compose("qwen-image-blockwise-controlnet-canny", model=GOLDEN_MODEL, progress=False,
                      components={"blockwise_controlnet": files})  # fmt: skip
    from PIL import Image

    with Image.open(GOLDEN / "cases" / "controlnet" / "controlnet_0_image.png") as im:
        control = im.copy()
    args = {"prompt": "a house", "height": 64, "width": 96, "seed": 3, "num_inference_steps": 2, **QUIET}
    plain = pipe(**args)
    with_zero = pipe(**args, blockwise_controlnet_inputs=[{"controlnet_id": 0, "image": control}])
    with_trained = pipe(**args, blockwise_controlnet_inputs=[{"controlnet_id": 1, "image": control}])
    assert torch.equal(with_zero, plain)
    assert (with_trained - plain).abs().max() > 1e-3


def test_control_image_is_resized_to_the_output_size():
    pipe = qi.compose("qwen-image-blockwise-controlnet-canny", model=GOLDEN_MODEL, progress=False,
                      components={"blockwise_controlnet": [EXTRA / "controlnet_canny.safetensors"]})  # fmt: skip
    from PIL import Image

    with Image.open(GOLDEN / "cases" / "controlnet" / "controlnet_0_image.png") as im:
        control = im.copy()
    got = {}
    pipe.tracer = lambda k, v: got.__setitem__(k, v)
    try:
        pipe(prompt="a", height=64, width=96, num_inference_steps=1, seed=0,
             blockwise_controlnet_inputs=[{"image": control.resize((192, 128))}], **QUIET)  # fmt: skip
    finally:
        pipe.tracer = None
    assert got["controlnet_conditioning_0"].shape == (1, 16, 8, 12)


@pytest.mark.parametrize(
    ("start", "end", "steps", "want"),
    [(0.9, 0.3, 4, [1, 2]), (1.0, 0.0, 5, [0, 1, 2, 3, 4]), (0.7, 0.2, 5, [2, 3]), (1.0, 0.0, 1, [0]),
     (0.5, 0.5, 3, [1]), (0.2, 0.0, 1, [0])],
)  # fmt: skip
def test_progress_window(start, end, steps, want):
    c = ControlNetInput(start=start, end=end, image="unused")
    assert [i for i in range(steps) if active(c, i, steps)] == want


def test_inputs_accepted_forms():
    diffsynth_like = SimpleNamespace(controlnet_id=1, scale=0.5, start=0.8, end=0.1, image="a.png",
                                     inpaint_mask=None, inpaint_image=None, processor_id=None)  # fmt: skip
    got = as_controlnet_inputs(
        [ControlNetInput(image="x.png"), {"image": "y.png", "scale": 2}, diffsynth_like]
    )
    assert got == [
        ControlNetInput(image="x.png"),
        ControlNetInput(image="y.png", scale=2),
        ControlNetInput(controlnet_id=1, scale=0.5, start=0.8, end=0.1, image="a.png"),
    ]
    assert as_controlnet_inputs({"image": "z.png"}) == [ControlNetInput(image="z.png")]  # a single input
    assert as_controlnet_inputs(None) == [] and as_controlnet_inputs([]) == []


def test_recipes_and_their_components():
    recipes = {r.name: r for r in qi.pipelines()}
    for suffix, steps, size in (("canny", 30, 1328), ("depth", 30, 1328), ("inpaint", 40, 1024)):
        r = recipes[f"qwen-image-blockwise-controlnet-{suffix}"]
        comp = r.components["blockwise_controlnet"]
        assert comp.model == f"DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-{suffix.capitalize()}"
        assert comp.pattern == "model.safetensors" and not comp.required
        assert (
            r.defaults["num_inference_steps"] == steps and r.defaults["height"] == r.defaults["width"] == size
        )
        assert r.injectors == ("input-image", "blockwise-controlnet")


@pytest.mark.parametrize(
    ("config", "words"),
    [(ControlNetConfig(num_layers=1, dim=64), "1 control blocks but the DiT has 2 blocks"),
     (ControlNetConfig(num_layers=2, dim=32), "dim 32 but the DiT's inner dim is 64")],
)  # fmt: skip
def test_controlnet_must_fit_the_dit(tmp_path, config, words):
    f = tmp_path / "small.safetensors"
    save_file(BlockwiseControlNet(config).state_dict(), str(f))
    pipe = qi.compose("qwen-image-blockwise-controlnet-depth", model=GOLDEN_MODEL, progress=False,
                      components={"blockwise_controlnet": f})  # fmt: skip
    from PIL import Image

    with pytest.raises(InvalidInputError, match=words):
        pipe(prompt="a", height=64, width=64, num_inference_steps=1,
             blockwise_controlnet_inputs=[{"image": Image.new("RGB", (64, 64))}], **QUIET)  # fmt: skip
