"""Plugin loading: entry points of the group ``qi.plugins``, reported and isolated per plugin.

Names are owned first come, first served, and qi's own plugins come first: they load before third-party ones,
and qi's own commands (:data:`CORE_COMMANDS`) precede every plugin's. A plugin that loses a name is never
dropped silently: its report has the status ``name-clash`` and names both owners.

A plugin declares the plugins it needs, by entry-point name: ``QI_REQUIRES = ("qwen_image", "lora")``. Plugins
load after what they require (a requirement cycle is an error on each plugin in it); a plugin whose
requirement is disabled, not installed or broken registers nothing and is reported as ``missing-dependency``,
and so, in turn, is every plugin that requires it. The names it would have registered are remembered, so
asking for one says which plugin provides it and why that plugin is not loaded.

Each hook's ``register`` callback has the exact signature of its stub in :data:`qi_core.hookspecs.REGISTER`;
an unknown keyword (``rol=``), a missing one or a value of the wrong type is a :class:`RegistrationError`
naming the plugin and the hook. User code registers through the same checks with :func:`register`.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import inspect
import os
import threading
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pluggy

from qi_core import hookspecs
from qi_core.errors import PluginError, RegistrationError, UnknownNameError
from qi_core.recipe import Recipe
from qi_core.registry import KINDS, Entry, Registry

ENTRY_POINT_GROUP = "qi.plugins"
DISABLE_ENV = "QI_DISABLE_PLUGINS"
REQUIRES_ATTR = "QI_REQUIRES"  # a plugin's requirements: entry-point names of the plugins it needs
USER = "<user>"
BUILTIN_PACKAGE = "qi_plugins"  # the package of qi's own plugins (they win name clashes)
# the sub-commands qi_core.cli defines itself; a plugin command of one of these names is never reachable
# (tests/core/test_bad_input_plugins.py keeps this equal to the parser's)
CORE_COMMANDS = ("make-tiny-model", "pipelines", "plugins")


class NameClashError(RegistrationError):
    """A plugin registered a name (part, command) that another plugin already owns."""


@dataclass
class PluginInfo:
    name: str  # entry-point name
    distribution: str | None  # the installed distribution providing it
    version: str | None  # its version
    module: str | None  # the module the entry point loads
    status: str = "ok"  # ok | error | disabled | incompatible | name-clash | missing-dependency
    hooks: list[str] = field(default_factory=list)
    provides: dict[str, list[str]] = field(default_factory=dict)  # kind -> names registered
    api: int | None = None  # declared QI_HOOK_API
    error: str | None = None  # one-line reason when status != ok
    hook: str | None = None  # the hook that failed, if any
    requires: list[str] = field(default_factory=list)  # declared QI_REQUIRES
    missing: list[str] = field(
        default_factory=list
    )  # the requirements that are not loaded (missing-dependency)
    withheld: dict[str, list[str]] = field(default_factory=dict)  # kind -> names it would provide if loaded

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
    """The plugins ``QI_DISABLE_PLUGINS`` names, normalised (:func:`normal_name`)."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {normal_name(n) for n in raw.replace(";", ",").split(",") if n.strip()}


def requirements(plugin: object) -> tuple[str, ...]:
    """A plugin's declared ``QI_REQUIRES`` (entry-point names), checked."""
    value = getattr(plugin, REQUIRES_ATTR, ())
    if (
        isinstance(value, str)
        or not isinstance(value, (tuple, list))
        or not all(isinstance(n, str) and n.strip() for n in value)
    ):
        hint = f"; write {REQUIRES_ATTR} = ({value!r},)" if isinstance(value, str) else ""
        raise PluginError(
            f"{REQUIRES_ATTR} must be a tuple of plugin (entry-point) names such as ('qwen_image',), "
            f"got {value!r}{hint}"
        )
    return tuple(value)


def load_order(
    names: Sequence[str], requires: Mapping[str, Sequence[str]]
) -> tuple[list[str], dict[str, list[str]]]:
    """``names`` reordered so that each comes after the plugins it requires, otherwise keeping the given order
    (qi's own plugins first). Returns the order and, for each plugin on a requirement cycle, that cycle
    (``["a", "b", "a"]``); those are placed as soon as only cycles are left, so the rest can still be decided."""
    by_normal = {normal_name(n): n for n in names}
    deps = {
        n: [by_normal[normal_name(r)] for r in requires.get(n, ()) if normal_name(r) in by_normal]
        for n in names
    }
    order: list[str] = []
    done: set[str] = set()
    cycles: dict[str, list[str]] = {}
    while len(order) < len(names):
        ready = next((n for n in names if n not in done and all(d in done for d in deps[n])), None)
        if ready is not None:
            order.append(ready)
            done.add(ready)
            continue
        # every plugin left waits for another one left: some of them are on a cycle
        for n in [n for n in names if n not in done]:
            cycle = _cycle_through(n, deps, done)
            if cycle:
                cycles[n] = cycle
                order.append(n)
        done.update(cycles)
    return order, cycles


