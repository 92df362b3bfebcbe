"""Plugin loading: entry points of the group ``qi.plugins``, reported and isolated per plugin.

Names are owned first come, first served, and qi's own plugins come first: they load before third-party ones,
and qi's own commands (:data:`CORE_COMMANDS`) precede every plugin's. A plugin that loses a name is never
dropped silently: its report has the status ``name-clash`` and names both owners.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import threading
import traceback
import types
from dataclasses import asdict, dataclass, field
from typing import Any

import pluggy

from qi_core import hookspecs
from qi_core.errors import PluginError, RegistrationError, UnknownNameError
from qi_core.recipe import Recipe
from qi_core.registry import Entry, Registry

ENTRY_POINT_GROUP = "qi.plugins"
DISABLE_ENV = "QI_DISABLE_PLUGINS"
USER = "<user>"
BUILTIN_PACKAGE = "qi_plugins"  # the package of qi's own plugins (they win name clashes)
# the sub-commands qi_core.cli defines itself; a plugin command of one of these names is never reachable
# (tests/core/test_bad_input_plugins.py keeps this equal to the parser's)
CORE_COMMANDS = ("generate", "make-tiny-model", "pipelines", "plugins")


class NameClashError(RegistrationError):
    """A plugin registered a name (part, command) that another plugin already owns."""


@dataclass
class PluginInfo:
    name: str  # entry-point name
    distribution: str | None  # the installed distribution providing it
    version: str | None  # its version
    module: str | None  # the module the entry point loads
    status: str = "ok"  # ok | error | disabled | incompatible | name-clash
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)  # kind -> names registered
    api: int | None = None  # declared QI_HOOK_API
    error: str | None = None  # one-line reason when status != ok
    hook: str | None = None  # the hook that failed, if any

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def normal_name(name: str) -> str:
    """Plugin names compare without case and with '-' == '_' (``qwen-image`` is ``qwen_image``)."""
    return name.strip().lower().replace("-", "_")


def is_builtin(info: PluginInfo) -> bool:
    module = (info.module or "").partition(":")[0]
    return module == BUILTIN_PACKAGE or module.startswith(BUILTIN_PACKAGE + ".")


def owner(info: PluginInfo | None, name: str = "") -> str:
    """Who provides a plugin, for messages: ``plugin 'x' (qi-plugin-x 1.0, module qi_plugin_x)``."""
    if info is None:
        return "user code (qi.register)" if name == USER else f"plugin {name!r}"
    dist = f"{info.distribution} {info.version or ''}".strip() if info.distribution else "in-process"
    builtin = "built-in " if is_builtin(info) else ""
    return f"{builtin}plugin {info.name!r} ({dist}, module {info.module})"


def disabled_names() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {n.strip() for n in raw.replace(";", ",").split(",") if n.strip()}


class PluginHost:
    """Owns the pluggy manager, the registry and the per-plugin reports."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.plugins: dict[str, PluginInfo] = {}
        self.clashes: list[PluginInfo] = []  # entry points not loaded: their name is another plugin's

    # -- loading ---------------------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        disabled = disabled_names()
        infos = []
        for ep in md.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            infos.append((ep, PluginInfo(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
                module=ep.value,
            )))  # fmt: skip
        # qi's own plugins first, so a third-party plugin never takes one of their names (entry point or part)
        infos.sort(
            key=lambda x: (not is_builtin(x[1]), x[0].name, x[1].distribution or "", x[1].module or "")
        )
        for ep, info in infos:
            taken = self._owner_of_name(ep.name)
            if taken is not None:
                if (taken.distribution, taken.module) != (info.distribution, info.module):
                    info.status = "name-clash"
                    info.error = (
                        f"not loaded: its entry point {ep.name!r} is the name of {owner(taken)}, which takes "
                        f'precedence; rename the entry point in [project.entry-points."{ENTRY_POINT_GROUP}"] '
                        f"of {info.distribution or 'its'} pyproject.toml"
                    )
                    self.clashes.append(info)
                continue
            self.plugins[ep.name] = info
            if ep.name in disabled:
                info.status, info.error = "disabled", f"disabled by {DISABLE_ENV}"
                continue
            try:
                plugin = ep.load()
            except Exception as e:  # a broken plugin must not take the host down
                info.status, info.error = "error", f"import failed: {type(e).__name__}: {e}"
                info.hook = None
                continue
            self._register(plugin, info)

    def _owner_of_name(self, name: str) -> PluginInfo | None:
        return next((p for n, p in self.plugins.items() if normal_name(n) == normal_name(name)), None)

    def register_plugin(self, plugin: object, name: str | None = None) -> PluginInfo:
        """Register an in-process plugin object or module (user code, tests)."""
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        if name in self.plugins and self.plugins[name].status == "ok":
            raise PluginError(f"a plugin named {name!r} is already registered")
        info = PluginInfo(
            name=name, distribution=None, version=None, module=getattr(plugin, "__name__", None)
        )
        self.plugins[name] = info
        if name in disabled_names():
            info.status, info.error = "disabled", f"disabled by {DISABLE_ENV}"
            return info
        self._register(plugin, info)
        return info

    def unregister_plugin(self, name: str) -> None:
        info = self.plugins.pop(name, None)
        if info is None:
            return
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.registry.remove_plugin(name)

    def _register(self, plugin: object, info: PluginInfo) -> None:
        api = getattr(plugin, "QI_HOOK_API", hookspecs.HOOK_API_VERSION)
        info.api = api
        if api != hookspecs.HOOK_API_VERSION:
            info.status = "incompatible"
            info.error = (
                f"written for qi hook API {api}, this qi provides {hookspecs.HOOK_API_VERSION}; "
                "upgrade the plugin or qi"
            )
            return
        try:
            self.pm.register(plugin, name=info.name)
        except Exception as e:
            info.status, info.error = "error", f"registration failed: {type(e).__name__}: {e}"
            return
        callers = self.pm.get_hookcallers(plugin) or []
        unknown = sorted(hc.name for hc in callers if hc.spec is None)
        if unknown:
            self.pm.unregister(plugin)
            info.status, info.hook = "error", unknown[0]
            info.error = (
                f"implements unknown hook(s) {', '.join(unknown)}; known hooks: {', '.join(hookspecs.HOOKS)}"
            )
            return
        info.hooks = sorted(hc.name for hc in callers)
        for hook_name in hookspecs.HOOKS:
            impls = [i for i in getattr(self.pm.hook, hook_name).get_hookimpls() if i.plugin is plugin]
            for impl in impls:
                try:
                    impl.function(register=self._register_callback(hook_name, info.name))
                except Exception as e:
                    self.registry.remove_plugin(info.name)
                    self.pm.unregister(plugin)
                    info.hook = hook_name
                    if isinstance(e, NameClashError):
                        info.status, info.error = "name-clash", f"not loaded: {hook_name}: {e}"
                    else:
                        info.status, info.error = "error", f"{hook_name} failed: {type(e).__name__}: {e}"
                    info.traceback = traceback.format_exc()  # type: ignore[attr-defined]
                    return
        info.provides = self.registry.by_plugin(info.name)
        shadowed = [c for c in info.provides.get("command", []) if c in CORE_COMMANDS]
        if shadowed:  # the rest of the plugin works; the command can never run (`qi X` is the built-in)
            info.status, info.hook = "name-clash", "qi_register_commands"
            info.error = (
                f"command(s) {', '.join(repr(c) for c in shadowed)} shadowed by qi's built-in command(s) of that "
                f"name (qi_core.cli); `qi {shadowed[0]}` runs the built-in. Rename the command(s) in {owner(info)}"
            )

    def _register_callback(self, hook_name: str, plugin_name: str):
        kind = hookspecs.HOOK_KINDS[hook_name]

        def register(name_or_recipe: Any, obj: Any = None, *, aliases: tuple[str, ...] = (), **meta: Any):
            if kind == "pipeline":
                recipe = name_or_recipe
                if not isinstance(recipe, Recipe):
                    raise RegistrationError(
                        f"{plugin_name}: qi_register_pipelines expects register(Recipe(...)), "
                        f"got {type(recipe).__name__}"
                    )
                entry = Entry(kind, recipe.name, recipe, plugin_name, meta, tuple(aliases))
            else:
                if obj is None:
                    raise RegistrationError(f"{plugin_name}: register({name_or_recipe!r}) needs an object")
                entry = Entry(kind, name_or_recipe, obj, plugin_name, meta, tuple(aliases))
            for n in (entry.name, *entry.aliases):
                try:
                    taken = self.registry.get(kind, n)
                except (UnknownNameError, KeyError):
                    continue
                raise NameClashError(
                    f"{kind} {n!r} is already registered by {owner(self.plugins.get(taken.plugin), taken.plugin)}; "
                    f"rename it in {owner(self.plugins.get(plugin_name), plugin_name)}"
                )
            self.registry.add(entry)

        return register

    # -- reporting -------------------------------------------------------------------------------------
    def report(self) -> list[PluginInfo]:
        """Every plugin by name; an entry point not loaded for a name clash follows the plugin it clashes with."""
        return sorted(
            [*self.plugins.values(), *self.clashes], key=lambda p: (p.name, p.status == "name-clash")
        )


