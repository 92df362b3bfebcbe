"""Model files: the official folder layout, safetensors weights, hub ids, and the seed's ModelConfig."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qi_core.errors import DownloadError, MissingComponentError, ModelLoadError, WeightMismatchError

WEIGHT_STEMS = ("diffusion_pytorch_model", "model")


class ModelConfig(BaseModel):
    """One model's files and placement, mirroring the seed's ``ModelConfig``.

    Either ``path`` (a file, a list of shard files, or a folder) or ``model_id`` (+ ``origin_file_pattern``).
    The ``*_dtype`` / ``*_device`` fields are read by memory policies.
    """

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
    memory: str | None = Field(default=None, description="memory policy name for this model")

    @model_validator(mode="after")
    def _one_source(self) -> ModelConfig:
        if self.path is None and self.model_id is None:
            raise ValueError("ModelConfig needs either path= (local files) or model_id= (a hub id)")
        return self

    def resolve(self, downloader: Downloader | None = None) -> list[Path]:
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
            (downloader or get_downloader(download_source(self.download_source)))(
                str(self.model_id), root, patterns
            )
        found = sorted({p for pat in patterns for p in root.glob(pat) if p.is_file()})
        if not found:
            raise MissingComponentError(f"no files match {patterns} in {root} (model_id={self.model_id!r})")
        return found


# -- hubs ------------------------------------------------------------------------------------------------
Downloader = Callable[[str, Path, list[str]], None]
"""``download(model_id, local_dir, allow_patterns)`` fetches the matching files into ``local_dir``."""


def _modelscope(model_id: str, local_dir: Path, patterns: list[str]) -> None:
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


def _huggingface(model_id: str, local_dir: Path, patterns: list[str]) -> None:
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


DOWNLOADERS: dict[str, Downloader] = {"modelscope": _modelscope, "huggingface": _huggingface}


def download_source(explicit: str | None = None) -> str:
    """Where hub ids are fetched from: ``explicit``, else ``QI_DOWNLOAD_SOURCE``, else DiffSynth's
    ``DIFFSYNTH_DOWNLOAD_SOURCE``, else ModelScope."""
    env = os.environ.get("QI_DOWNLOAD_SOURCE") or os.environ.get("DIFFSYNTH_DOWNLOAD_SOURCE")
    return explicit or env or "modelscope"


def get_downloader(source: str) -> Downloader:
    try:
        return DOWNLOADERS[source]
    except KeyError:
        raise DownloadError(f"unknown download source {source!r}; use one of {sorted(DOWNLOADERS)}") from None


def looks_like_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~"))


def resolve_model_root(model: str | os.PathLike, subfolders: Iterable[str], downloader: Downloader | None = None,
                       cache_dir: str | os.PathLike | None = None, patterns: list[str] | None = None) -> Path:  # fmt: skip
    """A local folder in the official layout for ``model`` (a folder, or a hub id downloaded on demand).

    ``hf:ORG/NAME`` forces Hugging Face, ``ms:ORG/NAME`` ModelScope; a bare ``ORG/NAME`` uses
    ``QI_DOWNLOAD_SOURCE`` (default modelscope). Only the needed subfolders are fetched.
    """
    s = os.fspath(model)
    if Path(s).expanduser().is_dir():
        return Path(s).expanduser()
    source = download_source()
    for prefix, src in (("hf:", "huggingface"), ("ms:", "modelscope")):
        if s.startswith(prefix):
            s, source = s[len(prefix) :], src
    if not looks_like_hub_id(s):
        raise MissingComponentError(
            f"model {os.fspath(model)!r} is neither a folder nor a hub id like 'Qwen/Qwen-Image'; "
            "pass a folder in the official layout (model_index.json, transformer/, vae/, …) or a hub id"
        )
    hub = _LOCAL_HUB.get()
    if hub is not None:
        return _from_local_hub(hub, s)
    base = Path(
        cache_dir or os.environ.get("QI_MODEL_DIR", os.environ.get("DIFFSYNTH_MODEL_BASE_PATH", "./models"))
    )
    root = base / s
    if patterns is None:
        patterns = ["model_index.json", *(f"{sub.rstrip('/')}/*" for sub in subfolders)]
    (downloader or get_downloader(source))(s, root, patterns)
    return root


_LOCAL_HUB: ContextVar[Path | None] = ContextVar("qi_local_hub", default=None)


@contextmanager
def local_hub(folder: str | os.PathLike):
    """While active, :func:`resolve_model_root` serves every hub id ``ORG/NAME`` from ``folder/ORG/NAME`` and
    downloads nothing (``compose(model="tiny")``: the tiny builder writes the repositories its recipe names)."""
    token = _LOCAL_HUB.set(Path(folder))
    try:
        yield
    finally:
        _LOCAL_HUB.reset(token)


def _from_local_hub(hub: Path, model_id: str) -> Path:
    root = hub / model_id
    if not root.is_dir():
        raise MissingComponentError(
            f"{model_id!r} is not in the local hub {hub} (it serves only the repositories written there, "
            "and nothing is downloaded while it is active); rebuild the tiny model or pass a local file"
        )
    return root


# -- folders and weights ---------------------------------------------------------------------------------
def component_source(value: Any, downloader: Downloader | None = None) -> Path | list[Path]:
    """What a user passed for one component: a folder, a file, a list of files, or a ModelConfig."""
    if isinstance(value, ModelConfig):
        files = value.resolve(downloader)
        return files[0] if len(files) == 1 else files
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in _as_list(component_source(v, downloader))]
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
# The readers here (``read_state_dict``, ``safetensors_index``) go through ``_header`` or
# ``unreadable_safetensors``, and other readers can call ``check_safetensors`` first: a truncated file (what
# an interrupted download leaves) is then reported the same way everywhere, as a ModelLoadError naming it.
try:
    from safetensors import SafetensorError as SafetensorsError
except ImportError:  # safetensors < 0.4.3 did not export it; its errors are plain Exceptions there
    SafetensorsError = Exception  # type: ignore[misc,assignment]

_REDOWNLOAD = "delete it and download the model again"


def _truncated(file: Path, have: int, want: int) -> ModelLoadError:
    return ModelLoadError(
        f"{file} is truncated ({have:,} of {want:,} bytes), as an interrupted download leaves it; {_REDOWNLOAD}"
    )


def _header(file: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header) of a safetensors file, or ModelLoadError naming the file."""
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
    return size, header


