"""Edit plugin: Qwen-Image-Edit, Edit-2509 (multi-image), Edit-2511 (zero_cond_t), Edit-Lowres-Fix.

Registers the ``edit-image`` injector (``edit_image``, ``edit_image_auto_resize``, ``edit_rope_interpolation``,
``zero_cond_t``), the torch-only Qwen2-VL processor (``processor/`` of the Edit repositories) and the recipes
``qwen-image-edit``, ``qwen-image-edit-2509``, ``qwen-image-edit-2511`` and ``qwen-image-edit-lowres-fix``.
The DiT, VAE and text encoder are the base plugin's parts. Registration only names factories.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_plugins.edit.recipes import (
    LOWRES_FIX_ADAPTER,
    PROCESSOR_PART,
    lora_plugin_available,
    recipes,
)

QI_HOOK_API = 1
QI_REQUIRES = ("qwen_image", "lora")  # the base parts; the Lowres-Fix adapter is a LoRA


@hookimpl
def qi_register_encoders(register):
    register(PROCESSOR_PART, "qi_plugins.edit.vision:processor_factory", role="processor")


@hookimpl
def qi_register_injectors(register):
    register("edit-image", "qi_plugins.edit.injector:EditImage")


@hookimpl
def qi_register_adapters(register):
    if lora_plugin_available():
        register(LOWRES_FIX_ADAPTER, "qi_plugins.edit.recipes:lowres_fix_lora")


@hookimpl
def qi_register_pipelines(register):
    for recipe in recipes(with_lora=lora_plugin_available()):
        register(recipe)
