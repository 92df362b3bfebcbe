"""A LoRA that a recipe ships as a component (EliGen, In-Context-Control-Union).

The recipe declares ``"lora": Component(part=..., model="<hub id>", pattern="model.safetensors")``; its factory
only records the files, and the recipe's adapter fuses them into the DiT after loading (through the ``lora``
plugin, imported on first use). Users override the files per call of ``qi.compose``:
``components={"lora": "my_lora.safetensors"}``, or ``components={"lora": []}`` for no LoRA at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qi_core.errors import PluginError
from qi_core.loading import weight_files
from qi_core.protocols import Adapter

ROLE = "lora"


@dataclass(frozen=True)
class LoRAFiles:
    """The LoRA weights a recipe will fuse; loading is deferred to the adapter."""

    files: tuple[Path, ...]  # safetensors files; empty = no LoRA


def lora_files(root: Path, folder: Path | list[Path], device: Any = "cpu", dtype: Any = None) -> LoRAFiles:
    """Component factory: a file, a list of files ([] = none), or a folder holding the LoRA."""
    if isinstance(folder, list):
        return LoRAFiles(tuple(Path(p) for p in folder))
    return LoRAFiles(tuple(weight_files(Path(folder))))


class ComponentLoRA(Adapter):
    """Fuses the recipe's ``lora`` component into the DiT (``scale`` x the LoRA, as ``pipe.load_lora``)."""

    name = "component-lora"

    def __init__(self, scale: float = 1.0, role: str = ROLE):
        self.scale, self.role = scale, role
        self._applied: list[Any] = []

    def apply(self, pipe) -> None:
        slot = pipe.components.get(self.role)
        files = getattr(slot, "files", ())
        if not files:
            return
        try:
            from qi_plugins.lora.adapter import LoRA
        except ImportError as e:
            raise PluginError(
                f"pipeline {pipe.name!r} fuses a LoRA ({files[0]}) and needs the 'lora' plugin, which could not be "
                f"imported ({e}); install it, or compose with components={{'{self.role}': []}} to run without it"
            ) from e
        for f in files:
            lora = LoRA(f, self.scale)
            lora.apply(pipe)
            self._applied.append(lora)

    def remove(self, pipe) -> None:
        while self._applied:
            self._applied.pop().remove(pipe)
