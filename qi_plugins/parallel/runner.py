"""The ``parallel`` step runner: CFG-parallel × sequence parallel (Ulysses or ring) over torch.distributed."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import torch

from qi_core.protocols import DenoiseInput
from qi_plugins.parallel.comm import Mesh, make_mesh, one_sequence_split, positive, share_predictions
from qi_plugins.parallel.errors import ParallelConfigError
from qi_plugins.parallel.ring import RingSplit
from qi_plugins.parallel.ulysses import UlyssesSplit
from qi_plugins.sampling.runners import Batched


class Parallel:
    """One step's inputs over ``cfg × ulysses × ring`` processes (``torchrun --nproc-per-node N``).

    CFG-parallel: the labels (guidance sides; ``(item, side)`` in a batch) go round-robin to the ``cfg``
    groups; each group computes its share, then one all_gather hands every rank every prediction, so every
    rank combines them identically and holds the same latents. Sequence parallel: within a group, the
    ``ulysses`` ranks (heads exchanged, :mod:`qi_plugins.parallel.ulysses`) or the ``ring`` ranks (k/v passed
    round, every head kept, :mod:`qi_plugins.parallel.ring`) split each input's joint sequence, and each input
    runs on its own (never stacked); Ulysses and ring do not combine. Degrees: the arguments, else
    ``QI_PARALLEL_CFG`` / ``QI_PARALLEL_ULYSSES`` / ``QI_PARALLEL_RING``, else ring 1, cfg 2 on an even world
    and the rest Ulysses; checked against the process group at the first step. One process (no launcher) runs
    as the ``batched`` runner. ``batch``: as the ``batched`` runner's (``pipe.batch_cfg``).
    """

    name = "parallel"

    def __init__(self, cfg: int | None = None, ulysses: int | None = None, batch: bool = True, *,
                 ring: int | None = None):  # fmt: skip
        # bad values fail here, the degrees against the world at the first step
        given = {what: positive(v, what) for what, v in (("cfg", cfg), ("ulysses", ulysses), ("ring", ring))
                 if v is not None}  # fmt: skip
        one_sequence_split(given.get("ulysses"), given.get("ring"))
        self.cfg, self.ulysses, self.ring, self.batch = cfg, ulysses, ring, batch
        self.mesh: Mesh | None = None

    def setup(self, device: torch.device | str = "cpu") -> Mesh:
        """The process mesh (starting the process group from torchrun's environment if needed)."""
        if self.mesh is None:
            self.mesh = make_mesh(self.cfg, self.ulysses, torch.device(device), self.ring)
        return self.mesh

    def run(self, denoiser: Any, inputs: Mapping[Hashable, DenoiseInput], *, state: Any, step: int,
            sigma: torch.Tensor) -> dict[Hashable, torch.Tensor]:  # fmt: skip
        first = next(iter(inputs.values()))
        mesh = self.setup(first.latents.device)
        if mesh.ulysses > 1:
            check_heads(denoiser, mesh.ulysses)
        owner = {label: k % mesh.cfg for k, label in enumerate(inputs)}
        mine = {label: inp for label, inp in inputs.items() if owner[label] == mesh.cfg_rank}
        preds = self._compute(denoiser, mine, mesh, state=state, step=step, sigma=sigma) if mine else {}
        if mesh.cfg == 1:
            return preds
        shapes = {label: tuple(inp.latents.shape) for label, inp in inputs.items()}
        return share_predictions(preds, owner, shapes, first.latents.dtype, first.latents.device, mesh)

    def _compute(self, denoiser: Any, inputs: dict, mesh: Mesh, **kw: Any) -> dict:
        if mesh.sp == 1:
            return Batched(self.batch).run(denoiser, inputs, **kw)
        mode, degree = ("ulysses", mesh.ulysses) if mesh.ulysses > 1 else ("ring", mesh.ring)
        split_of = getattr(denoiser, "sequence_split", None)
        if split_of is None:
            raise ParallelConfigError(
                f"{mode}={degree} needs a denoiser with sequence_split (the Qwen-Image DiT has it); "
                f"{type(denoiser).__name__} has not: use {mode}=1"
            )
        kind = UlyssesSplit if mode == "ulysses" else RingSplit
        split = kind(mesh.sp_group, mesh.sp_rank, degree)
        wrapped = [split.wrap(inp) for inp in inputs.values()]
        many = getattr(denoiser, "forward_many", None)
        with split_of(split):
            preds = many(wrapped) if many is not None and self.batch else [denoiser(x) for x in wrapped]
        return dict(zip(inputs, preds, strict=True))


def check_heads(denoiser: Any, ulysses: int) -> None:
    """Refuse before any step when the denoiser says its head count and ``ulysses`` does not divide it."""
    heads = getattr(getattr(denoiser, "config", None), "num_attention_heads", None)
    if isinstance(heads, int) and heads % ulysses:
        raise ParallelConfigError(
            f"ulysses={ulysses} must divide the attention heads ({heads}) of {type(denoiser).__name__}; "
            f"choose a Ulysses degree that divides {heads} (cfg × ulysses = the number of processes), or ring "
            f"attention (ring={ulysses}), which keeps every head on every rank"
        )
