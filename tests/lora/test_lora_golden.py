"""Golden cases ``lora_diffsynth`` and ``lora_alpha`` (DiffSynth's ``pipe.load_lora(pipe.dit, path, alpha)``
before the call) reproduced through the public interface, fused and as separate branches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import GOLDEN, GOLDEN_MODEL, golden_case, tolerance_group
from PIL import Image
from safetensors.torch import load_file

import qi_core as qi
from qi_plugins.lora import LoRA, load_lora

CASES = ["lora_diffsynth", "lora_alpha"]


def run(pipe, case) -> tuple[dict[str, torch.Tensor], np.ndarray]:
    got: dict[str, torch.Tensor] = {}
    pipe.tracer = lambda k, v: got.__setitem__(k, v.detach().clone())
    try:
        out = pipe(**case["call"], output_type="np", progress_bar_cmd=lambda x: x)
    finally:
        pipe.tracer = None
    return got, out


def check_against_golden(name, pipe, got, out, fused: bool) -> dict[str, float]:
    case, want, folder = golden_case(name)
    tol = {g: t["recommended_atol"] for g, t in case["tolerances"].items()}
    diffs = {}
    for key, ref in want.items():
        if key.endswith(("input_ids", "attention_mask", "emb_mask")):
            continue
        if key.startswith("fused_weight."):
            if not fused:
                continue
            ours = pipe.dit.get_submodule(key.removeprefix("fused_weight.")).weight
        else:
            assert key in got, f"{name}: nothing recorded as {key!r}"
            ours = got[key]
        diffs[key] = (ours.float().reshape(ref.shape) - ref).abs().max().item()
        assert diffs[key] <= tol[tolerance_group(key)], (
            f"{name}: {key} differs by {diffs[key]:.3g} > {tol[tolerance_group(key)]}"
        )
    assert "final_latents" in diffs and "image_float" in diffs
    assert fused == any(k.startswith("fused_weight.") for k in diffs)
    ours8 = ((torch.from_numpy(out) + 1) * 127.5).clip(0, 255).to(torch.uint8).numpy().astype(int)
    ref8 = np.asarray(Image.open(folder / "output.png").convert("RGB")).astype(int)
    d = np.abs(ours8 - ref8)
    assert d.max() <= 1 and (d > 0).mean() <= 0.005, (d.max(), (d > 0).mean())
    return diffs


def case_lora(name: str, **kwargs) -> LoRA:
    case, _, _ = golden_case(name)
    (spec,) = case["models"]["loras"]
    assert spec["target"] == "dit"
    return LoRA(GOLDEN / spec["path"], scale=spec["alpha"], **kwargs)


@pytest.mark.parametrize("name", CASES)
def test_golden_case_fused_through_compose(name):
    lora = case_lora(name)
    pipe = qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False, adapters=[lora])
    assert pipe.adapters == [lora]
    got, out = run(pipe, golden_case(name)[0])
    check_against_golden(name, pipe, got, out, fused=True)
    # unloading gives back the checkpoint's weights bit for bit
    lora.remove(pipe)
    assert pipe.adapters == []
    base = load_file(GOLDEN_MODEL / "transformer" / "diffusion_pytorch_model.safetensors")
    ours = pipe.dit.state_dict()
    assert ours.keys() == base.keys()
    assert all(torch.equal(ours[k], base[k]) for k in base)


@pytest.fixture(scope="module")
def base_pipe():
    return qi.compose("qwen-image", model=GOLDEN_MODEL, progress=False)


@pytest.mark.parametrize("name", CASES)
def test_golden_case_unfused_branches_and_exact_unload(base_pipe, name):
    case, _, _ = golden_case(name)
    _, before = run(base_pipe, case)
    lora = load_lora(base_pipe, case_lora(name).source, case["models"]["loras"][0]["alpha"], fuse=False)
    try:
        got, out = run(base_pipe, case)
        check_against_golden(name, base_pipe, got, out, fused=False)
    finally:
        lora.remove(base_pipe)
    _, after = run(base_pipe, case)
    assert np.array_equal(before, after)  # unload restores the base output exactly
    # nothing of the LoRA is left: same parameters, no hooks
    base = load_file(GOLDEN_MODEL / "transformer" / "diffusion_pytorch_model.safetensors")
    assert base_pipe.dit.state_dict().keys() == base.keys()
    assert not any(m._forward_hooks for m in base_pipe.dit.modules())
