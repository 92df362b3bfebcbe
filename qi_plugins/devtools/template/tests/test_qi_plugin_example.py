"""Tests of the plugin, run after ``pip install -e .`` (entry points are read from the installed metadata)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from qi_plugin_example import GUIDER, NAME, PIPELINE, SAMPLER, SCHEDULER
from qi_plugin_example.loop import Midpoint, RescaledCFG
from qi_plugin_example.schedule import KarrasSchedule

import qi_core as qi


def test_plugin_is_installed_and_loads():
    report = {p["name"]: p for p in qi.plugins()}
    assert report[NAME]["status"] == "ok", report[NAME]["error"]
    assert report[NAME]["provides"] == {
        "pipeline": [PIPELINE],
        "scheduler": [SCHEDULER],
        "guider": [GUIDER],
        "sampler": [SAMPLER],
    }


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


def test_rescaled_cfg_without_rescale_is_cfg():
    g = torch.Generator().manual_seed(0)
    preds = {
        "positive": torch.randn(1, 4, 8, 8, generator=g),
        "negative": torch.randn(1, 4, 8, 8, generator=g),
    }
    params = {"cfg_scale": 4.0}
    plain = preds["negative"] + 4.0 * (preds["positive"] - preds["negative"])
    assert torch.equal(RescaledCFG(phi=0).combine(preds, params=params, step=0, sigma=1.0), plain)
    full = RescaledCFG(phi=1).combine(preds, params=params, step=0, sigma=1.0)
    torch.testing.assert_close(full.std(), preds["positive"].std())
    assert RescaledCFG().sides({"cfg_scale": 1.0}) == ("positive",)


def test_midpoint_is_second_order():
    # dx/dsigma = -x*sigma: x(s) = x(1) * exp((1 - s^2) / 2)
    def error(n):
        sigmas = torch.linspace(1.0, 0.2, n + 1, dtype=torch.float64)
        x = Midpoint().sample(lambda x, i, s: -x * s, torch.ones(1, dtype=torch.float64), sigmas, state=None)
        return abs(x.item() - math.exp((1 - 0.04) / 2))

    assert 3.6 < error(32) / error(64) < 4.4  # halving the step divides the error by 2^2


def test_guider_and_sampler_run_in_a_pipeline():
    pipe = qi.compose(PIPELINE, model="tiny", progress=False)
    args = dict(prompt="a lighthouse", height=32, width=32, num_inference_steps=2, seed=0, output_type="np",
                progress_bar_cmd=lambda x: x)  # fmt: skip
    out = pipe(**args, guidance=GUIDER, sampler=SAMPLER)
    assert out.shape == (32, 32, 3) and np.isfinite(out).all()
    assert not np.array_equal(out, pipe(**args))
