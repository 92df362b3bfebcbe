"""Tests of the plugin, run after ``pip install -e .`` (entry points are read from the installed metadata)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from qi_plugin_example import NAME, PIPELINE, SCHEDULER
from qi_plugin_example.schedule import KarrasSchedule

import qi_core as qi


def test_plugin_is_installed_and_loads():
    report = {p["name"]: p for p in qi.plugins()}
    assert report[NAME]["status"] == "ok", report[NAME]["error"]
    assert report[NAME]["provides"] == {"pipeline": [PIPELINE], "scheduler": [SCHEDULER]}


def test_schedule_is_karras_spaced_then_shifted():
    sched = qi.get_scheduler(SCHEDULER)
    sigmas, timesteps = sched.schedule(10, height=1024, width=1024)
    assert sigmas.dtype == timesteps.dtype == torch.float32 and sigmas.shape == (10,)
    assert sigmas[0] == 1.0 and bool((sigmas[1:] < sigmas[:-1]).all())
    torch.testing.assert_close(timesteps, sigmas * 1000)
    mu = 0.5 + 0.4 * (64 * 64 - 256) / 7936
    assert math.isclose(sigmas[-1].item(), math.exp(mu) / (math.exp(mu) + 1 / 0.02 - 1), rel_tol=1e-6)
    # more steps at low noise than the base schedule
    base, _ = qi.get_scheduler("qwen-image").schedule(10, height=1024, width=1024)
    assert (sigmas < 0.5).sum() > (base < 0.5).sum()


def test_img2img_starts_at_the_denoising_strength():
    sigmas, _ = KarrasSchedule().schedule(
        6, height=512, width=512, denoising_strength=0.6, exponential_shift_mu=0.0
    )
    assert math.isclose(sigmas[0].item(), 0.6, rel_tol=1e-6)  # mu = 0: no shift


def test_composes_by_name_and_generates():
    pipe = qi.compose(PIPELINE, model="tiny", progress=False)
    assert pipe.scheduler == KarrasSchedule()
    out = pipe(
        prompt="a lighthouse",
        height=32,
        width=32,
        num_inference_steps=2,
        seed=0,
        output_type="np",
        progress_bar_cmd=lambda x: x,
    )
    assert out.shape == (32, 32, 3) and np.isfinite(out).all()


def test_bad_steps_are_refused():
    pipe = qi.compose(PIPELINE, model="tiny", progress=False)
    with pytest.raises(qi.errors.InvalidInputError):
        pipe(prompt="x", height=32, width=32, num_inference_steps=0)
