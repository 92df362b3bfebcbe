"""Golden DiffSynth-Studio runs of Qwen-Image-Layered and Layered-Control through the public interface.

The tiny golden model: Qwen-Image's text encoder and tokenizer, the layered transformer and the RGBA VAE
(``models/qwen_image_layered``), given per role. Every recorded intermediate is compared with its tolerance
group; each output frame is an RGBA image (``output_<k>.png``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GOLDEN, GOLDEN_MODEL, golden_call, golden_case, tolerance_group
from PIL import Image

import qi_core as qi

LAYERED = GOLDEN / "models" / "qwen_image_layered"
CASES = {"layered": "qwen-image-layered", "layered_control": "qwen-image-layered-control"}


@pytest.fixture(scope="module")
def pipes():
    parts = {"dit": LAYERED / "transformer", "vae": LAYERED / "vae"}
    return {r: qi.compose(r, model=GOLDEN_MODEL, progress=False, components=parts) for r in CASES.values()}


def run_case(pipe, name: str, **overrides):
    case, want, folder = golden_case(name)
    got: dict[str, torch.Tensor] = {}
    pipe.tracer = lambda k, v: got.__setitem__(k, v.detach().clone())
    try:
        out = pipe(**{**golden_call(case, folder), **overrides}, progress_bar_cmd=lambda x: x)
    finally:
        pipe.tracer = None
    return case, want, folder, got, out


@pytest.mark.parametrize("name", CASES)
def test_golden_layered_case(pipes, name):
    case, want, folder, got, out = run_case(pipes[CASES[name]], name, output_type="np")
    tol = {g: t["recommended_atol"] for g, t in case["tolerances"].items()}
    compared = []
    for key, ref in want.items():
        if key.endswith(("input_ids", "attention_mask", "emb_mask")):
            continue
        assert key in got, f"{name}: our pipeline recorded no {key!r} (have {sorted(got)})"
        diff = (got[key].to(torch.float32).reshape(ref.shape) - ref).abs().max().item()
        assert diff <= tol[tolerance_group(key)], (
            f"{name}: {key} differs by {diff:.3g} > {tol[tolerance_group(key)]}"
        )
        compared.append(key)
    assert {"layer_input_latents", "final_latents", "image_float"} <= set(compared)
    frames = case["call"]["layer_num"] + 1
    # the public output: one (H, W, 4) float array per frame (a list even for one frame, as DiffSynth)
    assert isinstance(out, list) and len(out) == frames == want["image_float"].shape[0]
    pngs = [f["file"] for f in case["output_images"]]
    for k, (arr, png) in enumerate(zip(out, pngs, strict=True)):
        ref = want["image_float"][k].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(arr, ref, atol=tol["image_float"], rtol=0)
        ours8 = ((torch.from_numpy(arr) + 1) * 127.5).clip(0, 255).to(torch.uint8).numpy().astype(int)
        with Image.open(folder / png) as im:
            assert im.mode == "RGBA"
            ref8 = np.asarray(im).astype(int)
        d = np.abs(ours8 - ref8)
        assert d.max() <= 1 and (d > 0).mean() <= 0.005, (png, d.max(), (d > 0).mean())
