"""Step runners: how one step's :class:`~qi_core.protocols.DenoiseInput` s become predictions."""

from __future__ import annotations

import inspect
from collections.abc import Hashable, Mapping
from typing import Any

import torch

from qi_core.protocols import DenoiseInput


class Batched:
    """Every input on one device. With ``batch=True`` and a denoiser that has ``forward_many``, the inputs go
    through each layer together (a streamed layer moves once per step): a single call's sides each exactly as
    its own call; a batch's items (``state.items``) stacked along the batch axis, ``forward_many(...,
    stack=True)``, each equal to its own call up to rounding."""

    name = "batched"

    def __init__(self, batch: bool = True):
        self.batch = batch

    def run(self, denoiser: Any, inputs: Mapping[Hashable, DenoiseInput], *, state: Any, step: int,
            sigma: torch.Tensor) -> dict[Hashable, torch.Tensor]:  # fmt: skip
        many = getattr(denoiser, "forward_many", None)
        if self.batch and len(inputs) > 1 and many is not None:
            stack = len(getattr(state, "items", ())) > 1 and takes_stack(many)
            preds = many(list(inputs.values()), stack=True) if stack else many(list(inputs.values()))
            return dict(zip(inputs, preds, strict=True))
        return {label: denoiser(inp) for label, inp in inputs.items()}


def takes_stack(many: Any) -> bool:
    """Whether a ``forward_many`` accepts ``stack=`` (one without it runs each input as its own, in a batch too)."""
    try:
        params = inspect.signature(many).parameters
    except (TypeError, ValueError):
        return False
    return "stack" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
