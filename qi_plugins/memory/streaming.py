"""Moving one ``nn.ModuleList``'s layers to the compute device as they are used (``stream``, ``disk``, ``fp8``).

A streamed layer is brought in by a forward pre-hook and stays until another layer of the list is brought in,
the model's forward returns, or the policy's ``use`` ends: a denoiser that runs a layer for every CFG side
before the next layer (``forward_many``) moves it once per step. The next layer is read ahead in a thread
(on a side CUDA stream). What a layer held before it was brought in is kept here, per layer, not on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

#: ``fetch(i, want) -> {name within layer i: tensor as stored}`` for the names ``want(name)`` accepts
Fetch = Callable[[int, Callable[[str], bool]], dict[str, torch.Tensor]]


def find_layers(module: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The largest ModuleList by parameter count (DiT blocks, decoder layers) and its qualified name."""
    best, best_n = None, 0
    for name, m in module.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 1:
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = (name, m), n
    return best


def nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether the tensor ``name`` belongs to one of the submodules ``prefixes`` (names within a layer)."""
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class Streamer:
    """Brings the layers ``[resident, len(layers))`` of ``layers`` in around their forward; ``root`` is the
    module whose forward ends a use of them."""

    def __init__(self, root: nn.Module, layers: nn.ModuleList, device: torch.device, dtype: torch.dtype,
                 resident: int, fetch: Fetch, prefetch: bool,
                 scales: dict[tuple[int, str], torch.Tensor] | None = None):  # fmt: skip
        self.layers, self.device, self.dtype = layers, device, dtype
        self.resident = resident  # layers [0, resident) stay on the device
        self.fetch = fetch
        self.scales = scales or {}  # (layer, name) → per-row scale of a weight stored in 8 bits
        self.skip: tuple[str, ...] = ()  # submodules the forward leaves where they are (precomputed state)
        self.kept: dict[nn.Module, dict[str, torch.Tensor]] = {}  # layers brought in → the tensors they held
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and prefetch else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qi-prefetch") if prefetch else None
        self.pending: dict[int, tuple[Future, tuple[str, ...] | None]] = {}  # layer → (read, its ``only``)
        self.handles = [root.register_forward_hook(lambda *_: self.release())]
        for i, layer in enumerate(layers):
            if i >= resident:
                self.handles.append(layer.register_forward_pre_hook(self._pre(i)))

    # -- reading ---------------------------------------------------------------------------------------
    def _load(self, i: int, only: tuple[str, ...] | None, skip: tuple[str, ...]) -> Any:
        """Layer i's tensors (those under ``only``, else all but those under ``skip``) on the compute device
        in the compute dtype; on the side stream when prefetching, with the event that marks them ready."""
        want = (lambda k: under(k, only)) if only is not None else (lambda k: not under(k, skip))
        src = self.fetch(i, want)
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            out = {}
            for k, t in src.items():
                dt = self.dtype if t.is_floating_point() else t.dtype
                x = t.to(self.device, non_blocking=True).to(dt)
                scale = self.scales.get((i, k))
                if scale is not None:
                    s = scale.to(self.device, dt, non_blocking=True)
                    x = x.mul_(s) if x is not t else x * s  # in place, never on the stored tensor itself
                out[k] = x
            if self.stream is None:
                return out
            event = torch.cuda.Event()
            event.record(self.stream)
        return out, event

    def _start(self, i: int, only: tuple[str, ...] | None = None) -> None:
        """Read layer i ahead (nothing for a resident layer, or one already read or in place)."""
        if self.pool is None or not self.resident <= i < len(self.layers) or i in self.pending:
            return
        if self.layers[i] not in self.kept:
            self.pending[i] = (self.pool.submit(self._load, i, only, self.skip), only)

    def _take(self, i: int, only: tuple[str, ...] | None) -> dict[str, torch.Tensor]:
        fut, read_only = self.pending.pop(i, (None, None))
        if fut is not None and read_only != only:  # read ahead for another purpose
            fut.result()
            fut = None
        got = fut.result() if fut is not None else self._load(i, only, self.skip)
        if isinstance(got, tuple):
            got, event = got
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in got.values():
                t.record_stream(current)  # allocated on the side stream, used and freed on this one
        return got

    # -- placing ---------------------------------------------------------------------------------------
    def bring_in(self, i: int, only: tuple[str, ...] | None = None) -> None:
        """Put layer i's tensors (those under ``only``, else all but ``skip``) on the compute device in place
        of the stored ones, until another layer is brought in or :meth:`release`; read the next one ahead."""
        self.release()
        layer = self.layers[i]
        self.kept[layer] = {k: swap(layer, k, t) for k, t in self._take(i, only).items()}
        if i + 1 < len(self.layers):
            self._start(i + 1, only)
        elif only is None:
            self._start(self.resident)  # the next step starts again at the first streamed layer

    def release(self) -> None:
        """Give every layer brought in its stored tensors back."""
        for layer, old in self.kept.items():
            for k, t in old.items():
                swap(layer, k, t)
        self.kept.clear()

    def _pre(self, i: int):
        def hook(module: nn.Module, args: Any) -> None:
            if module not in self.kept:  # else already here (the other CFG side)
                self.bring_in(i)

        return hook

    @contextmanager
    def holding(self, i: int, only: tuple[str, ...]) -> Iterator[None]:
        """Layer i's tensors under ``only`` on the compute device for the block (outside any forward)."""
        if i >= self.resident:
            self.bring_in(i, only)
        try:
            yield
        finally:
            self.release()

    @contextmanager
    def skipping(self, prefixes: tuple[str, ...]) -> Iterator[None]:
        """While open, the forward leaves the tensors under ``prefixes`` where they are stored."""
        self.drain()  # read ahead with everything
        self.skip = tuple(prefixes)
        self._start(self.resident)
        try:
            yield
        finally:  # the layer still in out first: the read ahead then completes with one layer fewer in memory
            self.release()
            self.drain()
            self.skip = ()

    def drain(self) -> None:
        """Forget read-ahead layers (the weights, or what is skipped, may change before the next use)."""
        for fut, _ in self.pending.values():
            fut.result()
        self.pending.clear()

    def close(self) -> None:
        self.release()
        for h in self.handles:
            h.remove()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def swap(module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` in place of the parameter or buffer ``name``; return what was there. Swapping the
    objects (not ``.data``) works across devices, meta included."""
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, False)
    else:
        old = owner._buffers[attr]
        owner._buffers[attr] = value
    return old
