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


def modelscope(model_id: str, local_dir: Path, patterns: list[str]) -> None:
    try:
        from modelscope import snapshot_download
    except ImportError as e:
        raise DownloadError(
            "downloading from ModelScope needs the modelscope package: pip install 'qi[hub]'"
        ) from e
    try:
        snapshot_download(model_id, local_dir=str(local_dir), allow_file_pattern=patterns)
    except Exception as e:
        raise DownloadError(f"ModelScope download of {model_id!r} ({patterns}) failed: {e}") from e


def huggingface(model_id: str, local_dir: Path, patterns: list[str]) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise DownloadError(
            "downloading from Hugging Face needs huggingface_hub: pip install 'qi[hub]'"
        ) from e
    try:
        snapshot_download(model_id, local_dir=str(local_dir), allow_patterns=patterns)
    except Exception as e:
        raise DownloadError(f"Hugging Face download of {model_id!r} ({patterns}) failed: {e}") from e


@hookimpl
def qi_register_sources(register):
    register("modelscope", modelscope, prefixes=("ms:",))
    register("huggingface", huggingface, prefixes=("hf:",))