def _data_end(file: Path, size: int, header: dict[str, Any]) -> int:
    """The file length the header promises: 8 + header + the end of the last tensor's data."""
    try:
        last = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ModelLoadError(f"{file} has a malformed safetensors header; {_REDOWNLOAD}") from None
    return 8 + size + last


def check_safetensors(file: str | os.PathLike) -> None:
    """Raise ModelLoadError naming ``file`` when it is not a complete safetensors file (truncated by an
    interrupted download, or not safetensors at all). Reads only the header and the file size."""
    file = Path(file)
    size, header = _header(file)
    want, have = _data_end(file, size, header), file.stat().st_size
    if have < want:
        raise _truncated(file, have, want)
    if have > want:
        raise ModelLoadError(
            f"{file} has {have - want:,} bytes after its last tensor (a corrupt download?); {_REDOWNLOAD}"
        )


def unreadable_safetensors(file: str | os.PathLike, error: BaseException) -> ModelLoadError:
    """The ModelLoadError for a safetensors reader's ``error`` on ``file``: the header check's diagnosis when
    it finds one (truncated, not safetensors), else the reader's message."""
    try:
        check_safetensors(file)
    except ModelLoadError as e:
        return e
    reason = " ".join(str(error).split()) or type(error).__name__  # one line, whatever the reader wrote
    return ModelLoadError(f"{file} could not be read as safetensors ({reason}); {_REDOWNLOAD}")


_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}  # fmt: skip


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file."""

    file: Path
    dtype: Any  # torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset of its data
    nbytes: int


def safetensors_index(file: Path) -> dict[str, StoredTensor]:
    """Every tensor of a safetensors file, from its header alone (nothing mapped, no data read)."""
    import torch

    size, header = _header(Path(file))
    want, have = _data_end(Path(file), size, header), Path(file).stat().st_size
    if have < want:  # found now, not when a lazily read layer reaches the missing bytes mid-generation
        raise _truncated(Path(file), have, want)
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


def read_tensor(fh: Any, entry: StoredTensor) -> Any:
    """One tensor read from the open file ``fh`` into fresh memory with plain reads: no mapping of the file,
    so only the tensor itself counts towards the process's memory."""
    import torch

    t = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        fh.seek(entry.start)
        view = t.view(-1).view(torch.uint8).numpy()
        if fh.readinto(view) != entry.nbytes:
            raise ModelLoadError(
                f"{entry.file}: truncated tensor data at byte {entry.start} (an interrupted download?); "
                f"{_REDOWNLOAD}"
            )
    return t


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
