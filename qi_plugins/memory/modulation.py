"""A denoiser's timestep-only state (the adaLN modulation of every layer) for every step of one call, computed
before the first step, once for all CFG sides, with the same kernels as inline (so bit-identical to it).

Every policy does it (see ``Resident.prepare``); under a streaming policy the weights only that state needs —
a third of the Qwen-Image DiT — are then brought in once per call, not once per step. A denoiser offers it
with four members (the base model plugin's DiT has them):

* ``modulation_layers()`` — the layers, each with ``modulation(temb)`` (its state, from the embedding alone);
* ``modulation_modules()`` — the submodules of a layer (names relative to it) that only ``modulation`` reads;
* ``timestep_embeddings(inputs, timesteps)`` — ``{key: embedding}`` for each input at each timestep;
* ``precomputed_modulation(table)`` — a context manager in which its forward takes layer i's state for an
  input from ``table[key][i]``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

MEMBERS = ("modulation_layers", "modulation_modules", "timestep_embeddings", "precomputed_modulation")


def supported(model: Any) -> bool:
    """Whether ``model`` offers its timestep-only state (the four members above)."""
    return all(callable(getattr(model, m, None)) for m in MEMBERS)


def precompute(model: Any, inputs: list[Any], timesteps: torch.Tensor,
               holding: Callable[[int], AbstractContextManager[Any]]) -> dict[Any, list[Any]]:  # fmt: skip
    """``{key: [layer 0's state, layer 1's …]}`` for every input (one per CFG side) at every timestep; each
    layer is visited once, inside ``holding(i)`` (a streaming policy brings its modulation weights in)."""
    tembs = model.timestep_embeddings(inputs, timesteps)
    table: dict[Any, list[Any]] = {key: [] for key in tembs}
    for i, layer in enumerate(model.modulation_layers()):
        with holding(i):
            for key, temb in tembs.items():
                table[key].append(layer.modulation(temb))
    return table
