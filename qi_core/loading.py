"""Model files: the official folder layout, hub ids fetched by registered sources, and safetensors weights."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qi_core.errors import DownloadError, MissingComponentError, ModelLoadError, WeightMismatchError
from qi_core.plugin_host import host

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


# -- hub ids ---------------------------------------------------------------------------------------------
Fetch = Callable[[str, Path, list[str]], None]
"""``fetch(model_id, local_dir, patterns)``: a source (``qi_register_sources``) downloads the files of the hub
repository ``model_id`` matching the glob ``patterns`` into ``local_dir``."""


def looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def split_source(model: str) -> tuple[str | None, str]:
    """(the registered source whose prefix ``model`` starts with, else None; ``model`` without the prefix):
    ``"hf:Qwen/Qwen-Image"`` → ``("huggingface", "Qwen/Qwen-Image")``."""
    for entry in host().registry.entries("source"):
        prefixes = entry.meta.get("prefixes", ())
        for prefix in (prefixes,) if isinstance(prefixes, str) else prefixes:
            if prefix and model.startswith(prefix):
                return entry.name, model[len(prefix) :]
    return None, model


def fetcher(source: str | None = None) -> Fetch:
    """The ``fetch`` of the registered source ``source``; None: ``QI_DOWNLOAD_SOURCE``, else DiffSynth's
    ``DIFFSYNTH_DOWNLOAD_SOURCE``, else ``modelscope``."""
    env = os.environ.get("QI_DOWNLOAD_SOURCE") or os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE")
    source = source or env or "modelscope"
    reg = host().registry
    if not reg.names("source"):
        raise DownloadError(
            f"no model source is registered to fetch from {source!r}: enable the 'hub' plugin (see `qi plugins`; "
            "is it in QI_DISABLE_PLUGINS?) or pass a local folder"
        )
    try:
        return reg.get("source", source).load()
    except KeyError:  # UnknownNameError
        raise DownloadError(f"unknown download source {source!r}; use one of {reg.names('source')}") from None


def resolve_model_root(model: str | os.PathLike, subfolders: Iterable[str], downloader: Fetch | None = None,
                       cache_dir: str | os.PathLike | None = None, patterns: list[str] | None = None, *,
                       hub: str | os.PathLike | None = None) -> Path:  # fmt: skip
    """A local folder in the official layout for ``model``: a folder as is, else a hub id ``ORG/NAME`` whose
    needed subfolders (or ``patterns``) are fetched by ``downloader``, else by the source its prefix names
    (``hf:``, ``ms:``), else by the default one (:func:`fetcher`). ``hub``: a folder serving every hub id as
    ``hub/ORG/NAME`` instead, nothing downloaded (a tiny model's extra repositories)."""
    s = os.fspath(model)
    if Path(s).expanduser().is_dir():
        return Path(s).expanduser()
    source, s = split_source(s)
    if not looks_like_hub_id(s):
        raise MissingComponentError(
            f"model {os.fspath(model)!r} is neither a folder nor a hub id like 'Qwen/Qwen-Image'; "
            "pass a folder in the official layout (model_index.json, transformer/, vae/, …) or a hub id"
        )
    if hub is not None:
        if not (Path(hub) / s).is_dir():
            raise MissingComponentError(
                f"{s!r} is not in the local hub {hub} (it serves only the repositories written there, and "
                "nothing is downloaded from it); rebuild the tiny model or pass a local file"
            )
        return Path(hub) / s
    base = Path(
        cache_dir or os.environ.get("QI_MODEL_DIR", os.environ.get("DIFFSYNTH_MODEL_BASE_PATH", "./models"))
    )
    if patterns is None:
        patterns = ["model_index.json", *(f"{sub.rstrip('/')}/*" for sub in subfolders)]
    (downloader or fetcher(source))(s, base / s, patterns)
    return base / s


# -- folders and weights ---------------------------------------------------------------------------------
def component_source(value: Any) -> Path | list[Path]:
    """What a user passed for one component: a folder, a file, a list of these, or an object whose
    ``resolve()`` returns its files (e.g. the ``ModelConfig`` of the diffsynth_compat plugin)."""
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _as_list(component_source(v))]
    if not isinstance(value, (str, os.PathLike)) and callable(getattr(value, "resolve", None)):
        files = [Path(f) for f in value.resolve()]
        return files[0] if len(files) == 1 else files
    path = Path(os.fspath(value)).expanduser()
    if not path.exists():
        raise MissingComponentError(f"component weights {os.fspath(value)!r} do not exist")
    return path


