"""LoRAs a request may name: files ``DIR/NAME.safetensors`` of the server's ``--lora-dir``, by name only (no
paths, no traversal, no links leading out of the folder)."""

from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qi_core.errors import InvalidInputError
from qi_plugins.doors.outputs import sha256

#: A LoRA name: a file name without its suffix; no separators, no leading dot.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SUFFIX = ".safetensors"


def invalid(message: str, param: str | None) -> InvalidInputError:
    """An InvalidInputError naming the request field ``param``."""
    e = InvalidInputError(message)
    e.param = param
    return e


@dataclass(frozen=True)
class LoraChoice:
    """A LoRA a request asked for: its name, file and strength."""

    name: str
    path: Path
    scale: float


class LoraFolder:
    """The server's LoRA folder: names → files, and their SHA-256 (computed once per file version)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).resolve()
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """The LoRAs a request can name."""
        return sorted(p.name[: -len(SUFFIX)] for p in self.folder.glob(f"*{SUFFIX}") if self._inside(p))

    def path(self, name: Any, param: str) -> Path:
        """The file of LoRA ``name``, or InvalidInputError naming ``param``."""
        if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
            raise invalid(
                f"{param} must be the name of a LoRA of this server (letters, digits, '_', '-', '.'; no path and "
                f"no {SUFFIX} suffix), got {name!r}",
                param,
            )
        path = self.folder / f"{name}{SUFFIX}"
        if not self._inside(path):
            known = ", ".join(self.names()) or "none"
            raise invalid(f"{param}: this server has no LoRA named {name!r}; available: {known}", param)
        return path

    def _inside(self, path: Path) -> bool:
        return path.is_file() and path.resolve().parent == self.folder

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = (path, st.st_mtime_ns, st.st_size)
        with self._lock:
            if key not in self._hashes:
                self._hashes[key] = sha256(path)
            return self._hashes[key]

    def parse(self, value: Any) -> list[LoraChoice]:
        """A request's ``loras`` (``[{"name": NAME, "scale": 1.0}, …]``), checked."""
        if value is None:
            return []
        if not isinstance(value, list):
            raise invalid(f'loras must be a list of {{"name", "scale"}} objects, got {value!r}', "loras")
        out = []
        for i, item in enumerate(value):
            where = f"loras[{i}]"
            if not isinstance(item, dict):
                raise invalid(f'{where} must be an object {{"name", "scale"}}, got {item!r}', where)
            extra = sorted(set(item) - {"name", "scale"})
            if extra:
                raise invalid(
                    f"{where} has an unknown field {extra[0]!r}; the fields are name and scale", where
                )
            scale = item.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
                raise invalid(f"{where}.scale must be a finite number, got {scale!r}", f"{where}.scale")
            out.append(
                LoraChoice(item.get("name"), self.path(item.get("name"), f"{where}.name"), float(scale))
            )
        return out


def no_loras(value: Any) -> list[LoraChoice]:
    """``loras`` on a server without ``--lora-dir``: none may be named."""
    if value in (None, []):
        return []
    raise invalid("this server has no LoRA folder (start it with qi serve --lora-dir DIR)", "loras")
