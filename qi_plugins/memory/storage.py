"""Where the layers of a policy-read module are kept: left in the safetensors files (``disk``) or quantised
into one 8-bit buffer while they are read (``fp8``), and the per-row float8 quantiser (also used by the
trainer's fp8 storage). A policy's ``load`` returns a :class:`LazyRead` or :class:`QuantisedRead`; the
composer hands it back to the policy's ``attach`` (``Loaded.reads``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qi_plugins.memory.safetensors_io import StoredTensor, read_tensor, safetensors_index
from qi_plugins.memory.streaming import find_layers


@dataclass
class LazyRead:
    """One module as ``disk`` reads it: everything loaded but its repeated layers (on the meta device), which
    ``lazy`` reads from the files when they are needed."""

    module: nn.Module
    lazy: LazyLayers


@dataclass
class QuantisedRead:
    """One module as ``fp8`` reads it: the layers ``[0, resident)`` on the compute device, the rest 8-bit
    (with ``scales[(layer, name)]``, per row) in one buffer on the offload device."""

    module: nn.Module
    layers: nn.ModuleList
    resident: int
    scales: dict[tuple[int, str], torch.Tensor]


class LazyLayers:
    """Reads layer i's tensors (``<prefix>i.*``) from the safetensors files, in ``dtype``, when asked."""

    def __init__(self, layers: nn.ModuleList, prefix: str, where: dict[str, StoredTensor], dtype: Any):
        self.layers, self.prefix, self.where, self.dtype = layers, prefix, where, dtype

    def read(self, keys: list[str], mapped: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor in ``dtype``), one at a time, in file order. ``mapped``: through a mapping of the file
        that is dropped right after (the tensors are exactly what the default loader gives); otherwise plain
        file reads into fresh memory (nothing of the file stays mapped while a model is being converted)."""
        from safetensors import safe_open

        order = sorted(keys, key=lambda k: (str(self.where[k].file), self.where[k].start))
        for f in dict.fromkeys(self.where[k].file for k in order):
            opened = safe_open(str(f), "pt") if mapped else open(f, "rb")  # noqa: SIM115
            with opened as fh:
                for k in (k for k in order if self.where[k].file == f):
                    t = fh.get_tensor(k) if mapped else read_tensor(fh, self.where[k])
                    yield k, t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def tensors(self, i: int, mapped: bool = True,
                want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
        """Layer i's (name within the layer, tensor), one at a time; only the names ``want`` accepts."""
        head = f"{self.prefix}{i}."
        keys = [k for k in self.where if k.startswith(head) and (want is None or want(k[len(head) :]))]
        for k, t in self.read(keys, mapped):
            yield k[len(head) :], t

    def fetch(self, i: int, want: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        return dict(self.tensors(i, want=want))


def read_lazily(build: Callable[[], nn.Module], files: list[Path], dtype: Any, what: str) -> LazyRead | None:
    """The module with everything but its repeated layers read from ``files``, and the reader of those layers.
    None: nothing repeated (the default loader reads it whole)."""
    from qi_core.loading import check_state_dict

    with torch.device("meta"):
        module = build()
    found = find_layers(module)
    if found is None:
        return None
    prefix, layers = found
    where: dict[str, StoredTensor] = {}
    for f in files:
        where.update(safetensors_index(Path(f)))
    check_state_dict(module.state_dict(), where, what)
    lazy = LazyLayers(layers, prefix + ".", where, dtype)
    rest = [k for k in where if not k.startswith(lazy.prefix)]
    module.load_state_dict(dict(lazy.read(rest)), strict=False, assign=True)
    return LazyRead(module.eval().requires_grad_(False), lazy)


def arena(specs: dict[Any, tuple[tuple[int, ...], torch.dtype]], device: torch.device, pin: bool) -> dict:
    """Views of one allocation per dtype, one view per spec (shape, dtype)."""
    totals: dict[torch.dtype, int] = {}
    for shape, dtype in specs.values():
        totals[dtype] = totals.get(dtype, 0) + math.prod(shape)
    buffers = {d: torch.empty(n, dtype=d, device=device, pin_memory=pin) for d, n in totals.items()}
    at = dict.fromkeys(totals, 0)
    views = {}
    for key, (shape, dtype) in specs.items():
        n = math.prod(shape)
        views[key] = buffers[dtype][at[dtype] : at[dtype] + n].view(shape)
        at[dtype] += n
    return views


def quantise_rows(data: torch.Tensor, out: torch.Tensor, rows: int = 256, scale: torch.Tensor | None = None
                  ) -> torch.Tensor:  # fmt: skip
    """Write ``data`` / scale into the 8-bit tensor ``out`` and return the per-row scale (amax / format max,
    written into ``scale`` when given), a few rows at a time so the float32 temporaries stay small."""
    if scale is None:
        scale = torch.empty((data.shape[0],) + (1,) * (data.ndim - 1), dtype=torch.float32, device=out.device)
    top = torch.finfo(out.dtype).max
    for r in range(0, data.shape[0], rows):
        chunk = data[r : r + rows].to(out.device).float()
        amax = chunk.abs().amax(dim=tuple(range(1, data.ndim)), keepdim=True)
        s = (amax / top).clamp_min(1e-12)
        scale[r : r + rows] = s
        out[r : r + rows] = (chunk / s).to(out.dtype)
    return scale
