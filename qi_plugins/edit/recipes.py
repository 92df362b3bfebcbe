"""Recipes of the edit models. Light: no torch here (imported at plugin registration)."""

from __future__ import annotations

import importlib.util
from typing import Any

from qi_core.recipe import Component, Recipe
from qi_plugins.qwen_image import COMPONENTS as BASE_COMPONENTS
from qi_plugins.qwen_image.names import INPUT_IMAGE, SCHEDULER

PROCESSOR_PART = "qwen2-vl-processor"
COMPONENTS = {**BASE_COMPONENTS, "processor": Component(part=PROCESSOR_PART, subfolder="processor")}
INJECTORS = (INPUT_IMAGE, "edit-image")  # img2img / inpaint work with the edit models too, as in DiffSynth
LOWRES_FIX_LORA = "DiffSynth-Studio/Qwen-Image-Edit-Lowres-Fix"  # its model.safetensors, fused with alpha 1
LOWRES_FIX_FILE = "model.safetensors"
LOWRES_FIX_ADAPTER = "qwen-image-edit-lowres-fix-lora"


def lora_plugin_available() -> bool:
    """Whether the LoRA plugin's adapter module exists (it is written separately and may be absent)."""
    try:
        return importlib.util.find_spec("qi_plugins.lora.adapter") is not None
    except (ImportError, ValueError):
        return False


def lowres_fix_lora() -> Any:
    """The Lowres-Fix LoRA as an adapter of the LoRA plugin (imported on first use)."""
    from qi_plugins.lora.adapter import LoRA

    return LoRA(f"{LOWRES_FIX_LORA}:{LOWRES_FIX_FILE}", 1.0, name=LOWRES_FIX_ADAPTER)


def recipes(with_lora: bool) -> list[Recipe]:
    def edit(name: str, description: str, model: str, defaults: dict[str, Any] | None = None,
             adapters: tuple[str, ...] = (), model_ids: tuple[str, ...] | None = None) -> Recipe:  # fmt: skip
        return Recipe(
            name=name,
            description=description,
            components=COMPONENTS,
            scheduler=SCHEDULER,
            injectors=INJECTORS,
            required=("edit_image",),
            adapters=adapters,
            # DiffSynth-Studio's call defaults, plus what defines the variant
            defaults={
                "num_inference_steps": 30,
                "cfg_scale": 4.0,
                "height": 1328,
                "width": 1328,
                **(defaults or {}),
            },
            model=model,
            model_ids=model_ids or (model,),
            tiny="qi_plugins.edit.tiny:make_tiny_edit_model",
        )

    return [
        edit(
            "qwen-image-edit",
            "Qwen-Image-Edit: edit one image (edit_image) by instruction",
            "Qwen/Qwen-Image-Edit",
            defaults={"edit_image_form": "single"},
        ),
        edit(
            "qwen-image-edit-2509",
            "Qwen-Image-Edit-2509: multi-image editing (edit_image=[...], 'Picture N:' prompt)",
            "Qwen/Qwen-Image-Edit-2509",
            defaults={"edit_image_form": "list"},
        ),
        edit(
            "qwen-image-edit-2511",
            "Qwen-Image-Edit-2511: multi-image editing, reference tokens modulated at t = 0 (zero_cond_t)",
            "Qwen/Qwen-Image-Edit-2511",
            defaults={"zero_cond_t": True, "edit_image_form": "list"},
        ),
        edit(
            "qwen-image-edit-lowres-fix",
            "Qwen-Image-Edit + Lowres-Fix LoRA: low-resolution edit images placed on the output RoPE grid"
            + ("" if with_lora else " (LoRA not applied: the lora plugin is not installed)"),
            "Qwen/Qwen-Image-Edit",
            defaults={"edit_rope_interpolation": True, "edit_image_form": "single"},
            adapters=(LOWRES_FIX_ADAPTER,) if with_lora else (),
            model_ids=(LOWRES_FIX_LORA,),  # the base weights are Qwen-Image-Edit's
        ),
    ]
