"""qi: run and train the Qwen-Image family of diffusion models.

    import qi_core as qi
    pipe = qi.compose("qwen-image", model="DIR or hub id", device="cpu")
    image = pipe(prompt="a red fox", seed=0, height=512, width=512)

Importing this package is cheap: torch loads when a pipeline is composed.
"""

from __future__ import annotations

from typing import Any

from qi_core import errors
from qi_core.hookspecs import HOOK_API_VERSION, hookimpl
from qi_core.plugin_host import host, register
from qi_core.recipe import Component, Recipe

__version__ = "0.1.0"

__all__ = [
    "HOOK_API_VERSION",
    "Component",
    "Recipe",
    "compose",
    "errors",
    "get_scheduler",
    "hookimpl",
    "pipelines",
    "plugins",
    "register",
    "register_plugin",
]


def compose(name: str, model: Any = None, **kwargs: Any) -> Any:
    from qi_core.composer import compose as _compose

    return _compose(name, model, **kwargs)


compose.__doc__ = "Build a pipeline from a registered recipe; see :func:`qi_core.composer.compose`."


def get_scheduler(name: str) -> Any:
    from qi_core.composer import get_scheduler as _get

    return _get(name)


def plugins() -> list[dict[str, Any]]:
    """Every plugin found (entry points and in-process), with distribution, version, hooks and status."""
    return [p.as_dict() for p in host().report()]


def pipelines() -> list[Recipe]:
    """Every registered recipe."""
    return [e.load() for e in host().registry.entries("pipeline")]


def register_plugin(plugin: object, name: str | None = None) -> Any:
    """Register an in-process plugin (a module or object with ``@qi.hookimpl`` functions)."""
    return host().register_plugin(plugin, name)
