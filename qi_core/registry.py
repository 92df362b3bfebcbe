"""The registry of named parts. The core owns names and collision rules; plugins only call ``register``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from qi_core.errors import RegistrationError, UnknownNameError

KINDS = (
    "encoder",
    "denoiser",
    "injector",
    "scheduler",
    "memory_policy",
    "training_task",
    "adapter",
    "pipeline",
    "command",
    "guider",
    "sampler",
    "step_runner",
    "attention",
)


@dataclass
class Entry:
    kind: str  # one of KINDS
    name: str  # unique within kind
    obj: Any  # factory, "module:attr" string, or (for pipelines) a Recipe
    plugin: str  # who registered it ("<user>" for in-process registrations)
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. role= for encoders
    aliases: tuple[str, ...] = ()

    def load(self) -> Any:
        """The registered object, importing ``"module:attr"`` strings on first use."""
        if isinstance(self.obj, str) and ":" in self.obj:
            module, _, attr = self.obj.partition(":")
            value: Any = importlib.import_module(module)
            for part in attr.split("."):
                value = getattr(value, part)
            self.obj = value
        return self.obj


class Registry:
    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
        self._aliases: dict[str, dict[str, str]] = {k: {} for k in KINDS}

    def add(self, entry: Entry, *, replace: bool = False) -> None:
        if entry.kind not in self._entries:
            raise RegistrationError(f"unknown part kind {entry.kind!r}; kinds are {', '.join(KINDS)}")
        if not entry.name or not isinstance(entry.name, str):
            raise RegistrationError(f"{entry.plugin}: a {entry.kind} needs a non-empty string name")
        table, aliases = self._entries[entry.kind], self._aliases[entry.kind]
        for n in (entry.name, *entry.aliases):
            owner = table.get(n) or table.get(aliases.get(n, ""))
            if owner is not None and not replace:
                raise RegistrationError(
                    f"{entry.plugin}: {entry.kind} name {n!r} is already registered by {owner.plugin!r}; "
                    "pick another name (or pass replace=True from user code to override on purpose)"
                )
        table[entry.name] = entry
        for a in entry.aliases:
            aliases[a] = entry.name

    def remove_plugin(self, plugin: str) -> None:
        for kind in KINDS:
            for name in [n for n, e in self._entries[kind].items() if e.plugin == plugin]:
                entry = self._entries[kind].pop(name)
                for a in entry.aliases:
                    self._aliases[kind].pop(a, None)

    def get(self, kind: str, name: str) -> Entry:
        table = self._entries[kind]
        entry = table.get(name) or table.get(self._aliases[kind].get(name, ""))
        if entry is None:
            raise UnknownNameError(kind.replace("_", " "), name, list(table) + list(self._aliases[kind]))
        return entry

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def entries(self, kind: str) -> list[Entry]:
        return [self._entries[kind][n] for n in sorted(self._entries[kind])]

    def by_plugin(self, plugin: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for kind in KINDS:
            names = sorted(n for n, e in self._entries[kind].items() if e.plugin == plugin)
            if names:
                out[kind] = names
        return out
