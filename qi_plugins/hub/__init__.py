"""Model sources: the hubs a hub id (``ORG/NAME``) is fetched from, ModelScope (``ms:``, the default) and
Hugging Face (``hf:``). Their clients are the optional ``qi[hub]`` dependencies, imported on first download.

    QI_DOWNLOAD_SOURCE=huggingface qi generate "a fox" --model Qwen/Qwen-Image   # or --model hf:Qwen/Qwen-Image

The core picks the source (:func:`qi_core.loading.resolve_model_root`); see ``qi_register_sources`` in
``docs/hooks.md`` to add another one.
"""

from __future__ import annotations

from pathlib import Path

from qi_core.errors import DownloadError
from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = ()


def _download(hub: str, package: str, what: str, call) -> None:
    """Run ``call(snapshot_download)`` with the hub client's ``snapshot_download``; typed errors otherwise."""
    import importlib

    try:
        snapshot_download = importlib.import_module(package).snapshot_download
    except ImportError as e:
        raise DownloadError(
            f"downloading from {hub} needs the {package} package: pip install 'qi[hub]'"
        ) from e
    try:
        call(snapshot_download)
    except Exception as e:
        raise DownloadError(f"{hub} download of {what} failed: {e}") from e


def modelscope(model_id: str, local_dir: Path, patterns: list[str]) -> None:
    _download("ModelScope", "modelscope", f"{model_id!r} ({patterns})",
              lambda get: get(model_id, local_dir=str(local_dir), allow_file_pattern=patterns))  # fmt: skip


def huggingface(model_id: str, local_dir: Path, patterns: list[str]) -> None:
    _download("Hugging Face", "huggingface_hub", f"{model_id!r} ({patterns})",
              lambda get: get(model_id, local_dir=str(local_dir), allow_patterns=patterns))  # fmt: skip


@hookimpl
def qi_register_sources(register):
    register("modelscope", modelscope, prefixes=("ms:",))
    register("huggingface", huggingface, prefixes=("hf:",))
