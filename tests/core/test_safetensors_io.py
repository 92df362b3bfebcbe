"""The memory plugin's header index and unmapped tensor reads against the safetensors library."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from qi_core.errors import ModelLoadError
from qi_plugins.memory.safetensors_io import read_tensor, safetensors_index


def test_index_and_reads_match_the_library(tmp_path):
    f = tmp_path / "w.safetensors"
    tensors = {
        "a.weight": torch.randn(5, 7),
        "b": torch.randn(3, 2).to(torch.bfloat16),
        "c": torch.randn(4).to(torch.float16),
        "d": torch.arange(6, dtype=torch.int64).view(2, 3),
        "e": torch.tensor(2.5),
        "f": torch.randn(2, 8).to(torch.float8_e4m3fn),
        "g": torch.zeros(0, 3),
    }
    save_file(tensors, str(f), metadata={"format": "pt"})
    index = safetensors_index(f)
    assert set(index) == set(tensors)
    want = load_file(str(f))
    with open(f, "rb") as fh:
        for k, entry in index.items():
            got = read_tensor(fh, entry)
            assert got.dtype == want[k].dtype and got.shape == want[k].shape, k
            raw = lambda t: t.reshape(-1).view(torch.uint8)  # noqa: E731 - bitwise, any dtype
            assert torch.equal(raw(got), raw(want[k])), k


def test_bad_files_are_typed_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ModelLoadError, match="not a safetensors file"):
        safetensors_index(junk)
    f = tmp_path / "w.safetensors"
    save_file({"x": torch.randn(64, 64)}, str(f))
    entry = safetensors_index(f)["x"]
    f.write_bytes(f.read_bytes()[: entry.start + 100])  # cut inside the tensor's data
    with open(f, "rb") as fh, pytest.raises(ModelLoadError, match="truncated"):
        read_tensor(fh, entry)
