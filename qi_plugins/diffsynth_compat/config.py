"""DiffSynth-Studio's ``ModelConfig``, on top of qi's (same fields, same environment variables).

qi's :class:`qi_core.loading.ModelConfig` already resolves ``model_id`` + ``origin_file_pattern`` the DiffSynth
way (``./models/<model_id>/<pattern>`` or ``DIFFSYNTH_MODEL_BASE_PATH``, ``DIFFSYNTH_SKIP_DOWNLOAD``,
``DIFFSYNTH_DOWNLOAD_SOURCE``, ModelScope otherwise). This subclass adds what DiffSynth user code may pass
besides: positional arguments (DiffSynth's is a dataclass) and ``clear_parameters``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qi_core.errors import MissingComponentError
from qi_core.loading import Downloader
from qi_core.loading import ModelConfig as _QiModelConfig

# DiffSynth's dataclass field order, for positional arguments.
_POSITIONAL = (
    "path", "model_id", "origin_file_pattern", "download_source", "local_model_path", "skip_download",
    "offload_device", "offload_dtype", "onload_device", "onload_dtype", "preparing_device", "preparing_dtype",
    "computation_device", "computation_dtype", "clear_parameters",
)  # fmt: skip

VRAM_FIELDS = (
    "offload_device", "offload_dtype", "onload_device", "onload_dtype",
    "preparing_device", "preparing_dtype", "computation_device", "computation_dtype",
)  # fmt: skip


class ModelConfig(_QiModelConfig):
    """``ModelConfig(path=...)`` (a file or a list of shard files) or ``ModelConfig(model_id=...,
    origin_file_pattern=...)``, plus DiffSynth's per-model VRAM settings (``offload_device="disk"`` …)."""

    clear_parameters: bool = False  # DiffSynth frees the source tensors after loading; qi always does

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if len(args) > len(_POSITIONAL):
            raise TypeError(
                f"ModelConfig takes at most {len(_POSITIONAL)} positional arguments, got {len(args)}"
            )
        for name, value in zip(_POSITIONAL, args, strict=False):
            if name in kwargs:
                raise TypeError(f"ModelConfig got two values for {name!r}")
            kwargs[name] = value
        super().__init__(**kwargs)

    def vram_config(self) -> dict[str, Any]:
        """The eight placement settings, as DiffSynth's ``ModelConfig.vram_config()`` returns them."""
        return {k: getattr(self, k) for k in VRAM_FIELDS}

    def files(self, downloader: Downloader | None = None) -> list[Path]:
        """The weight files (``*.safetensors``) this config names, resolved and downloaded if needed."""
        found = self.resolve(downloader)
        out: list[Path] = []
        for p in found:
            if p.is_dir():
                out.extend(sorted(p.glob("*.safetensors")))
            elif p.suffix == ".safetensors":
                out.append(p)
        if not out:
            raise MissingComponentError(
                f"{self.describe()} names no .safetensors file (found: {', '.join(str(p) for p in found[:5])})"
            )
        return out

    def folder(self, downloader: Downloader | None = None) -> Path:
        """The folder this config names (``tokenizer_config``, ``processor_config``: pattern ``"tokenizer/"``)."""
        found = self.resolve(downloader)
        if len(found) == 1 and found[0].is_dir():
            return found[0]
        parents = {p.parent if p.is_file() else p for p in found}
        if len(parents) != 1:
            raise MissingComponentError(
                f"{self.describe()} should name one folder, but its files lie in {len(parents)} folders: "
                f"{', '.join(sorted(str(p) for p in parents)[:3])}"
            )
        return parents.pop()

    def describe(self) -> str:
        if self.path is not None:
            return f"ModelConfig(path={self.path!r})"
        return f"ModelConfig(model_id={self.model_id!r}, origin_file_pattern={self.origin_file_pattern!r})"


def default_tokenizer_config() -> ModelConfig:
    """DiffSynth's default ``tokenizer_config`` (used by its edit examples, which pass only a processor)."""
    return ModelConfig(model_id="Qwen/Qwen-Image", origin_file_pattern="tokenizer/")
