"""Flow-matching sigma schedules of the Qwen-Image family (pure functions + a tiny named wrapper).

Rectified flow: ``x_t = (1 - σ)·x0 + σ·noise``, velocity target ``noise - x0``, ``timestep = 1000·σ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qi_core.errors import InvalidInputError

NUM_TRAIN_TIMESTEPS = 1000


def resolution_mu(seq_len: int, base_seq: int = 256, max_seq: int = 8192, base_shift: float = 0.5,
                  max_shift: float = 0.9) -> float:  # fmt: skip
    """μ linear in the packed target token count (official scheduler_config; not clamped)."""
    m = (max_shift - base_shift) / (max_seq - base_seq)
    return base_shift + m * (seq_len - base_seq)


def exponential_shift(sigmas: torch.Tensor, mu: float) -> torch.Tensor:
    """σ' = e^μ / (e^μ + 1/σ − 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Rescale 1 − σ so that the last sigma equals ``terminal``."""
    one_minus = 1 - sigmas
    if float(one_minus[-1]) == 0.0:  # one step from σ=1: nothing to stretch (the formula would give 0/0)
        return sigmas
    return 1 - one_minus / (one_minus[-1] / (1 - terminal))


@dataclass(frozen=True)
class FlowMatchSchedule:
    """A named schedule. ``fixed_mu`` replaces the resolution rule; ``shift_terminal`` None = no stretch."""

    name: str  # registered name
    fixed_mu: float | None = None  # Lightning: ln 3
    shift_terminal: float | None = 0.02  # official scheduler_config
    training_mu: float = 0.8  # μ of the training grid (no resolution known there)

    def schedule(self, num_inference_steps: int, *, height: int, width: int, denoising_strength: float = 1.0,
                 exponential_shift_mu: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(sigmas, timesteps), float32, length ``num_inference_steps``; the step after the last goes to σ=0."""
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise InvalidInputError(
                f"num_inference_steps must be an integer ≥ 1, got {num_inference_steps!r}"
            )
        if not 0.0 <= denoising_strength <= 1.0:
            raise InvalidInputError(f"denoising_strength must be in [0, 1], got {denoising_strength}")
        if exponential_shift_mu is not None:
            mu = exponential_shift_mu
        elif self.fixed_mu is not None:
            mu = self.fixed_mu
        else:
            mu = resolution_mu((height // 16) * (width // 16))
        return self._sigmas(num_inference_steps, denoising_strength, mu)

    def _sigmas(self, n: int, strength: float, mu: float) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas = torch.linspace(strength, 0, n + 1)[:-1]
        sigmas = exponential_shift(sigmas, mu)
        if self.shift_terminal is not None:
            sigmas = stretch_to_terminal(sigmas, self.shift_terminal)
        return sigmas, sigmas * NUM_TRAIN_TIMESTEPS

    def training_schedule(self, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        """(sigmas, timesteps, weights) of the training grid; weights are DiffSynth's Gaussian bump."""
        sigmas, timesteps = self._sigmas(num_train_timesteps, 1.0, self.training_mu)
        grid = NUM_TRAIN_TIMESTEPS  # the bump is centred on the 1000-step grid whatever n is
        y = torch.exp(-2 * ((timesteps - grid / 2) / grid) ** 2)
        y = y - y.min()
        w = y * (grid / y.sum())
        if num_train_timesteps != grid:  # DiffSynth's empirical rescale for coarser grids
            w = w * (num_train_timesteps / grid)
            w = w + w[1]
        return sigmas, timesteps, w

    @staticmethod
    def timestep(sigma: torch.Tensor) -> torch.Tensor:
        """The denoiser's timestep at ``sigma`` (rectified flow: 1000·σ), for samplers that step between the
        schedule's sigmas."""
        return sigma * NUM_TRAIN_TIMESTEPS