def _cycle_through(start: str, deps: Mapping[str, list[str]], done: set[str]) -> list[str]:
    """The shortest requirement path from ``start`` back to itself among the plugins not ``done``, or []."""
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for n in frontier:
            for d in deps[n]:
                if d == start:
                    return [*paths[n], start]
                if d not in done and d not in paths:
                    paths[d] = [*paths[n], d]
                    nxt.append(d)
        frontier = nxt
    return []


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
        loaded: dict[str, object] = {}  # entry-point name -> imported plugin module
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
            if normal_name(ep.name) in disabled:
                info.status, info.error = "disabled", f"disabled by {DISABLE_ENV}"
                continue
            try:
                loaded[ep.name] = ep.load()
            except Exception as e:  # a broken plugin must not take the host down
                info.status, info.error = "error", f"import failed: {type(e).__name__}: {e}"
                info.hook = None
        # every plugin is imported before any registers, so each can load after the plugins it requires
        declared = {}
        for name, plugin in loaded.items():
            try:
                declared[name] = requirements(plugin)
            except PluginError:
                declared[name] = ()  # reported by _register
        order, cycles = load_order(list(loaded), declared)
        for name in order:
            info = self.plugins[name]
            if name in cycles:
                info.status, info.requires = "error", list(declared[name])
                info.error = (
                    f"requirement cycle {' -> '.join(repr(n) for n in cycles[name])} ({REQUIRES_ATTR}); "
                    "plugins on a cycle are not loaded: remove one of these requirements"
                )
                continue
            self._register(loaded[name], info)
        off = sorted(n for n, p in self.plugins.items() if p.status == "disabled")
        if off:  # their names are unknown (they are not imported), but they may be what was asked for
            self.registry.hint = f"Plugins disabled by {DISABLE_ENV}: {', '.join(off)}."

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
        if normal_name(name) in disabled_names():
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
            info.requires = list(requirements(plugin))
        except PluginError as e:
            info.status, info.error = "error", str(e)
            return
        unmet = {r: why for r in info.requires if (why := self._unmet(r)) is not None}
        if unmet:
            info.status, info.missing = "missing-dependency", list(unmet)
            info.error = "not loaded: it requires " + "; and ".join(
                f"{r!r}, which {w}" for r, w in unmet.items()
            )
            self._withhold(plugin, info)
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

    def _unmet(self, requirement: str) -> str | None:
        """Why a requirement is not satisfied (the end of "it requires 'x', which …"), or None when it is loaded."""
        dep = self._owner_of_name(requirement)
        if dep is None:
            return (
                "is not installed (no plugin has that entry-point name); install the distribution that provides "
                "it, see `qi plugins` for the installed ones"
            )
        if dep.status == "disabled":
            return f"is disabled by {DISABLE_ENV}; remove {dep.name!r} from {DISABLE_ENV}"
        if self.pm.get_plugin(dep.name) is None:  # a plugin that lost only a command name still loads
            return f"is not loaded ({dep.status}: {(dep.error or '').removeprefix('not loaded: ')})"
        return None

    def _withhold(self, plugin: object, info: PluginInfo) -> None:
        """Record the names a plugin that is not loaded would register (its hooks run against a recorder; nothing
        reaches the registry), so looking one of them up explains why it is missing."""
        entries: list[Entry] = []
        for hook_name in hookspecs.HOOKS:
            fn = getattr(plugin, hook_name, None)
            if fn is None or getattr(fn, f"{hookspecs.PROJECT}_impl", None) is None:
                continue
            try:
                fn(register=self._register_callback(hook_name, info.name, record=entries))
            except Exception:  # only the names matter here; the hook's own errors show once it can load
                continue
        for entry in entries:
            self.registry.withhold(entry, (info.error or "").removeprefix("not loaded: "))
            info.withheld.setdefault(entry.kind, []).append(entry.name)

    def _register_callback(
        self, hook_name: str, plugin_name: str, *, record: list[Entry] | None = None
    ) -> Callable[..., None]:
        """The ``register`` handed to one plugin's hook: checked arguments, then name clashes, then the registry
        (or, with ``record``, only collected)."""

        def add(entry: Entry) -> None:
            if record is not None:
                record.append(entry)
                return
            for n in (entry.name, *entry.aliases):
                try:
                    taken = self.registry.get(entry.kind, n)
                except UnknownNameError:
                    continue
                raise NameClashError(
                    f"{entry.kind} {n!r} is already registered by "
                    f"{owner(self.plugins.get(taken.plugin), taken.plugin)}; "
                    f"rename it in {owner(self.plugins.get(plugin_name), plugin_name)}"
                )
            self.registry.add(entry)

        kind = hookspecs.HOOK_KINDS[hook_name]
        return make_register(kind, plugin_name, f"plugin {plugin_name!r}, {hook_name}: register()", add)

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


