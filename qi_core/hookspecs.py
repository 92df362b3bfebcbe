"""The hook contracts between the qi core and its plugins.

Every hook is a *registration* hook in the style of llm/datasette: the core calls it once per plugin, at
plugin-load time, with a ``register`` callback. The plugin calls ``register(...)`` for each part it provides.
The core owns the names and the collision rules; a plugin never mutates core state directly. Each hook's
``register`` has exactly the signature of its entry in :data:`REGISTER` (below): an unknown keyword, a missing
one or a value of the wrong type is a :class:`qi_core.errors.RegistrationError` naming the plugin and the hook.

Registration must stay cheap: ``qi plugins`` loads every plugin and calls every hook. Register *factories*
(callables or ``"module:attribute"`` strings) and import torch models only inside them.

The six part categories of a diffusion pipeline, the two that compose them, CLI commands, and the four parts
the denoising loop is made of:

===========================  ================================================================================
hook                         registers
===========================  ================================================================================
qi_register_encoders         text / image encoders and autoencoders (prompt → embeddings, image ↔ latents)
qi_register_denoisers        denoisers (the DiT and its block types): DenoiseInput → velocity
qi_register_injectors        conditioning injectors: add tokens, attention masks, residuals, modulation
                             changes, initial latents or velocity blending to the generic loop
qi_register_schedulers       sigma schedules (inference and training)
qi_register_memory_policies  where weights live and when they move
qi_register_training_tasks   losses and data steps for ``qi train``
qi_register_adapters         weight adapters (LoRA-like) and named adapter bundles composable by name
qi_register_pipelines        recipes: a named composition of the parts above
qi_register_commands         ``qi`` sub-commands added by plugins
qi_register_guiders          guiders: how the per-side predictions of a step combine (``cfg``, ``cfg-renorm``)
qi_register_samplers         samplers: how the flow ODE is integrated over the sigmas (``euler``, ``heun``)
qi_register_step_runners     step runners: how one step's per-side inputs become predictions (batched, cached,
                             spread over devices)
qi_register_attention        attention backends the denoiser calls (``sdpa``)
===========================  ================================================================================

The runtime protocols of the registered objects (what an injector's methods receive, what a denoiser is
called with) are defined in :mod:`qi_core.protocols` and documented in ``docs/hooks.md``.

Bump :data:`HOOK_API_VERSION` when a hook's signature (or its ``register``'s) changes incompatibly. A plugin
declares the version it was written for as a module attribute ``QI_HOOK_API = N``; a plugin whose major version
differs is reported as incompatible and skipped. A plugin declares the plugins it needs by entry-point name,
``QI_REQUIRES = ("qwen_image", "lora")``: they load first, and if one is disabled, missing or broken the plugin
registers nothing and is reported as ``missing-dependency``.
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
    """Register encoders: ``register(name, factory, *, role, aliases=())``.

    ``factory(root=, folder=, device=, dtype=)`` returns a loaded encoder object (``root`` the model
    repository, ``folder`` the component's subfolder); a factory naming a ``load`` parameter also gets the
    memory policy's reader (see :func:`qi_core.loading.load_module`). ``role`` is the recipe slot it fills (``"text_encoder"``,
    ``"vae"``, ``"processor"`` …): a recipe that puts the part in another slot is refused. A text encoder
    implements :class:`qi_core.protocols.TextEncoder`; an autoencoder implements
    :class:`qi_core.protocols.Autoencoder`. Called once per plugin at load time.
    """


@hookspec
def qi_register_denoisers(register: Register) -> None:
    """Register denoisers: ``register(name, factory, *, aliases=())``.

    ``factory(root=, folder=, device=, dtype=)`` (plus ``load=`` when it names that parameter, as for
    encoders) returns an object implementing :class:`qi_core.protocols.Denoiser` (called with a
    :class:`qi_core.protocols.DenoiseInput`, returns the velocity of the target latents). Block types the denoiser is built from are part of the denoiser.
    Called once per plugin at load time.
    """


@hookspec
def qi_register_injectors(register: Register) -> None:
    """Register conditioning injectors: ``register(name, factory, *, aliases=())``.

    ``factory()`` returns an object implementing :class:`qi_core.protocols.Injector`: it declares the call
    parameters it consumes and takes part in the generic loop (prepare, prompt inputs, initial latents, extra
    image/text tokens and attention masks, per-block residuals, velocity blending).
    Called once per plugin at load time.
    """


@hookspec
def qi_register_schedulers(register: Register) -> None:
    """Register sigma schedules: ``register(name, factory, *, aliases=())``.

    ``factory()`` returns an object with ``schedule(num_inference_steps, *, height, width,
    denoising_strength=1.0, exponential_shift_mu=None) -> (sigmas, timesteps)`` and
    ``training_schedule(num_train_timesteps) -> (sigmas, timesteps, weights)`` (1-D float32 tensors).
    Called once per plugin at load time.
    """


@hookspec
def qi_register_memory_policies(register: Register) -> None:
    """Register memory policies: ``register(name, factory, *, aliases=())``.

    ``factory(role=, **settings)`` returns an object implementing :class:`qi_core.protocols.MemoryPolicy`:
    it may read a model itself (``load``), places it (``attach``) and wraps each use of it (``use`` context
    manager), deciding where the weights live between calls. Called once per plugin at load time.
    """


@hookspec
def qi_register_training_tasks(register: Register) -> None:
    """Register training tasks: ``register(name, factory, *, aliases=())``.

    ``factory()`` returns an object implementing :class:`qi_core.protocols.TrainingTask` (``loss(pipe,
    batch, generator) -> Tensor``). Called once per plugin at load time.
    """


@hookspec
def qi_register_adapters(register: Register) -> None:
    """Register adapters: ``register(name, factory, *, aliases=())``.

    ``factory()`` returns an object implementing :class:`qi_core.protocols.Adapter`; ``apply(pipe)`` changes
    a built pipeline (fuse or attach weights, add injectors, change defaults). Composable by name through
    ``qi.compose(..., adapters=[name, ...])``. Called once per plugin at load time.
    """


@hookspec
def qi_register_pipelines(register: Register) -> None:
    """Register recipes: ``register(recipe)`` with a :class:`qi_core.recipe.Recipe`.

    A recipe names the parts (by their registered names), the default model id, the call defaults and the
    model ids it serves. Called once per plugin at load time.
    """


@hookspec
def qi_register_commands(register: Register) -> None:
    """Register ``qi`` sub-commands: ``register(name, configure, *, help="", aliases=())``.

    ``configure(parser)`` receives the sub-command's ``argparse.ArgumentParser``, adds its arguments and calls
    ``parser.set_defaults(func=run)`` where ``run(args) -> int`` is the exit status. Import heavy modules
    inside ``run``. Called once per plugin at load time.
    """


@hookspec
def qi_register_guiders(register: Register) -> None:
    """Register guiders: ``register(name, factory, *, aliases=())``.

    ``factory()`` returns an object implementing :class:`qi_core.protocols.Guider`: ``sides(params)`` names
    the denoiser passes a step needs (``("positive", "negative")`` or ``("positive",)``) and
    ``combine(preds, *, params, step, sigma)`` turns the per-side predictions into one velocity. Chosen by
    ``qi.compose(..., guidance=NAME)`` and per call by ``guidance=NAME``. Called once per plugin at load time.
    """


@hookspec
def qi_register_samplers(register: Register) -> None:
    """Register samplers: ``register(name, factory, *, aliases=())``.

    ``factory()`` returns an object implementing :class:`qi_core.protocols.Sampler`:
    ``sample(velocity, latents, sigmas, *, state) -> latents`` integrates from ``sigmas[0]`` to ``sigmas[-1]``
    (``num_inference_steps + 1`` entries), calling ``velocity(latents, i, sigma)`` for the guided velocity of
    step ``i`` at ``sigma`` and ``state.step_done(i, latents)`` after each step. Chosen by
    ``qi.compose(..., sampler=NAME)`` and per call by ``sampler=NAME``. Called once per plugin at load time.
    """


@hookspec
def qi_register_step_runners(register: Register) -> None:
    """Register step runners: ``register(name, factory, *, aliases=())``.

    ``factory()`` returns an object implementing :class:`qi_core.protocols.StepRunner`:
    ``run(denoiser, inputs, *, state, step, sigma) -> {side: prediction}`` evaluates the denoiser on one
    step's per-side :class:`qi_core.protocols.DenoiseInput` s (together, one by one, from a cache, or spread
    over devices). Chosen by ``qi.compose(..., step_runner=NAME)``. Called once per plugin at load time.
    """


@hookspec
def qi_register_attention(register: Register) -> None:
    """Register attention backends: ``register(name, backend, *, aliases=())``.

    ``backend(q, k, v, mask) -> out`` with ``q``, ``k``, ``v`` of shape (B, H, S, D) and ``mask`` None, a
    boolean keep-mask or an additive float mask broadcastable to (B, H, S, S); returns (B, H, S, D). Chosen
    by ``qi.compose(..., attention=NAME)``; a denoiser with ``set_attention(backend)`` receives it.
    Called once per plugin at load time.
    """


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
    """A ``qi NAME`` sub-command: ``configure(parser)``; ``help`` is its line in ``qi --help``."""


def register_attention(name: str, backend: Factory, *, aliases: Sequence[str] = ()) -> None:
    """An attention backend ``backend(q, k, v, mask) -> out``."""


HOOKS: tuple[str, ...] = (
    "qi_register_encoders",
    "qi_register_denoisers",
    "qi_register_injectors",
    "qi_register_schedulers",
    "qi_register_memory_policies",
    "qi_register_training_tasks",
    "qi_register_adapters",
    "qi_register_pipelines",
    "qi_register_commands",
    "qi_register_guiders",
    "qi_register_samplers",
    "qi_register_step_runners",
    "qi_register_attention",
)

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
}

# hook name -> the signature of the ``register`` it receives
REGISTER: dict[str, Callable[..., None]] = {
    hook: {"encoder": register_encoder, "pipeline": register_pipeline, "command": register_command,
           "attention": register_attention}.get(kind, register_part)
    for hook, kind in HOOK_KINDS.items()
}  # fmt: skip


def plain_signature(sig: inspect.Signature) -> str:
    """A signature as the docs write it, without annotations: ``(name, factory, *, role, aliases=())``."""
    params = [p.replace(annotation=p.empty) for p in sig.parameters.values() if p.name != "self"]
    return str(sig.replace(parameters=params, return_annotation=sig.empty))
