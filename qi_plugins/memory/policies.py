"""Memory policies: where each model's weights live between uses, and how they reach the compute device.

* ``none``     — everything resident on the compute device.
* ``offload``  — the whole component lives on the offload device (CPU, pinned) and moves in for each use.
* ``stream``   — the repeated layers (the largest ``nn.ModuleList``) stay on the offload device, optionally in a
                 storage dtype (fp8/bf16); a prefix of them stays resident while under ``vram_limit``; the rest
                 are moved in as they run, the next one read ahead (:mod:`~qi_plugins.memory.streaming`).
* ``disk``     — like ``stream`` but the layers are read lazily from the safetensors files (memory-mapped,
                 opened per layer, never the whole file in RAM), the next layer read ahead in a thread.
* ``fp8``      — ``stream`` with float8_e4m3fn storage and computation in the pipeline dtype.

The contract (see ``docs/hooks.md``): ``load(build, files, *, device, dtype, what)`` (``disk``, ``fp8``)
reads a module and returns what ``attach`` needs (:mod:`~qi_plugins.memory.storage`); ``attach(loaded, *,
device, dtype)`` gets it back in ``loaded.reads`` with the component and places it; ``use(model)`` brackets
each use; ``prepare(model, inputs, *, timesteps)``, called at the denoiser's first step inside a use,
precomputes its timestep-only state for the whole call (:mod:`~qi_plugins.memory.modulation`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qi_core.devices import parse_dtype
from qi_core.errors import InvalidInputError
from qi_core.loading import Loaded
from qi_core.protocols import component_module
from qi_plugins.memory import modulation
from qi_plugins.memory.storage import LazyRead, QuantisedRead, arena, quantise_rows, read_lazily
from qi_plugins.memory.streaming import Streamer, find_layers, nbytes, swap

GiB = 1024**3


def parse_size(v: Any) -> int | None:
    """``vram_limit`` in bytes: an int (bytes), a float (GiB), or a string like "8GiB"/"512MB"."""
    if v is None:
        return None
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(v) if isinstance(v, int) and v > 1024 else int(float(v) * GiB)
    if isinstance(v, str):
        s = v.strip().lower().replace(" ", "")
        for suffix, mul in (("gib", GiB), ("gb", 10**9), ("mib", 1024**2), ("mb", 10**6)):
            if s.endswith(suffix):
                return int(float(s[: -len(suffix)]) * mul)
        return int(float(s) * GiB)
    raise InvalidInputError(f"vram_limit must be bytes, GiB or a string like '8GiB', got {v!r}")


class Resident:
    """``none``: all weights on the compute device; a use costs nothing."""

    name = "none"
    #: compute the denoiser's timestep-only state of every step once per use (``prepare``); False: inline
    precompute = True

    def __init__(self, role: str | None = None, **settings: Any):
        self.role, self.settings = role, settings
        self._uses: list[ExitStack] = []  # one per open ``use``, innermost last: what ``prepare`` set up

    def attach(self, loaded: Loaded, *, device: Any, dtype: Any) -> Any:
        m = component_module(loaded.component)
        if m is not None:
            m.to(device=device)
        return loaded.component

    @contextmanager
    def use(self, model: Any) -> Iterator[Any]:
        with self._placed(model) as placed, ExitStack() as this_use:
            self._uses.append(this_use)
            try:
                yield placed
            finally:
                self._uses.pop()

    @contextmanager
    def _placed(self, model: Any) -> Iterator[Any]:
        """The model ready on the compute device for one use (policies that move weights override it)."""
        yield model

    def prepare(self, model: Any, inputs: list[Any], *, timesteps: torch.Tensor) -> None:
        """At the denoiser's first step in a use: its timestep-only state for every step of the call, kept
        until the use ends (inline when ``precompute`` is off or the model does not offer it)."""
        if self.precompute and self._uses and modulation.supported(model):
            self._uses[-1].enter_context(self._precomputed(model, inputs, timesteps))

    @contextmanager
    def _precomputed(self, model: Any, inputs: list[Any], timesteps: torch.Tensor) -> Iterator[None]:
        names = tuple(model.modulation_modules())
        streamer = self._streamer_of(model.modulation_layers())
        if streamer is None:  # the layers are where they compute
            table = modulation.precompute(model, inputs, timesteps, lambda i: nullcontext())
            skipping = nullcontext()
        else:  # each layer's modulation weights brought in once, then left out while denoising
            table = modulation.precompute(model, inputs, timesteps, lambda i: streamer.holding(i, names))
            skipping = streamer.skipping(names)
        with model.precomputed_modulation(table), skipping:
            yield

    def _streamer_of(self, layers: Any) -> Streamer | None:
        """The streamer that moves ``layers``, if this policy streams them."""
        return None


class ComponentOffload(Resident):
    """``offload``: only the component in use sits on the compute device."""

    name = "offload"

    def __init__(
        self, role: str | None = None, offload_device: Any = "cpu", pin_memory: bool = True, **settings
    ):
        super().__init__(role, **settings)
        self.offload_device = torch.device(offload_device)
        self.pin = pin_memory

    def attach(self, loaded: Loaded, *, device: Any, dtype: Any) -> Any:
        self.device = torch.device(device)
        m = component_module(loaded.component)
        if m is not None:
            m.to(self.offload_device)
            if self.pin and self.device.type == "cuda" and self.offload_device.type == "cpu":
                for t in (*m.parameters(), *m.buffers()):
                    t.data = t.data.pin_memory()
        return loaded.component

    @contextmanager
    def _placed(self, model: Any) -> Iterator[Any]:
        m = component_module(model)
        if m is None or self.device == self.offload_device:
            yield model
            return
        kept = {t: t.data for t in (*m.parameters(), *m.buffers())}
        for t, data in kept.items():
            t.data = data.to(self.device, non_blocking=True)
        try:
            yield model
        finally:
            for t, data in kept.items():
                t.data = data  # the pinned host copy is still the source of truth


class LayerStream(Resident):
    """``stream``: repeated layers live on the offload device and are moved in as they run."""

    name = "stream"

    def __init__(self, role: str | None = None, vram_limit: Any = None, offload_device: Any = "cpu",
                 offload_dtype: Any = None, prefetch: bool = True, pin_memory: bool = True, **settings):  # fmt: skip
        super().__init__(role, **settings)
        self.vram_limit = parse_size(vram_limit)
        self.offload_device = torch.device(offload_device)
        self.storage_dtype = parse_dtype(offload_dtype)
        self.prefetch, self.pin = prefetch, pin_memory
        self.streamers: list[Streamer] = []  # one per streamed module

    def attach(self, loaded: Loaded, *, device: Any, dtype: Any) -> Any:
        self.device, self.dtype = torch.device(device), dtype
        m = component_module(loaded.component)
        found = find_layers(m) if m is not None else None
        if found is None:  # nothing repeated to stream: keep the whole component resident
            return super().attach(loaded, device=device, dtype=dtype)
        layers = found[1]
        resident = self._resident_count(m, layers)
        scales: dict[tuple[int, str], torch.Tensor] = {}
        for i in range(resident, len(layers)):
            scales.update({(i, k): v for k, v in self._store(layers[i]).items()})
        self._stream(m, layers, resident, scales)
        return loaded.component

    def _stream(self, m: nn.Module, layers: nn.ModuleList, resident: int, scales: dict) -> None:
        """Everything but the streamed layers to the compute device (resident layers in the compute dtype),
        and the streamer that brings each streamed layer in as it runs."""
        self._place_rest(m, layers)
        for layer in layers[:resident]:
            layer.to(self.device)

        def stored(i: int, want: Callable[[str], bool]) -> dict[str, torch.Tensor]:
            named = (*layers[i].named_parameters(), *layers[i].named_buffers())
            return {k: v.data for k, v in named if want(k)}

        self.streamers.append(
            Streamer(m, layers, self.device, self.dtype, resident, stored, self.prefetch, scales)
        )

    def _place_rest(self, m: nn.Module, layers: nn.ModuleList) -> None:
        inside = {id(t) for t in (*layers.parameters(), *layers.buffers())}
        for t in (*m.parameters(), *m.buffers()):
            if id(t) not in inside:
                t.data = t.data.to(self.device)

    def _resident_count(self, m: nn.Module, layers: nn.ModuleList) -> int:
        """Leading layers that fit under vram_limit next to the rest of the model and two layers in flight."""
        if self.vram_limit is None:
            return 0
        budget = self.vram_limit - (nbytes(m) - nbytes(layers)) - 2 * nbytes(layers[0])  # 2 in flight
        k = 0
        for layer in layers:
            if budget < nbytes(layer):
                break
            budget -= nbytes(layer)
            k += 1
        return k

    @property
    def _eight_bit(self) -> bool:
        return self.storage_dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

    @property
    def _pinned(self) -> bool:
        return self.pin and self.device.type == "cuda" and self.offload_device.type == "cpu"

    def _store(self, layer: nn.Module) -> dict[str, torch.Tensor]:
        """Move a layer to the offload device in the storage dtype; return the per-row scales of weights
        stored in 8 bits (without a scale, small weights would fall into float8's subnormal range)."""
        scales = {}
        for name, t in (*layer.named_parameters(), *layer.named_buffers()):
            if self._eight_bit and t.is_floating_point() and t.ndim >= 2:
                out = torch.empty(t.shape, dtype=self.storage_dtype, device=self.offload_device,
                                  pin_memory=self._pinned)  # fmt: skip
                scales[name] = quantise_rows(t.data, out)
                data = out
            else:
                data = self._offloaded(t.data)
            t.data = data
        return scales

    def _full_width_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Storage dtype of a tensor kept at full width: the storage dtype unless that is 8-bit."""
        if self.storage_dtype is not None and dtype.is_floating_point and not self._eight_bit:
            return self.storage_dtype
        return dtype

    def _offloaded(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor kept at full width, on the offload device."""
        t = t.to(self.offload_device, self._full_width_dtype(t.dtype))
        return t.pin_memory() if self._pinned else t

    @contextmanager
    def _placed(self, model: Any) -> Iterator[Any]:
        try:
            yield model
        finally:  # nothing stays on the device, nothing read ahead outlives the use
            for s in self.streamers:
                s.release()
                s.drain()

    def _streamer_of(self, layers: Any) -> Streamer | None:
        return next((s for s in self.streamers if s.layers is layers), None)


class FP8Storage(LayerStream):
    """``fp8``: layers stored as float8_e4m3fn, cast to the compute dtype as they run. Loaded through the
    policy, the weights are quantised while they are read, one tensor at a time, into one 8-bit buffer
    allocated up front: the float model is never in memory."""

    name = "fp8"

    def __init__(self, role: str | None = None, **settings: Any):
        settings.setdefault("offload_dtype", torch.float8_e4m3fn)
        super().__init__(role, **settings)

    def load(self, build: Callable[[], nn.Module], files: list[Path], *, device: Any = "cpu", dtype: Any = None,
             what: str = "model") -> QuantisedRead | None:  # fmt: skip
        read = read_lazily(build, files, dtype, what)
        if read is None:
            return None
        m, lazy, layers = read.module, read.lazy, read.lazy.layers
        self.device = torch.device(device)
        if dtype is not None:
            layers.to(dtype)  # still on meta: sizes for the resident budget
        resident = self._resident_count(m, layers)
        # every tensor the streamed layers keep (8-bit weights, their scales, full-width small tensors) gets
        # its place before any weight is read: the float temporaries freed in between then leave no holes
        specs: dict[tuple[int, str], tuple[tuple[int, ...], torch.dtype]] = {}
        for i in range(resident, len(layers)):
            for n, p in (*layers[i].named_parameters(), *layers[i].named_buffers()):
                if self._eight_bit and p.is_floating_point() and p.ndim >= 2:
                    specs[(i, n)] = tuple(p.shape), self.storage_dtype
                    specs[(i, n + "#scale")] = (p.shape[0],) + (1,) * (p.ndim - 1), torch.float32
                else:
                    specs[(i, n)] = tuple(p.shape), self._full_width_dtype(p.dtype)
        place = arena(specs, self.offload_device, self._pinned)
        scales: dict[tuple[int, str], torch.Tensor] = {}
        for i in range(len(layers)):
            for name, t in lazy.tensors(i, mapped=False):
                if i < resident:
                    t = t.to(self.device)
                elif (i, name + "#scale") in place:
                    scales[(i, name)] = quantise_rows(t, place[(i, name)], scale=place[(i, name + "#scale")])
                    t = place[(i, name)]
                else:
                    t = place[(i, name)].copy_(t)
                swap(layers[i], name, t)
        return QuantisedRead(m, layers, resident, scales)

    def attach(self, loaded: Loaded, *, device: Any, dtype: Any) -> Any:
        if not loaded.reads:  # read in full (a factory without ``load``): quantise now
            return super().attach(loaded, device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        for r in loaded.reads:
            self._stream(r.module, r.layers, r.resident, r.scales)
        return loaded.component


class Disk(LayerStream):
    """``disk``: layers are read from the safetensors files only while they compute."""

    name = "disk"

    def load(self, build: Callable[[], nn.Module], files: list[Path], *, device: Any = "cpu", dtype: Any = None,
             what: str = "model") -> LazyRead | None:  # fmt: skip
        return read_lazily(build, files, dtype, what)

    def attach(self, loaded: Loaded, *, device: Any, dtype: Any) -> Any:
        if not loaded.reads:  # read in full (a factory without ``load``): stream from host memory
            return super().attach(loaded, device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        for r in loaded.reads:
            self._place_rest(r.module, r.lazy.layers)
            self.streamers.append(
                Streamer(r.module, r.lazy.layers, self.device, dtype, 0, r.lazy.fetch, self.prefetch)
            )
        return loaded.component


def preset(name: str, **overrides: Any) -> Callable[..., Any]:
    """A named bundle of per-role settings (``memory="low-vram"``)."""

    def make(role: str | None = None, **settings: Any) -> Any:
        if name == "low-vram":
            if role == "dit":
                return LayerStream(role, **{"vram_limit": "4GiB", **overrides, **settings})
            return ComponentOffload(role, **settings)
        if name == "lowest-vram":
            if role == "dit":
                return Disk(role, **settings)
            return ComponentOffload(role, **settings)
        raise InvalidInputError(f"unknown memory preset {name!r}")

    return make
