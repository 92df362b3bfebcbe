"""Lightning plugin: the "Qwen-Image-Lightning" schedule (μ = ln 3, no terminal stretch), the ``lightning``
adapter (fuses lightx2v's few-step LoRA, sets 8 or 4 steps and cfg 1, switches the schedule) and the recipes
``qwen-image-lightning`` and ``qwen-image-edit-2511-lightning``.

    pipe = qi.compose("qwen-image", adapters=["lightning"])         # or qi.compose("qwen-image-lightning")
    pipe = qi.compose("qwen-image", adapters=[LightningAdapter(lora="my-lightning.safetensors", steps=4)])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from qi_core.hookspecs import hookimpl
from qi_core.recipe import Component, Recipe
from qi_plugins.qwen_image.names import DIT, INPUT_IMAGE, TEXT_ENCODER, VAE

QI_HOOK_API = 1
QI_REQUIRES = ("qwen_image", "lora")  # the base parts and schedule; its LoRAs are preset LoRAs
_P = "qi_plugins.lightning.parts"

BASE_COMPONENTS = {
    "text_encoder": Component(part=TEXT_ENCODER, subfolder="text_encoder"),
    "dit": Component(part=DIT, subfolder="transformer", kind="denoiser"),
    "vae": Component(part=VAE, subfolder="vae"),
}


class BorrowedComponents(Mapping):
    """The components of another registered recipe, looked up when a pipeline is composed.

    Edit-2511-Lightning loads exactly what Edit-2511 loads (the edit plugin owns those part names, e.g. its
    ``processor``); borrowing them by recipe name keeps the two plugins independent of each other's internals
    and of plugin load order.
    """

    def __init__(self, recipe: str):
        self.recipe = recipe

    def _components(self) -> Mapping[str, Component]:
        from qi_core.errors import PluginError, UnknownNameError
        from qi_core.plugin_host import host

        try:
            return host().registry.get("pipeline", self.recipe).load().components
        except UnknownNameError:
            raise PluginError(
                f"this pipeline loads the components of {self.recipe!r}, which is not registered; install or "
                "enable the plugin that provides it (see `qi plugins`)"
            ) from None

    def __getitem__(self, role: str) -> Component:
        return self._components()[role]

    def __iter__(self) -> Iterator[str]:
        return iter(self._components())

    def __len__(self) -> int:
        return len(self._components())

    def __repr__(self) -> str:
        return f"BorrowedComponents({self.recipe!r})"


def __getattr__(name: str):  # lazy: registration must not import torch
    if name in ("LightningAdapter", "LIGHTNING_LORAS", "lightning_lora"):
        import importlib

        return getattr(importlib.import_module("qi_plugins.lightning.parts"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def qi_register_schedulers(register):
    register("qwen-image-lightning", f"{_P}:scheduler")


@hookimpl
def qi_register_adapters(register):
    register("lightning", f"{_P}:LightningAdapter")


@hookimpl
def qi_register_pipelines(register):
    register(
        Recipe(
            name="qwen-image-lightning",
            description="Qwen-Image with the Lightning LoRA fused: 8 steps (or 4), cfg 1, μ = ln 3 schedule",
            components=BASE_COMPONENTS,
            scheduler="qwen-image-lightning",
            injectors=(INPUT_IMAGE,),
            adapters=("lightning",),
            defaults={"num_inference_steps": 8, "cfg_scale": 1.0, "height": 1328, "width": 1328},
            model="Qwen/Qwen-Image",
            model_ids=("lightx2v/Qwen-Image-Lightning",),
            tiny="qi_plugins.lightning.tiny:make_tiny_lightning_model",
        )
    )
    register(
        Recipe(
            name="qwen-image-edit-2511-lightning",
            description="Qwen-Image-Edit-2511 with its Lightning LoRA fused: 4 steps, cfg 1 (needs the edit plugin)",
            components=BorrowedComponents("qwen-image-edit-2511"),
            scheduler="qwen-image-lightning",
            injectors=(INPUT_IMAGE, "edit-image"),
            adapters=("lightning",),
            defaults={
                "num_inference_steps": 4,
                "cfg_scale": 1.0,
                "zero_cond_t": True,
                "edit_image_form": "list",
            },
            model="Qwen/Qwen-Image-Edit-2511",
            model_ids=("lightx2v/Qwen-Image-Edit-2511-Lightning",),
            tiny="qi_plugins.lightning.tiny:make_tiny_lightning_model",
        )
    )
