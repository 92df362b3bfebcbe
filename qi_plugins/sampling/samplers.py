"""Samplers: integrate the flow ODE ``dx/dσ = v(x, σ)`` over a sigma schedule.

``sigmas`` has ``num_inference_steps + 1`` entries (the last is the final sigma, 0 for a full run);
``velocity(latents, i, sigma)`` is the guided velocity of step ``i`` evaluated at ``sigma``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

Velocity = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]


def steps(state: Any, n: int):
    """``range(n)`` through the call's progress bar (a state without one, e.g. in training: plain range)."""
    wrap = getattr(state, "progress", None)
    return wrap(range(n)) if wrap is not None else range(n)


def done(state: Any, i: int, latents: torch.Tensor) -> None:
    """Report the latents after step ``i`` (the pipeline traces them; training states have no such hook)."""
    report = getattr(state, "step_done", None)
    if report is not None:
        report(i, latents)


def euler_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One explicit Euler step from ``sigma`` to ``sigma_next``."""
    return x + v * (sigma_next - sigma).to(x.device, x.dtype)


class Euler:
    """First order; DiffSynth-Studio's and diffusers' flow-match step."""

    name = "euler"

    def sample(self, velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor, *,
               state: Any = None) -> torch.Tensor:  # fmt: skip
        for i in steps(state, len(sigmas) - 1):
            latents = euler_step(latents, velocity(latents, i, sigmas[i]), sigmas[i], sigmas[i + 1])
            done(state, i, latents)
        return latents


class Heun:
    """Second order (Heun's method, the trapezoid corrector): two velocity evaluations per step, except the
    last step to σ = 0, where the velocity is not evaluated at σ = 0 and an Euler step ends the run."""

    name = "heun"

    def sample(self, velocity: Velocity, latents: torch.Tensor, sigmas: torch.Tensor, *,
               state: Any = None) -> torch.Tensor:  # fmt: skip
        for i in steps(state, len(sigmas) - 1):
            s, s_next = sigmas[i], sigmas[i + 1]
            v = velocity(latents, i, s)
            guess = euler_step(latents, v, s, s_next)
            if float(s_next) == 0.0:
                latents = guess
            else:
                latents = euler_step(latents, (v + velocity(guess, i, s_next)) / 2, s, s_next)
            done(state, i, latents)
        return latents
