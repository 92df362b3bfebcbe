"""A guider and a sampler, the two parts of the denoising loop a variant most often changes.

``RescaledCFG`` — classifier-free guidance with the rescale of Lin et al. 2024 ("Common Diffusion Noise
Schedules and Sample Steps are Flawed", eq. 15-16): the guided prediction is scaled to the standard deviation
of the positive one and mixed back with weight ``phi``, which tames over-saturation at high ``cfg_scale``.
``phi = 0`` is plain CFG.

``Midpoint`` — the explicit midpoint method: one Euler half step, then the full step with the velocity there.
Second order, two denoiser evaluations per step (the last step, to sigma = 0, is a plain Euler step: the
velocity is not evaluated at sigma = 0).
"""

from __future__ import annotations

import torch


class RescaledCFG:
    def __init__(self, phi: float = 0.7):
        self.phi = phi

    def sides(self, params):
        return ("positive", "negative") if float(params["cfg_scale"]) != 1.0 else ("positive",)

    def combine(self, preds, *, params, step, sigma):
        pos = preds["positive"]
        if "negative" not in preds:
            return pos
        cfg = preds["negative"] + params["cfg_scale"] * (pos - preds["negative"])
        if self.phi == 0:
            return cfg
        dims = tuple(range(1, pos.ndim))
        rescaled = cfg * (pos.std(dim=dims, keepdim=True) / cfg.std(dim=dims, keepdim=True))
        return self.phi * rescaled + (1 - self.phi) * cfg


class Midpoint:
    def sample(self, velocity, latents: torch.Tensor, sigmas: torch.Tensor, *, state) -> torch.Tensor:
        steps = range(len(sigmas) - 1)
        for i in state.progress(steps) if state is not None else steps:
            s, s_next = sigmas[i], sigmas[i + 1]
            v = velocity(latents, i, s)
            if float(s_next) == 0.0:
                latents = latents + v * (s_next - s)
            else:
                half = (s + s_next) / 2
                v_half = velocity(latents + v * (half - s), i, half)
                latents = latents + v_half * (s_next - s)
            if state is not None:
                state.step_done(i, latents)
        return latents
