"""The hook contracts between the qi core and its plugins; ``docs/hooks.md`` documents each one in full.

Every hook is a *registration* hook: the core calls it once per plugin, at plugin-load time, with a ``register``
callback whose signature is the hook's stub in :data:`REGISTER`; the plugin calls it for each part it provides
(a factory: a callable or a ``"module:attribute"`` string, imported on first use, so registration stays cheap).
The core owns the names and the collision rules; a wrong argument is a :class:`qi_core.errors.RegistrationError`
naming the plugin and the hook. The runtime protocols of the registered objects are in :mod:`qi_core.protocols`.

Bump :data:`HOOK_API_VERSION` when a hook's signature (or its ``register``'s) changes incompatibly; a plugin
declares ``QI_HOOK_API = N`` and the plugins it needs, ``QI_REQUIRES = ("qwen_image", "lora")``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from qi_core.recipe import Recipe

PROJECT = "qi"
HOOK_API_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., Any]
Factory = Callable[..., Any] | str  # a callable, or a "module:attribute" string imported on first use


@hookspec
def qi_register_encoders(register: Register) -> None:
    """Encoders: ``register(name, factory, *, role, aliases=())``; ``factory(root=, folder=, device=, dtype=[,
    load=])`` returns a TextEncoder or an Autoencoder filling the recipe slot ``role``."""


@hookspec
def qi_register_denoisers(register: Register) -> None:
    """Denoisers: ``register(name, factory, *, aliases=())``; ``factory(root=, folder=, device=, dtype=[,
    load=])`` returns a Denoiser."""


@hookspec
def qi_register_injectors(register: Register) -> None:
    """Conditioning injectors: ``register(name, factory, *, aliases=())``; ``factory()`` returns an Injector."""


@hookspec
def qi_register_schedulers(register: Register) -> None:
    """Sigma schedules: ``register(name, factory, *, aliases=())``; ``factory()`` returns an object with
    ``schedule(...)`` and ``training_schedule(...)``."""


@hookspec
def qi_register_memory_policies(register: Register) -> None:
    """Memory policies: ``register(name, factory, *, aliases=())``; ``factory(role=, **settings)`` returns a
    MemoryPolicy."""


@hookspec
def qi_register_training_tasks(register: Register) -> None:
    """Training tasks: ``register(name, factory, *, aliases=())``; ``factory()`` returns a TrainingTask."""


@hookspec
def qi_register_adapters(register: Register) -> None:
    """Adapters: ``register(name, factory, *, aliases=())``; ``factory()`` returns an Adapter."""


@hookspec
def qi_register_pipelines(register: Register) -> None:
    """Recipes: ``register(recipe)`` with a :class:`qi_core.recipe.Recipe`."""


@hookspec
def qi_register_commands(register: Register) -> None:
    """``qi`` sub-commands: ``register(name, configure, *, help="", aliases=())``; ``configure(parser[, argv=])``
    adds the arguments and ``parser.set_defaults(func=run)``."""


@hookspec
def qi_register_guiders(register: Register) -> None:
    """Guiders: ``register(name, factory, *, aliases=())``; ``factory()`` returns a Guider."""


@hookspec
def qi_register_samplers(register: Register) -> None:
    """Samplers: ``register(name, factory, *, aliases=())``; ``factory()`` returns a Sampler."""


@hookspec
def qi_register_step_runners(register: Register) -> None:
    """Step runners: ``register(name, factory, *, aliases=())``; ``factory()`` returns a StepRunner."""


@hookspec
def qi_register_attention(register: Register) -> None:
    """Attention backends: ``register(name, backend, *, aliases=())``; ``backend(q, k, v, mask) -> out``."""


@hookspec
def qi_register_sources(register: Register) -> None:
    """Model sources: ``register(name, fetch, *, prefixes=(), aliases=())``; ``fetch(model_id, local_dir,
    patterns)`` downloads a hub repository's matching files."""


@hookspec
def qi_register_options(register: Register) -> None:
    """Compose options:
    ``register(name, apply, *, help="", per_call=False, switch=False, check=None, aliases=())``;
    ``qi.compose(..., name=value)`` calls ``apply(pipe, value)`` (None or an undo callable)."""


# -- the ``register`` callback of each hook ----------------------------------------------------------------
# The core gives each hook a callback with exactly the signature of these stubs (qi_core.plugin_host checks the
# arguments against them); docs/hooks.md lists them and tests/core/test_hook_contracts.py keeps the three equal.
# ``aliases``: extra names the part answers to (same collision rules as the name).


def register_part(name: str, factory: Factory, *, aliases: Sequence[str] = ()) -> None:
    """A named factory (a callable or a ``"module:attribute"`` string)."""


def register_encoder(name: str, factory: Factory, *, role: str, aliases: Sequence[str] = ()) -> None:
    """An encoder factory and the recipe slot it fills (``role``: ``"text_encoder"``, ``"vae"`` …)."""


def register_pipeline(recipe: Recipe) -> None:
    """A :class:`qi_core.recipe.Recipe`; its ``name`` is the registered name."""


def register_command(name: str, configure: Factory, *, help: str = "", aliases: Sequence[str] = ()) -> None:
    """A ``qi NAME`` sub-command: ``configure(parser[, argv=])``; ``help`` is its line in ``qi --help``."""


def register_attention(name: str, backend: Factory, *, aliases: Sequence[str] = ()) -> None:
    """An attention backend ``backend(q, k, v, mask) -> out``."""


def register_source(
    name: str, fetch: Factory, *, prefixes: Sequence[str] = (), aliases: Sequence[str] = ()
) -> None:
    """A model source ``fetch(model_id, local_dir, patterns)``; ``prefixes`` (``"hf:"``) force it for a hub id."""


def register_option(
    name: str,
    apply: Factory,
    *,
    help: str = "",
    per_call: bool = False,
    switch: bool = False,
    check: Factory | None = None,
    aliases: Sequence[str] = (),
) -> None:
    """A keyword of ``qi.compose`` (and of a pipeline call when ``per_call``): ``apply(pipe, value)``; ``switch``:
    the value is on/off (a bare ``--name`` flag on the command line); ``check(value)``: refuses a bad value
    before any weight loads."""


# hook name -> registry kind it fills
HOOK_KINDS: dict[str, str] = {
    "qi_register_encoders": "encoder",
    "qi_register_denoisers": "denoiser",
    "qi_register_injectors": "injector",
    "qi_register_schedulers": "scheduler",
    "qi_register_memory_policies": "memory_policy",
    "qi_register_training_tasks": "training_task",
    "qi_register_adapters": "adapter",
    "qi_register_pipelines": "pipeline",
    "qi_register_commands": "command",
    "qi_register_guiders": "guider",
    "qi_register_samplers": "sampler",
    "qi_register_step_runners": "step_runner",
    "qi_register_attention": "attention",
    "qi_register_sources": "source",
    "qi_register_options": "option",
}
HOOKS: tuple[str, ...] = tuple(HOOK_KINDS)

# hook name -> the signature of the ``register`` it receives
REGISTER: dict[str, Callable[..., None]] = {
    hook: {"encoder": register_encoder, "pipeline": register_pipeline, "command": register_command,
           "attention": register_attention, "source": register_source,
           "option": register_option}.get(kind, register_part)
    for hook, kind in HOOK_KINDS.items()
}  # fmt: skip


def plain_signature(sig: inspect.Signature) -> str:
    """A signature as the docs write it, without annotations: ``(name, factory, *, role, aliases=())``."""
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values() if p.name != "self"]
    return str(sig.replace(parameters=params, return_annotation=sig.empty))
