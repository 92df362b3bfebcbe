"""``guidance="cfg-renorm"`` reproduces ``diffusers.QwenImagePipeline`` seed for seed on the golden tiny model.

diffusers draws the initial noise on the CPU in the same element order as DiffSynth, its dynamic-shift schedule
is DiffSynth's formula, and its true CFG is ``cfg-renorm``. What remains is rounding: diffusers builds the sigmas
in float64 numpy, qi in float32 torch (≤ 6e-8 apart), and its VAE decode of the same latents is the
official one. The bound 2e-4 is the issue's; the measured gap is printed (`pytest -s`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import GOLDEN_MODEL

import qi_core as qi

diffusers = pytest.importorskip("diffusers")

PROMPT, NEGATIVE = "A red fox sitting in a snowy forest, watercolor painting", "blurry, low quality"


@pytest.fixture(scope="module")
def pipes():
    ours = qi.compose("qwen-image", model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32,
                      guidance="cfg-renorm", progress=False)  # fmt: skip
    ref = diffusers.QwenImagePipeline.from_pretrained(GOLDEN_MODEL, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ours, ref


@pytest.mark.parametrize(("height", "width", "steps"), [(64, 64, 3), (64, 96, 4), (96, 48, 2)])
def test_cfg_renorm_matches_diffusers(pipes, height, width, steps):
    ours, ref = pipes
    got = ours(prompt=PROMPT, negative_prompt=NEGATIVE, cfg_scale=4.0, height=height, width=width, seed=7,
               num_inference_steps=steps, output_type="np", progress_bar_cmd=lambda x: x)  # fmt: skip
    want = ref(prompt=PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=4.0, height=height, width=width,
               num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(7),
               output_type="pt").images[0]  # fmt: skip
    # diffusers' "pt" output is the decoded image mapped to [0, 1] and clamped; ours is the raw decoder output
    ours01 = (torch.from_numpy(got).permute(2, 0, 1) / 2 + 0.5).clamp(0, 1)
    diff = (ours01 - want).abs().max().item()
    print(
        f"cfg-renorm vs diffusers.QwenImagePipeline {height}x{width}, {steps} steps: max abs diff {diff:.3g}"
    )
    assert diff <= 2e-4


def test_plain_cfg_differs_from_diffusers(pipes):
    """The guider is what makes the difference: plain CFG on the same call does not match diffusers."""
    ours, ref = pipes
    kw = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=3)
    got = ours(**kw, cfg_scale=4.0, seed=7, guidance="cfg", output_type="np", progress_bar_cmd=lambda x: x)
    want = ref(**kw, true_cfg_scale=4.0, generator=torch.Generator("cpu").manual_seed(7), output_type="pt")
    ours01 = (torch.from_numpy(got).permute(2, 0, 1) / 2 + 0.5).clamp(0, 1)
    assert (ours01 - want.images[0]).abs().max().item() > 1e-3