_host: PluginHost | None = None
_lock = threading.Lock()


def host() -> PluginHost:
    """The process-wide plugin host, loading entry points on first use."""
    global _host
    with _lock:
        if _host is None:
            h = PluginHost()
            h.load_entry_points()
            _host = h
        return _host


def reset() -> None:
    """Forget loaded plugins (tests; after changing QI_DISABLE_PLUGINS)."""
    global _host
    with _lock:
        _host = None


def register(kind: str, name: str, obj: Any, *, replace: bool = False, **meta: Any) -> None:
    """Register one part from user code, e.g. ``qi.register("adapter", "my-style", MyAdapter)``."""
    host().registry.add(Entry(kind, name, obj, USER, meta), replace=replace)


def plugin_module(name: str, **hooks: Any) -> types.ModuleType:
    """Build a plugin module from hook functions (handy for in-process plugins and tests)."""
    mod = types.ModuleType(name)
    for hook_name, fn in hooks.items():
        setattr(mod, hook_name, hookspecs.hookimpl(fn))
    return mod


def lazy_attributes(package: str, exports: dict[str, str]):
    """A module ``__getattr__`` importing each exported name from its module on first use, so a plugin's
    ``__init__`` stays cheap to import: ``__getattr__ = lazy_attributes(__name__, {"LoRA": "pkg.adapter"})``."""
    import importlib

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
