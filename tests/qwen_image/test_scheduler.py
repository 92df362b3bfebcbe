"""The Qwen-Image rows of the golden `scheduler` case, through the public ``qi.get_scheduler``."""

from __future__ import annotations

import pytest
import torch
from conftest import golden_case

import qi_core as qi
from qi_core.errors import InvalidInputError

CASE, T, _ = golden_case("scheduler")
ROWS = [r for r in CASE["rows"] if r["template"] == "Qwen-Image" and not r.get("training")]
TOL = CASE.get("tolerances", {})


@pytest.mark.parametrize("row", ROWS, ids=[r["table"] for r in ROWS])
def test_inference_rows(row):
    sigmas, timesteps = qi.get_scheduler("qwen-image").schedule(
        row["num_inference_steps"],
        height=row["height"],
        width=row["width"],
        denoising_strength=row["denoising_strength"],
        exponential_shift_mu=row["exponential_shift_mu"],
    )
    assert sigmas.dtype == timesteps.dtype == torch.float32
    assert sigmas.shape == (row["num_inference_steps"],)
    torch.testing.assert_close(sigmas, T[row["table"] + "_sigmas"], atol=1e-5, rtol=0)
    torch.testing.assert_close(timesteps, T[row["table"] + "_timesteps"], atol=2e-3, rtol=0)


@pytest.mark.parametrize("row", [r for r in CASE["rows"] if r.get("training")], ids=lambda r: r["table"])
def test_training_rows(row):
    sigmas, timesteps, weights = qi.get_scheduler("qwen-image").training_schedule(row["num_inference_steps"])
    name = row["table"]
    torch.testing.assert_close(sigmas, T[f"{name}_sigmas"], atol=1e-5, rtol=0)
    torch.testing.assert_close(timesteps, T[f"{name}_timesteps"], atol=2e-3, rtol=0)
    wkey = next(k for k in T if k.startswith(name) and "weight" in k)
    torch.testing.assert_close(weights, T[wkey], atol=1e-5, rtol=0)


def test_bad_steps_and_strength():
    s = qi.get_scheduler("qwen-image")
    with pytest.raises(InvalidInputError, match="num_inference_steps"):
        s.schedule(0, height=64, width=64)
    with pytest.raises(InvalidInputError, match=r"denoising_strength must be in \[0, 1\]"):
        s.schedule(4, height=64, width=64, denoising_strength=1.5)


def test_single_step_is_finite():
    sigmas, _ = qi.get_scheduler("qwen-image").schedule(1, height=64, width=64)
    assert torch.isfinite(sigmas).all()
