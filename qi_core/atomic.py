"""Writes that never leave a half-written file or folder: build beside the target, then rename onto it.

What they publish gets the modes the process umask gives (0644 files / 0755 folders under the usual umask
022), like a plain ``open(path, "w")`` or ``mkdir``. The temporaries are private while incomplete
(``mkstemp`` makes 0600 files, ``mkdtemp`` 0700 folders, and so does safetensors' own ``save_file``), and
those modes would survive the rename, so they are set from the umask just before it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qi_core.errors import InvalidInputError, OutputPathError

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, e.g. ``0o022``.

    Linux reports it in ``/proc/self/status``. Elsewhere the only way to read it is to set it
    (``os.umask``) and set it back; in between, files that other threads create get the temporary value, so
    that value is the strict 0o077 (never 0: no world-writable file), and a lock keeps two qi readers from
    restoring each other's temporary value."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o077)
        os.umask(old)
    return old


def _umask_modes(root: Path, umask: int) -> None:
    """Give ``root`` and everything under it the modes a plain create would: 0777 / 0666 minus the umask
    (executable files keep an execute bit). Symbolic links are left alone."""
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~umask)
        for name in files:
            f = os.path.join(folder, name)
            if not os.path.islink(f):
                executable = os.stat(f).st_mode & 0o111
                os.chmod(f, (0o777 if executable else 0o666) & ~umask)


@contextmanager
def atomic_file(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; when the block succeeds it replaces ``path``, when it
    fails it is removed. The file gets ``mode`` if given, else the umask's (0644 under umask 022)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode if mode is not None else 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:  # fmt: skip
    """``tensors`` (moved to the CPU, made contiguous) as a safetensors file, written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata if metadata is not None else {"format": "pt"})  # fmt: skip
    return path


@contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; when the block succeeds it replaces ``path``.

    A non-empty ``path`` is an error unless ``overwrite``. The folder and everything written into it get the
    umask's modes (0755 folders / 0644 files under umask 022), whatever modes the writers used."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InvalidInputError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield tmp
        _umask_modes(tmp, current_umask())
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- checks before the work ------------------------------------------------------------------------------
def check_writable_parent(path: str | os.PathLike, what: str = "output") -> Path:
    """``path`` as a Path, or OutputPathError when its folder cannot be created or written.

    Folders that don't exist yet are created by the writers above, so the closest existing one decides.
    ``os.access`` asks the kernel, so a read-only mount is caught too, even for root."""
    path = Path(os.fspath(path)).expanduser()
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputPathError(
            f"cannot write {what} {os.fspath(path)!r}: {folder} is a file, not a folder; choose another location"
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(
            f"cannot write {what} {os.fspath(path)!r}: folder {folder} is read-only or not writable by you; "
            "choose a writable location"
        )
    return path


def check_output_file(path: str | os.PathLike, suffixes: tuple[str, ...] = (), what: str = "output") -> Path:
    """``path`` as a Path if a file can be written there (not a folder, one of ``suffixes``, writable folder),
    else OutputPathError saying how to fix it. Run it before the work, so a bad path fails in a second."""
    path = Path(os.fspath(path)).expanduser()
    if path.is_dir():
        example = path / f"out{suffixes[0] if suffixes else ''}"
        raise OutputPathError(f"{what} {os.fspath(path)!r} is a folder; name a file in it, e.g. {example}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputPathError(
            f"{what} {path.name!r} must end in {' or '.join(suffixes)}; e.g. {path.with_suffix(suffixes[0])}"
        )
    return check_writable_parent(path, what)
