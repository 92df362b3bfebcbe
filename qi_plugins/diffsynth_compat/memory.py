"""DiffSynth's per-model VRAM settings (``ModelConfig(offload_device=..., offload_dtype=..., ...)`` and
``vram_limit``) as qi memory policies, looked up by name in the registry (the memory plugin provides them).

DiffSynth manages a model only when both ``offload_dtype`` and ``offload_device`` are set; then:

==============================================  ===========================================================
DiffSynth settings                              qi policy
==============================================  ===========================================================
``offload_device="disk"`` (or dtype "disk")     ``disk``: layers read from the safetensors files per use
offload dtype float8, another device            ``fp8``: layers stored in float8 (row-scaled), streamed in
offload on another device (CPU), any dtype      ``stream``: layers on the offload device, moved in per use
offload dtype float8, the compute device        ``fp8`` with the compute device as storage
offload on the compute device, same dtype       ``none``
==============================================  ===========================================================

``vram_limit`` (GiB) becomes each streaming policy's budget for layers kept resident. A ``memory="name"``
field on the ModelConfig (a qi extension) picks a policy by name instead.
"""

from __future__ import annotations

from typing import Any

from qi_core.plugin_host import host


def _is_fp8(dtype: Any) -> bool:
    return "float8" in str(dtype)


def _device(v: Any) -> str | None:
    return None if v is None else str(v)


def policy_for(config: Any, role: str, *, device: str, vram_limit: Any) -> Any:
    """A memory policy object for one loaded model (``config``: a DiffSynth-style ModelConfig)."""
    name, settings = policy_name(config, device=device)
    if name in ("disk", "fp8", "stream") and vram_limit is not None:
        settings["vram_limit"] = vram_limit
    return host().registry.get("memory_policy", name).load()(role=role, **settings)


def policy_name(config: Any, *, device: str) -> tuple[str, dict[str, Any]]:
    """(registered policy name, settings) for a ModelConfig's VRAM fields; see the module table."""
    if getattr(config, "memory", None):
        return config.memory, {}
    off_dev, off_dtype = _device(config.offload_device), config.offload_dtype
    if off_dev is None or off_dtype is None:
        return "none", {}
    if off_dev == "disk" or off_dtype == "disk":
        return "disk", {}
    compute = _device(config.computation_device) or str(device)
    same_device = off_dev.split(":")[0] == compute.split(":")[0]
    if _is_fp8(off_dtype):
        return "fp8", {"offload_device": compute if same_device else off_dev}
    if same_device:
        return "none", {}
    return "stream", {"offload_device": off_dev, "offload_dtype": off_dtype}
