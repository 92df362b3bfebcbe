"""Guiders: how one step's per-side predictions combine into the velocity the sampler integrates."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from einops import rearrange

POSITIVE, NEGATIVE = "positive", "negative"


class CFG:
    """Classifier-free guidance, DiffSynth-Studio's: ``neg + s·(pos − neg)``; ``cfg_scale == 1`` skips the
    negative pass."""

    name = "cfg"

    def sides(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        return (POSITIVE, NEGATIVE) if float(params["cfg_scale"]) != 1.0 else (POSITIVE,)

    def combine(self, preds: Mapping[str, torch.Tensor], *, params: Mapping[str, Any], step: int,
                sigma: float) -> torch.Tensor:  # fmt: skip
        if NEGATIVE not in preds:
            return preds[POSITIVE]
        return preds[NEGATIVE] + params["cfg_scale"] * (preds[POSITIVE] - preds[NEGATIVE])


class CFGRenorm(CFG):
    """diffusers' "true CFG" (``QwenImagePipeline``): the CFG combination rescaled, token by token, to the norm
    of the positive prediction.

    diffusers takes the norm over the last axis of its packed latents, i.e. over the (C·P·Q) channels of each
    2×2 latent patch; ``patch_size`` is that P (2 for every Qwen-Image DiT)."""

    name = "cfg-renorm"

    def __init__(self, patch_size: int = 2):
        self.patch_size = patch_size

    def combine(self, preds: Mapping[str, torch.Tensor], *, params: Mapping[str, Any], step: int,
                sigma: float) -> torch.Tensor:  # fmt: skip
        v = super().combine(preds, params=params, step=step, sigma=sigma)
        if NEGATIVE not in preds:
            return v
        p = self.patch_size
        pack = lambda x: rearrange(x, "B C (h P) (w Q) -> B h w (C P Q)", P=p, Q=p)  # noqa: E731
        pos, comb = pack(preds[POSITIVE]), pack(v)
        # diffusers: comb * (‖pos‖ / ‖comb‖) per token, norms in the prediction's dtype
        comb = comb * (torch.norm(pos, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        h = v.shape[-2] // p
        return rearrange(comb, "B h w (C P Q) -> B C (h P) (w Q)", h=h, P=p, Q=p)
