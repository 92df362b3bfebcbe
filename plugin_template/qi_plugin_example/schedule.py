"""A Karras-spaced sigma schedule for the flow-matching Qwen-Image models.

Karras et al. 2022 (EDM, eq. 5) place the sampling noise levels at
``sigma_i = (sigma_max^(1/rho) + i/(N-1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, which spends more
steps at low noise than a linear grid does. Here ``sigma_max`` is the denoising strength and ``sigma_min`` is
0.02, the last sigma of the "Qwen-Image" schedule. The grid is then shifted exactly like Qwen-Image's own
schedule, ``sigma' = e^mu / (e^mu + 1/sigma - 1)`` with ``mu = 0.5 + 0.4 * (seq - 256) / 7936`` and
``seq = (H/16) * (W/16)`` unless ``exponential_shift_mu`` is given, so larger images keep more steps at high
noise. Training is unchanged: ``training_schedule`` is the base schedule's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import qi_core as qi

SIGMA_MIN = 0.02  # last sigma of the "Qwen-Image" schedule (its shift-terminal)


def karras_sigmas(
    num_steps: int, sigma_max: float = 1.0, sigma_min: float = SIGMA_MIN, rho: float = 7.0
) -> torch.Tensor:
    """``num_steps`` sigmas from ``sigma_max`` down to ``sigma_min``, Karras-spaced (float64 for the powers)."""
    if num_steps == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    ramp = torch.linspace(0, 1, num_steps, dtype=torch.float64)
    hi, lo = sigma_max ** (1 / rho), min(sigma_min, sigma_max) ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def shift_mu(height: int, width: int) -> float:
    """Qwen-Image's resolution-dependent shift: 0.5 at 256 tokens, 0.9 at 8192 (linear, not clamped)."""
    seq = (height // 16) * (width // 16)
    return 0.5 + (0.9 - 0.5) * (seq - 256) / (8192 - 256)


@dataclass(frozen=True)
class KarrasSchedule:
    rho: float = 7.0  # Karras et al. 2022's default; larger = more steps near sigma_min

    def schedule(
        self,
        num_inference_steps: int,
        *,
        height: int,
        width: int,
        denoising_strength: float = 1.0,
        exponential_shift_mu: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sigmas, timesteps)``, 1-D float32, first sigma = the shifted denoising strength."""
        mu = shift_mu(height, width) if exponential_shift_mu is None else exponential_shift_mu
        sigmas = karras_sigmas(num_inference_steps, float(denoising_strength), SIGMA_MIN, self.rho)
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas.clamp_min(1e-12) - 1))
        sigmas = sigmas.float()
        return sigmas, sigmas * 1000

    def training_schedule(self, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, ...]:
        """The base "qwen-image" training schedule: this plugin changes sampling only."""
        return qi.get_scheduler("qwen-image").training_schedule(num_train_timesteps)
