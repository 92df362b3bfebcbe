"""Memory policies: where each model's weights live between uses, and how they reach the compute device.

* ``none``     — everything resident on the compute device.
* ``offload``  — the whole component lives on the offload device (CPU, pinned) and moves in for each use.
* ``stream``   — the repeated layers (the largest ``nn.ModuleList``) stay on the offload device, optionally in a
                 storage dtype (fp8/bf16); a prefix of them stays resident while under ``vram_limit``; the rest
                 are moved in per forward, the next one prefetched on a side CUDA stream.
* ``disk``     — like ``stream`` but the layers are read lazily from the safetensors files (memory-mapped,
                 opened per layer, never the whole file in RAM), the next layer read ahead in a thread.
* ``fp8``      — ``stream`` with float8_e4m3fn storage and computation in the pipeline dtype.

A streamed model also lets the pipeline precompute the timestep-only adaLN modulation once per call, so the
modulation weights (a third of the DiT) are never moved during denoising.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qi_core.errors import InvalidInputError
from qi_core.loading import StoredTensor
from qi_core.protocols import component_module

GiB = 1024**3


def as_module(model: Any) -> nn.Module | None:
    """The nn.Module behind a component (wrappers such as the text encoder keep theirs in ``.model``)."""
    return component_module(model)


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


def _dtype(v: Any) -> torch.dtype | None:
    if v is None or isinstance(v, torch.dtype):
        return v
    try:
        return {"float8_e4m3fn": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[str(v)]  # fmt: skip
    except KeyError:
        raise InvalidInputError(
            f"unknown dtype {v!r}; use float32, bfloat16, float16 or float8_e4m3fn"
        ) from None


class Resident:
    """``none``: all weights on the compute device; a use costs nothing."""

    name = "none"
    # the modulation of every step once for both CFG sides, whatever the placement
    wants_step_cache = True

    def __init__(self, role: str | None = None, **settings: Any):
        self.role, self.settings = role, settings

    def attach(self, model: Any, *, device: Any, dtype: Any) -> Any:
        m = as_module(model)
        if m is not None:
            m.to(device=device)
        return model

    @contextmanager
    def use(self, model: Any) -> Iterator[Any]:
        yield model

    def skip_parameters(self, names: set[str]) -> None:
        """Resident weights never move, so there is nothing to skip."""


class ComponentOffload(Resident):
    """``offload``: only the component in use sits on the compute device."""

    name = "offload"

    def __init__(
        self, role: str | None = None, offload_device: Any = "cpu", pin_memory: bool = True, **settings
    ):
        super().__init__(role, **settings)
        self.offload_device = torch.device(offload_device)
        self.pin = pin_memory

    def attach(self, model: Any, *, device: Any, dtype: Any) -> Any:
        self.device = torch.device(device)
        m = as_module(model)
        if m is not None:
            m.to(self.offload_device)
            if self.pin and self.device.type == "cuda" and self.offload_device.type == "cpu":
                for t in (*m.parameters(), *m.buffers()):
                    t.data = t.data.pin_memory()
        return model

    @contextmanager
    def use(self, model: Any) -> Iterator[Any]:
        m = as_module(model)
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


class _Streamer:
    """Moves one ModuleList's layers to the compute device around each layer's forward."""

    def __init__(self, layers: nn.ModuleList, device: torch.device, dtype: torch.dtype, resident: int,
                 fetch: Callable[[int], dict[str, torch.Tensor]], prefetch: bool):  # fmt: skip
        self.layers, self.device, self.dtype = layers, device, dtype
        self.resident = resident  # layers [0, resident) stay on the device
        self.fetch = fetch  # i -> {param name: tensor on its storage device/dtype}
        self.skip: set[str] = set()  # parameter names not needed in forward (precomputed modulation)
        self.scales: dict[tuple[int, str], torch.Tensor] = {}  # per-row scales of fp8-stored weights
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda and prefetch else None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="qi-prefetch") if prefetch else None
        self.pending: dict[int, tuple[Future | None, Any]] = {}
        self.lock = threading.Lock()
        self.handles = []
        for i, layer in enumerate(layers):
            if i >= resident:
                self.handles.append(layer.register_forward_pre_hook(self._pre(i)))
                self.handles.append(layer.register_forward_hook(self._post(i)))

    def _load(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors on the compute device in the compute dtype (on the side stream when prefetching)."""
        src = self.fetch(i)
        ctx = torch.cuda.stream(self.stream) if self.stream is not None else _null()
        with ctx:
            out = {}
            for k, t in src.items():
                if k in self.skip:
                    continue
                dt = self.dtype if t.is_floating_point() else t.dtype
                x = t.to(self.device, non_blocking=True).to(dt)
                scale = self.scales.get((i, k))
                if scale is not None:
                    s = scale.to(self.device, dt, non_blocking=True)
                    x = x.mul_(s) if x is not t else x * s  # in place, never on the stored tensor itself
                out[k] = x
            event = torch.cuda.Event() if self.stream is not None else None
            if event is not None:
                event.record(self.stream)
        return out if event is None else (out, event)

    def _start(self, i: int) -> None:
        if i >= len(self.layers) or i < self.resident or i in self.pending:
            return
        if self.pool is not None:
            self.pending[i] = (self.pool.submit(self._load, i), None)

    def _take(self, i: int) -> dict[str, torch.Tensor]:
        fut = self.pending.pop(i, (None, None))[0]
        got = fut.result() if fut is not None else self._load(i)
        if isinstance(got, tuple):
            got, event = got
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in got.values():
                t.record_stream(current)  # allocated on the side stream, used and freed on this one
        return got

    def drain(self) -> None:
        """Forget read-ahead layers (the weights may change before the next use)."""
        for fut, _ in self.pending.values():
            if fut is not None:
                fut.result()
        self.pending.clear()

    def _pre(self, i: int):
        def hook(module: nn.Module, args: Any) -> None:
            self._start(i)
            module._qi_kept = {k: _swap(module, k, t) for k, t in self._take(i).items()}
            nxt = i + 1 if i + 1 < len(self.layers) else self.resident
            self._start(nxt)  # read ahead while this layer computes (wraps to the first streamed layer)

        return hook

    def _post(self, i: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            for k, old in module._qi_kept.items():
                _swap(module, k, old)
            module._qi_kept = {}

        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        if self.pool is not None:
            self.pool.shutdown(wait=True)


def _swap(module: nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
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


@contextmanager
def _null():
    yield


class LayerStream(Resident):
    """``stream``: repeated layers live on the offload device and are moved in per forward."""

    name = "stream"

    def __init__(self, role: str | None = None, vram_limit: Any = None, offload_device: Any = "cpu",
                 offload_dtype: Any = None, prefetch: bool = True, pin_memory: bool = True, **settings):  # fmt: skip
        super().__init__(role, **settings)
        self.vram_limit = parse_size(vram_limit)
        self.offload_device = torch.device(offload_device)
        self.storage_dtype = _dtype(offload_dtype)
        self.prefetch, self.pin = prefetch, pin_memory
        self.streamer: _Streamer | None = None

    def attach(self, model: Any, *, device: Any, dtype: Any) -> Any:
        self.device, self.dtype = torch.device(device), dtype
        m = as_module(model)
        found = find_layers(m) if m is not None else None
        if found is None:  # nothing repeated to stream: keep the whole component resident
            return super().attach(model, device=device, dtype=dtype)
        name, layers = found
        resident = self._resident_count(m, layers)
        scales: dict[tuple[int, str], torch.Tensor] = {}
        for i in range(resident, len(layers)):
            scales.update({(i, k): v for k, v in self._store(layers[i]).items()})
        return self._stream(model, layers, resident, scales)

    def _stream(self, model: Any, layers: nn.ModuleList, resident: int, scales: dict) -> Any:
        """Everything but the streamed layers to the compute device (resident layers in the compute dtype),
        and the hooks that bring each streamed layer in around its forward."""
        self._place_rest(as_module(model), layers)
        for layer in layers[:resident]:
            layer.to(self.device)

        def fetch(i: int) -> dict[str, torch.Tensor]:
            return {k: v.data for k, v in (*layers[i].named_parameters(), *layers[i].named_buffers())}

        self.streamer = _Streamer(layers, self.device, self.dtype, resident, fetch, self.prefetch)
        self.streamer.scales = scales
        return model

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
    def use(self, model: Any) -> Iterator[Any]:
        try:
            yield model
        finally:
            if self.streamer is not None:
                self.streamer.drain()

    def skip_parameters(self, names: set[str]) -> None:
        """Per-layer parameter names the forward no longer needs (precomputed modulation)."""
        if self.streamer is not None:
            self.streamer.skip = set(names)


def _arena(specs: dict[Any, tuple[tuple[int, ...], torch.dtype]], device: torch.device, pin: bool) -> dict:
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


class FP8Storage(LayerStream):
    """``fp8``: layers stored as float8_e4m3fn, cast to the compute dtype per forward. Loaded through the
    policy, the weights are quantised while they are read, one tensor at a time, into one 8-bit buffer
    allocated up front: the float model is never in memory."""

    name = "fp8"

    def __init__(self, role: str | None = None, **settings: Any):
        settings.setdefault("offload_dtype", torch.float8_e4m3fn)
        super().__init__(role, **settings)

    def load(self, build: Callable[[], nn.Module], files: list[Path], *, device: Any = "cpu", dtype: Any = None,
             what: str = "model") -> nn.Module | None:  # fmt: skip
        m = read_lazily(build, files, dtype, what)
        if m is None:
            return None
        lazy: LazyLayers = m.__dict__.pop("_qi_disk")
        layers = lazy.layers
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
        place = _arena(specs, self.offload_device, self._pinned)
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
                _swap(layers[i], name, t)
        m._qi_fp8 = (resident, scales)
        return m

    def attach(self, model: Any, *, device: Any, dtype: Any) -> Any:
        m = as_module(model)
        loaded = m.__dict__.pop("_qi_fp8", None) if m is not None else None
        if loaded is None:  # loaded in full by the default loader: quantise now
            return super().attach(model, device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        return self._stream(model, find_layers(m)[1], *loaded)


class Disk(LayerStream):
    """``disk``: layers are read from the safetensors files only while they compute."""

    name = "disk"

    def load(self, build: Callable[[], nn.Module], files: list[Path], *, device: Any = "cpu", dtype: Any = None,
             what: str = "model") -> nn.Module | None:  # fmt: skip
        return read_lazily(build, files, dtype, what)

    def attach(self, model: Any, *, device: Any, dtype: Any) -> Any:
        m = as_module(model)
        lazy = getattr(m, "_qi_disk", None) if m is not None else None
        if lazy is None:
            return super().attach(model, device=device, dtype=dtype)
        self.device, self.dtype = torch.device(device), dtype
        self._place_rest(m, lazy.layers)
        self.streamer = _Streamer(lazy.layers, self.device, dtype, 0, lazy.fetch, self.prefetch)
        return model


def read_lazily(build: Callable[[], nn.Module], files: list[Path], dtype: Any, what: str) -> nn.Module | None:
    """The module with everything but its repeated layers read from ``files``; ``module._qi_disk`` is the
    :class:`LazyLayers` that reads them on demand. None: nothing repeated."""
    from qi_core.loading import check_state_dict, safetensors_index

    with torch.device("meta"):
        module = build()
    found = find_layers(module)
    if found is None:
        return None  # nothing to stream: the default loader reads it whole
    prefix, layers = found
    where: dict[str, StoredTensor] = {}
    for f in files:
        where.update(safetensors_index(Path(f)))
    check_state_dict(module.state_dict(), where, what)
    lazy = LazyLayers(layers, prefix + ".", where, dtype)
    rest = [k for k in where if not k.startswith(lazy.prefix)]
    module.load_state_dict(dict(lazy.read(rest)), strict=False, assign=True)
    module._qi_disk = lazy
    return module.eval().requires_grad_(False)


class LazyLayers:
    """Reads layer i's tensors (``<prefix>i.*``) from the safetensors files, in ``dtype``, when asked."""

    def __init__(self, layers: nn.ModuleList, prefix: str, where: dict[str, StoredTensor], dtype: Any):
        self.layers, self.prefix, self.where, self.dtype = layers, prefix, where, dtype

    def read(self, keys: list[str], mapped: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor in ``dtype``), one at a time, in file order. ``mapped``: through a mapping of the file
        that is dropped right after (the tensors are exactly what the default loader gives); otherwise plain
        file reads into fresh memory (nothing of the file stays mapped while a model is being converted)."""
        from safetensors import safe_open

        from qi_core.loading import read_tensor

        order = sorted(keys, key=lambda k: (str(self.where[k].file), self.where[k].start))
        for f in dict.fromkeys(self.where[k].file for k in order):
            opened = safe_open(str(f), "pt") if mapped else open(f, "rb")  # noqa: SIM115
            with opened as fh:
                for k in (k for k in order if self.where[k].file == f):
                    t = fh.get_tensor(k) if mapped else read_tensor(fh, self.where[k])
                    yield k, t.to(self.dtype) if self.dtype is not None and t.is_floating_point() else t

    def tensors(self, i: int, mapped: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """Layer i's (name within the layer, tensor), one at a time."""
        head = f"{self.prefix}{i}."
        for k, t in self.read([k for k in self.where if k.startswith(head)], mapped):
            yield k[len(head) :], t

    def fetch(self, i: int) -> dict[str, torch.Tensor]:
        return dict(self.tensors(i))


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
