"""Safetensors files read lazily: where each tensor lies (from the header alone) and one tensor read with
plain file reads, so the ``disk`` policy keeps layers in the files and maps nothing while converting them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qi_core.errors import ModelLoadError
from qi_core.loading import safetensors_header

_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of its data
    nbytes: int


def safetensors_index(file: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, from its header alone (nothing mapped, no data read); a truncated
    file fails now, not when a lazily read layer reaches the missing bytes mid-generation."""
    size, header = safetensors_header(file)
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        if v.get("dtype") not in _ST_DTYPES:
            raise ModelLoadError(f"{file}: tensor {k} has unsupported dtype {v.get('dtype')!r}")
        b, e = v["data_offsets"]
        out[k] = StoredTensor(Path(file), getattr(torch, _ST_DTYPES[v["dtype"]]), tuple(v["shape"]), 8 + size + b,
                              e - b)  # fmt: skip
    return out


def read_tensor(fh: Any, entry: StoredTensor) -> torch.Tensor:
    """One tensor read from the open file ``fh`` into fresh memory with plain reads: no mapping of the file,
    so only the tensor itself counts towards the process's memory."""
    t = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        fh.seek(entry.start)
        view = t.view(-1).view(torch.uint8).numpy()
        if fh.readinto(view) != entry.nbytes:
            raise ModelLoadError(
                f"{entry.file}: truncated tensor data at byte {entry.start} (an interrupted download?); "
                "delete it and download the model again"
            )
    return t
