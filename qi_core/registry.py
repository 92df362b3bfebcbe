"""The registry of named parts. The core owns names and collision rules; plugins only call ``register``."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from qi_core.errors import RegistrationError, UnavailableNameError, UnknownNameError
from qi_core.hookspecs import HOOK_KINDS

KINDS = tuple(HOOK_KINDS.values())  # one kind of part per registration hook


@dataclass
class Entry:
    kind: str  # one of KINDS
    name: str  # unique within kind
    obj: Any  # factory, "module:attr" string, or (for pipelines) a Recipe
    plugin: str  # who registered it ("<user>" for in-process registrations)
    meta: dict[str, Any] = field(default_factory=dict)  # role= (encoders), help= (commands)
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
        # names a plugin would provide but that are not registered because the plugin is not loaded:
        # kind -> name -> (plugin, why), so looking one up says why instead of suggesting another name
        self._withheld: dict[str, dict[str, tuple[str, str]]] = {k: {} for k in KINDS}
        self.hint = ""  # appended to unknown-name errors (e.g. which plugins are disabled)

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
        self._check_roles(entry)
        table[entry.name] = entry
        for a in entry.aliases:
            aliases[a] = entry.name

    def _check_roles(self, entry: Entry) -> None:
        """An encoder fills one recipe slot, its ``role``: a recipe putting it in another slot is refused,
        whichever of the two is registered first (recipes whose components are looked up lazily are skipped)."""
        if entry.kind == "encoder":
            recipes = list(self._entries["pipeline"].values())
            encoders = {n: entry for n in (entry.name, *entry.aliases)}
        elif entry.kind == "pipeline":
            recipes = [entry]
            encoders = dict(self._entries["encoder"])
            encoders.update({a: encoders[n] for a, n in self._aliases["encoder"].items()})
        else:
            return
        for recipe in recipes:
            components = getattr(recipe.obj, "components", None)
            if type(components) is not dict:
                continue
            for slot, comp in components.items():
                if getattr(comp, "kind", None) != "encoder" or comp.part not in encoders:
                    continue
                enc = encoders[comp.part]
                role = enc.meta.get("role")
                if role is not None and role != slot:
                    clash = (
                        f"recipe {recipe.name!r} puts encoder {comp.part!r} in the slot {slot!r}, but it is "
                        f"registered for the role {role!r} (plugin {enc.plugin!r})"
                        if entry.kind == "pipeline"
                        else f"encoder {comp.part!r} is registered for the role {role!r}, but recipe "
                        f"{recipe.name!r} (plugin {recipe.plugin!r}) puts it in the slot {slot!r}"
                    )
                    raise RegistrationError(
                        f"{entry.plugin}: {clash}; a recipe's slot is its encoder's role: put the part under "
                        f"{role!r} or use an encoder registered with role={slot!r}"
                    )

    def remove_plugin(self, plugin: str) -> None:
        for kind in KINDS:
            for name in [n for n, e in self._entries[kind].items() if e.plugin == plugin]:
                entry = self._entries[kind].pop(name)
                for a in entry.aliases:
                    self._aliases[kind].pop(a, None)
            for name in [n for n, (p, _) in self._withheld[kind].items() if p == plugin]:
                del self._withheld[kind][name]

    def withhold(self, entry: Entry, reason: str) -> None:
        """Remember that ``entry.plugin`` would provide this name but is not loaded, and why."""
        for n in (entry.name, *entry.aliases):
            self._withheld[entry.kind].setdefault(n, (entry.plugin, reason))

    def get(self, kind: str, name: str) -> Entry:
        table = self._entries[kind]
        entry = table.get(name) or table.get(self._aliases[kind].get(name, ""))
        if entry is None:
            known = list(table) + list(self._aliases[kind])
            if name in self._withheld[kind]:
                plugin, reason = self._withheld[kind][name]
                raise UnavailableNameError(kind.replace("_", " "), name, known, plugin, reason)
            error = UnknownNameError(kind.replace("_", " "), name, known)
            if self.hint:
                error.args = (f"{error.args[0]} {self.hint}",)
            raise error
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