def _as_list(v: Path | list[Path]) -> list[Path]:
    return v if isinstance(v, list) else [v]


def component_folder(root: Path, subfolder: str) -> Path:
    folder = root / subfolder
    if not folder.is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise MissingComponentError(
            f"component folder {subfolder!r} is missing in {root} (found: {', '.join(present) or 'nothing'}); "
            "the official layout has transformer/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )
    return folder


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise MissingComponentError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None


def weight_files(folder_or_files: Path | list[Path]) -> list[Path]:
    """Safetensors files of a component: a folder (single file or sharded with an index) or explicit files."""
    if isinstance(folder_or_files, list):
        return folder_or_files
    folder = Path(folder_or_files)
    if folder.is_file():
        return [folder]
    for stem in WEIGHT_STEMS:
        index = folder / f"{stem}.safetensors.index.json"
        if index.exists():
            shards = sorted(set(read_json(index)["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise MissingComponentError(f"{index} lists shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
        single = folder / f"{stem}.safetensors"
        if single.exists():
            return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.ckpt")):
        raise ModelLoadError(f"{folder} holds only pickle checkpoints; qi reads safetensors files only")
    raise MissingComponentError(f"no .safetensors weights in {folder}")


def read_state_dict(files: list[Path], device: str = "cpu") -> dict[str, Any]:
    from safetensors.torch import load_file

    sd: dict[str, Any] = {}
    for f in files:
        try:
            sd.update(load_file(str(f), device=device))
        except (SafetensorsError, OSError) as e:
            raise unreadable_safetensors(f, e) from e
    return sd


# -- checked safetensors ---------------------------------------------------------------------------------
# Every reader goes through ``safetensors_header`` or ``unreadable_safetensors`` (``check_safetensors`` first,
# for readers elsewhere): a truncated file (what an interrupted download leaves) is reported the same way
# everywhere, as a ModelLoadError naming it.
try:
    from safetensors import SafetensorError as SafetensorsError
except ImportError:  # safetensors < 0.4.3 did not export it; its errors are plain Exceptions there
    SafetensorsError = Exception  # type: ignore[misc,assignment]

_REDOWNLOAD = "delete it and download the model again"


def _truncated(file: Path, have: int, want: int) -> ModelLoadError:
    return ModelLoadError(
        f"{file} is truncated ({have:,} of {want:,} bytes), as an interrupted download leaves it; {_REDOWNLOAD}"
    )


def safetensors_header(file: str | os.PathLike) -> tuple[int, dict[str, Any]]:
    """(header length, header) of a complete safetensors file, from its header and size alone; a
    ModelLoadError naming ``file`` when it is not safetensors, is truncated or has bytes after its data."""
    file = Path(file)
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            size = int.from_bytes(head, "little") if len(head) == 8 else -1
            raw = fh.read(size) if 0 < size < 1 << 30 else b""
    except OSError as e:
        raise ModelLoadError(
            f"{file} cannot be read ({e.strerror or e}); check the path and permissions"
        ) from e
    if 0 < size < 1 << 30 and len(raw) < size:
        raise _truncated(file, 8 + len(raw), 8 + size)
    try:
        header = json.loads(raw) if raw else None
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file} is not a safetensors file (unreadable header); {_REDOWNLOAD}")
    try:
        last = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ModelLoadError(f"{file} has a malformed safetensors header; {_REDOWNLOAD}") from None
    want, have = 8 + size + last, file.stat().st_size
    if have < want:
        raise _truncated(file, have, want)
    if have > want:
        raise ModelLoadError(
            f"{file} has {have - want:,} bytes after its last tensor (a corrupt download?); {_REDOWNLOAD}"
        )
    return size, header


def check_safetensors(file: str | os.PathLike) -> None:
    """Raise ModelLoadError naming ``file`` when it is not a complete safetensors file (see
    :func:`safetensors_header`)."""
    safetensors_header(file)


def unreadable_safetensors(file: str | os.PathLike, error: BaseException) -> ModelLoadError:
    """The ModelLoadError for a safetensors reader's ``error`` on ``file``: the header check's diagnosis when
    it finds one (truncated, not safetensors), else the reader's message."""
    try:
        check_safetensors(file)
    except ModelLoadError as e:
        return e
    reason = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the reader wrote
    return ModelLoadError(f"{file} could not be read as safetensors ({reason}); {_REDOWNLOAD}")


def check_state_dict(expected: Mapping[str, Any], found: Mapping[str, Any], what: str,
                     allow_missing: Callable[[str], bool] | None = None) -> None:  # fmt: skip
    """Raise WeightMismatchError naming the key and shapes when ``found`` doesn't fit ``expected``."""
    missing = [k for k in expected if k not in found and not (allow_missing and allow_missing(k))]
    unexpected = [k for k in found if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s), e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s), e.g. {', '.join(unexpected[:3])}")
    for k, v in found.items():
        if k in expected and tuple(v.shape) != tuple(expected[k].shape):
            problems.append(f"{k}: expected shape {tuple(expected[k].shape)}, found {tuple(v.shape)}")
            break
    if problems:
        raise WeightMismatchError(
            f"{what}: " + "; ".join(problems) + " — is this the right checkpoint and config?"
        )


Load = Callable[..., Any]
"""``load(build, files, *, device, dtype, what) -> module``: what a factory calls (through
:func:`load_module`'s ``load=``) to read one module; ``build()`` constructs it, ``files`` hold its weights."""


def load_module(build: Callable[[], Any], files: list[Path], *, device: Any = "cpu", dtype: Any = None,
                what: str = "model", load: Load | None = None) -> Any:  # fmt: skip
    """Build a module without allocating (meta device), check and assign the weights, cast, eval.

    ``load``: the loader a factory was handed (``factory(..., load=)``, see :class:`PolicyLoader`); it reads
    the module instead, so the component's memory policy can (leaving layers on disk, quantising them …).
    """
    import torch

    if load is not None:
        return load(build, files, device=device, dtype=dtype, what=what)
    with torch.device("meta"):
        module = build()
    sd = read_state_dict(files)
    check_state_dict(module.state_dict(), sd, what)
    module.load_state_dict(sd, assign=True, strict=True)
    leftover = [n for n, b in module.named_buffers() if b.is_meta]
    if leftover:
        raise ModelLoadError(f"{what}: buffers {leftover[:3]} were not initialised by the checkpoint")
    if dtype is not None:
        module = module.to(dtype=dtype)
    return module.to(device).eval().requires_grad_(False)


# -- loading through a memory policy ---------------------------------------------------------------------
@dataclass(frozen=True)
class Loaded:
    """What a memory policy's ``attach`` places: the component its factory returned, and what the policy's
    ``load`` returned for each module the factory read through ``load``, in order (empty when it read none:
    a factory that does not take ``load``, or a policy without ``load``)."""

    component: Any
    reads: tuple[Any, ...] = ()


class PolicyLoader:
    """The ``load`` the composer hands a factory for one component: each module is read by the component's
    memory policy (``policy.load(build, files, *, device, dtype, what)`` → an object whose ``module`` is the
    built module, or None to decline), else by :func:`load_module`. What the policy returned is kept, in
    order, in ``reads`` for its ``attach``.

    ``device`` is the compute device the policy will attach the component to; the factory's own ``device``
    (where it wants modules before ``attach``) only applies to modules the policy declines.
    """

    def __init__(self, policy: Any, *, device: Any):
        self.policy, self.device = policy, device
        self.reads: list[Any] = []

    def __call__(self, build: Callable[[], Any], files: list[Path], *, device: Any = "cpu", dtype: Any = None,
                 what: str = "model") -> Any:  # fmt: skip
        read = getattr(self.policy, "load", None)
        got = None if read is None else read(build, files, device=self.device, dtype=dtype, what=what)
        if got is None:
            return load_module(build, files, device=device, dtype=dtype, what=what)
        self.reads.append(got)
        return got.module


def takes_load(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` names a ``load`` parameter (a factory written without it reads its weights in full;
    ``**kwargs`` does not count: it may hand them on to something that does not take ``load``)."""
    import inspect

    try:
        param = inspect.signature(factory).parameters.get("load")
    except (TypeError, ValueError):  # a callable without a signature: call it as before
        return False
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def load_component(factory: Callable[..., Any], policy: Any, *, root: Path, folder: Any, device: Any,
                   dtype: Any) -> Loaded:  # fmt: skip
    """``factory(root=, folder=, device="cpu", dtype=, load=)`` with a :class:`PolicyLoader` for ``policy``
    (``load`` left out for a factory that does not take it), as ``policy.attach`` receives it."""
    loader = PolicyLoader(policy, device=device)
    extra = {"load": loader} if takes_load(factory) else {}
    component = factory(root=root, folder=folder, device="cpu", dtype=dtype, **extra)
    return Loaded(component, tuple(loader.reads))