def register(kind: str, name: Any, obj: Any = None, *, replace: bool = False, **options: Any) -> None:
    """Register one part from user code, with the checks and keywords of the kind's hook ``register``
    (:data:`qi_core.hookspecs.REGISTER`): ``qi.register("adapter", "my-style", MyAdapter)``,
    ``qi.register("encoder", "my-te", make_te, role="text_encoder")``, ``qi.register("pipeline", Recipe(...))``.
    ``replace=True`` overrides a registered name on purpose."""
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), KINDS, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RegistrationError(f"qi.register: unknown part kind {kind!r}.{hint} Kinds: {', '.join(KINDS)}")
    args: tuple[Any, ...] = (name, obj)
    # a recipe is registered under its own name: qi.register("pipeline", recipe) or ("pipeline", name, recipe)
    if kind == "pipeline":
        recipe = name if obj is None else obj
        if obj is not None and isinstance(recipe, Recipe) and recipe.name != name:
            raise RegistrationError(
                f"qi.register('pipeline', {name!r}, ...): the recipe is named {recipe.name!r}; a recipe is "
                "registered under its own name, so pass qi.register('pipeline', recipe)"
            )
        args = (recipe,)
    reg = host().registry
    callback = make_register(
        kind, USER, f"qi.register({kind!r}, ...)", lambda e: reg.add(e, replace=replace), user=True
    )
    callback(*args, **options)


def make_register(
    kind: str, plugin: str, where: str, add: Callable[[Entry], None], *, user: bool = False
) -> Callable[..., None]:
    """A ``register`` callback for one kind with the signature of its stub in
    :data:`qi_core.hookspecs.REGISTER`: arguments are bound and checked, then ``add(Entry)`` is called.
    ``where`` starts each error message (``"plugin 'x', qi_register_encoders: register()"``); ``user``: the
    messages show the ``qi.register`` form."""
    stub = hookspecs.REGISTER[_HOOK_OF_KIND[kind]]
    sig = inspect.signature(stub)
    plain = hookspecs.plain_signature(sig)
    shown = f"qi.register({kind!r}, {plain[1:-1]}, replace=False)" if user else f"register{plain}"
    keywords = [n for n, p in sig.parameters.items() if p.kind is not p.POSITIONAL_ONLY]

    def register(*args: Any, **kwargs: Any) -> None:
        for k in kwargs:
            if k not in keywords:
                close = difflib.get_close_matches(k, keywords, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise RegistrationError(f"{where} got an unknown keyword {k!r}{hint}; it takes {shown}")
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise RegistrationError(f"{where}: {e}; it takes {shown}") from None
        bound.apply_defaults()
        entry = _entry(kind, plugin, where, dict(bound.arguments))
        add(entry)

    register.__signature__ = sig  # type: ignore[attr-defined]
    register.__doc__ = stub.__doc__
    return register


_HOOK_OF_KIND = {kind: hook for hook, kind in hookspecs.HOOK_KINDS.items()}


def _entry(kind: str, plugin: str, where: str, args: dict[str, Any]) -> Entry:
    """The registry entry for checked ``register`` arguments; a value of the wrong type is a RegistrationError."""
    if kind == "pipeline":
        recipe = args["recipe"]
        if not isinstance(recipe, Recipe):
            raise RegistrationError(f"{where}: expects register(Recipe(...)), got {type(recipe).__name__}")
        return Entry(kind, recipe.name, recipe, plugin)
    name = args.pop("name")
    if not isinstance(name, str) or not name.strip():
        raise RegistrationError(f"{where}: a {kind} needs a non-empty string name, got {name!r}")
    aliases = args.pop("aliases")
    if not isinstance(aliases, (tuple, list)) or not all(isinstance(a, str) and a.strip() for a in aliases):
        fix = f" (write aliases=({aliases!r},))" if isinstance(aliases, str) else ""
        raise RegistrationError(
            f"{where}: aliases of {kind} {name!r} must be a tuple of names, got {aliases!r}{fix}"
        )
    label, obj = next(iter(args.items()))  # the factory / configure / backend
    if obj is None or not (callable(obj) or (isinstance(obj, str) and ":" in obj)):
        raise RegistrationError(
            f"{where}: the {label} of {kind} {name!r} must be a callable or a 'module:attribute' string, "
            f"got {obj!r}"
        )
    meta = {k: v for k, v in args.items() if k != label}
    role = meta.get("role")
    if "role" in meta and not (isinstance(role, str) and role.isidentifier()):
        raise RegistrationError(
            f"{where}: role of encoder {name!r} must be the recipe slot it fills, an identifier such as "
            f"'text_encoder' or 'vae', got {role!r}"
        )
    if "help" in meta and not isinstance(meta["help"], str):
        raise RegistrationError(f"{where}: help of {kind} {name!r} must be a string, got {meta['help']!r}")
    for flag in ("per_call", "switch"):
        if flag in meta and not isinstance(meta[flag], bool):
            raise RegistrationError(
                f"{where}: {flag} of {kind} {name!r} must be True or False, got {meta[flag]!r}"
            )
    check = meta.get("check")
    if check is not None and not (callable(check) or (isinstance(check, str) and ":" in check)):
        raise RegistrationError(f"{where}: check of {kind} {name!r} must be a callable or 'module:attribute'")
    return Entry(kind, name, obj, plugin, meta, tuple(aliases))


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
