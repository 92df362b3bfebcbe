"""DiffSynth-Studio's ``ModelConfig``: one model's files and placement, with the same fields, positional order and
environment variables (``./models/<model_id>/<pattern>`` or ``DIFFSYNTH_MODEL_BASE_PATH``,
``DIFFSYNTH_SKIP_DOWNLOAD``, ``DIFFSYNTH_DOWNLOAD_SOURCE``, ModelScope otherwise).

``qi.compose(components={role: config})`` takes one too: it calls :meth:`ModelConfig.resolve` for the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qi_core.errors import MissingComponentError
from qi_core.loading import Fetch, fetcher

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


class ModelConfig(BaseModel):
    """``ModelConfig(path=...)`` (a file, a list of shard files, or a folder) or ``ModelConfig(model_id=...,
    origin_file_pattern=...)``, plus DiffSynth's per-model VRAM settings (``offload_device="disk"`` …), read
    by the memory policies (:mod:`~qi_plugins.diffsynth_compat.memory`)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    path: str | list[str] | None = None  # local file, shards, or folder
    model_id: str | None = None  # hub id, e.g. "Qwen/Qwen-Image"
    origin_file_pattern: str | list[str] | None = None  # glob inside the repository, e.g. "transformer/"
    download_source: str | None = None  # "modelscope" (default) or "huggingface"
    local_model_path: str | None = None  # where downloads go (default ./models)
    skip_download: bool | None = None  # only use files already on disk
    offload_dtype: Any = None
    offload_device: Any = None
    onload_dtype: Any = None
    onload_device: Any = None
    preparing_dtype: Any = None
    preparing_device: Any = None
    computation_dtype: Any = None
    computation_device: Any = None
    clear_parameters: bool = False  # DiffSynth frees the source tensors after loading; qi always does
    memory: str | None = Field(default=None, description="memory policy name for this model (a qi extension)")

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

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.path is None and self.model_id is None:
            raise ValueError("ModelConfig needs either path= (local files) or model_id= (a hub id)")
        return self

    def resolve(self, downloader: Fetch | None = None) -> list[Path]:
        """Local files of this config, downloading what is missing unless skip_download is set."""
        if self.path is not None:
            paths = [Path(p) for p in ([self.path] if isinstance(self.path, str) else self.path)]
            missing = [str(p) for p in paths if not p.exists()]
            if missing:
                raise MissingComponentError(f"model file(s) not found: {', '.join(missing)}")
            return paths
        pattern = self.origin_file_pattern or "*"
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        patterns = [p + "*" if p.endswith("/") else ("*" if p in ("", "./") else p) for p in patterns]
        base = Path(self.local_model_path or os.environ.get("DIFFSYNTH_MODEL_BASE_PATH", "./models"))
        root = base / str(self.model_id)
        skip = self.skip_download
        if skip is None:
            skip = os.environ.get("DIFFSYNTH_SKIP_DOWNLOAD", "").lower() in ("1", "true", "yes")
        if not skip:
            (downloader or fetcher(self.download_source))(str(self.model_id), root, patterns)
        found = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
        if not found:
            raise MissingComponentError(f"no files match {patterns} in {root} (model_id={self.model_id!r})")
        return found

    def vram_config(self) -> dict[str, Any]:
        """The eight placement settings, as DiffSynth's ``ModelConfig.vram_config()`` returns them."""
        return {k: getattr(self, k) for k in VRAM_FIELDS}

    def files(self, downloader: Fetch | None = None) -> list[Path]:
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

    def folder(self, downloader: Fetch | None = None) -> Path:
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
