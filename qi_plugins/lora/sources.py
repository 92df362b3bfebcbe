"""Where a LoRA file comes from: a local path, or one file of a hub repository (``ORG/NAME[:file]``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qi_core.errors import MissingComponentError
from qi_core.loading import fetcher, looks_like_hub_id, resolve_model_root, split_source


def fetch_file(model_id: str, file: str, downloader: Any = None, hub: Path | None = None) -> Path:
    """One file of a hub repository (``ORG/NAME``, ``hf:ORG/NAME``, or a local folder), downloaded once;
    ``hub``: a local hub serving it instead (:func:`qi_core.composer.model_hub`)."""

    def fetch(repo: str, local_dir: Path, patterns: list[str]) -> None:
        if (Path(local_dir) / file).is_file():  # already there: no hub call, works offline
            return
        (downloader or fetcher(split_source(model_id)[0]))(repo, local_dir, patterns)

    path = resolve_model_root(model_id, [], downloader=fetch, patterns=[file], hub=hub) / file
    if not path.is_file():
        raise MissingComponentError(f"{file} was not found in {model_id} (looked for {path})")
    return path


def resolve_source(source: Any, hub: Path | None = None) -> Any:
    """A local path stays; ``ORG/NAME`` or ``ORG/NAME:file.safetensors`` (``hf:`` for Hugging Face) is fetched
    (from the local hub ``hub`` when given). Without a file name, ``model.safetensors`` (the file of
    DiffSynth-Studio's LoRA repositories) is taken.
    """
    if not isinstance(source, str) or Path(source).expanduser().exists():
        return source
    prefix = source[:3] if source[:3] in ("hf:", "ms:") else ""
    repo, _, file = source[len(prefix) :].partition(":")
    if not looks_like_hub_id(repo) or repo.endswith(".safetensors"):
        return source  # a missing local file: read_lora names it
    return fetch_file(prefix + repo, file or "model.safetensors", hub=hub)
