"""Step runners: how one step's per-side :class:`~qi_core.protocols.DenoiseInput` s become predictions."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qi_core.protocols import DenoiseInput


class Batched:
    """Every side on one device. With ``batch=True`` and a denoiser that has ``forward_many``, the sides go
    through each layer together (a streamed layer moves once per step); each result equals its own call."""

    name = "batched"

    def __init__(self, batch: bool = True):
        self.batch = batch

    def run(self, denoiser: Any, inputs: Mapping[str, DenoiseInput], *, state: Any, step: int,
            sigma: torch.Tensor) -> dict[str, torch.Tensor]:  # fmt: skip
        many = getattr(denoiser, "forward_many", None)
        if self.batch and len(inputs) > 1 and many is not None:
            return dict(zip(inputs, many(list(inputs.values())), strict=True))
        return {side: denoiser(inp) for side, inp in inputs.items()}
