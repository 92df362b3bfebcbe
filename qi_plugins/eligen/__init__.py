"""EliGen plugin (V1, V2, Poster): regional entity prompts with a joint attention mask (the ``eligen`` injector:
``eligen_entity_prompts``, ``eligen_entity_masks``, ``eligen_enable_on_negative``) and one recipe per released
LoRA. The LoRA is a recipe component fused by the ``eligen-lora`` adapter; ``components={"lora": []}`` runs
the injector on the plain base model.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_core.recipe import Component, Recipe
from qi_plugins.qwen_image import COMPONENTS as BASE_COMPONENTS
from qi_plugins.qwen_image.names import INPUT_IMAGE, SCHEDULER

QI_HOOK_API = 1
QI_REQUIRES = ("qwen_image", "lora")  # the base parts; the entity LoRAs are fused as LoRAs
_P = "qi_plugins.eligen"

# The negative prompt of DiffSynth-Studio's EliGen-V2 / Poster (and In-Context) example scripts.
NEGATIVE_PROMPT_ZH = (
    "网格化，规则的网格，模糊, 低分辨率, 低质量, 变形, 畸形, 错误的解剖学, 变形的手, 变形的身体, 变形的脸, "
    "变形的头发, 变形的眼睛, 变形的嘴巴"
)

# (recipe name, LoRA repository, description, defaults from the example scripts)
_VARIANTS = (
    ("qwen-image-eligen", "DiffSynth-Studio/Qwen-Image-EliGen", "EliGen V1",
     {"num_inference_steps": 30, "cfg_scale": 4.0, "height": 1024, "width": 1024, "negative_prompt": ""}),
    ("qwen-image-eligen-v2", "DiffSynth-Studio/Qwen-Image-EliGen-V2", "EliGen V2",
     {"num_inference_steps": 40, "cfg_scale": 4.0, "height": 1024, "width": 1024,
      "negative_prompt": NEGATIVE_PROMPT_ZH}),
    ("qwen-image-eligen-poster", "DiffSynth-Studio/Qwen-Image-EliGen-Poster", "EliGen-Poster",
     {"num_inference_steps": 40, "cfg_scale": 4.0, "height": 784, "width": 1280,
      "negative_prompt": NEGATIVE_PROMPT_ZH}),
)  # fmt: skip


@hookimpl
def qi_register_encoders(register):
    register("eligen-lora", f"{_P}.lora_slot:lora_files", role="lora")


@hookimpl
def qi_register_injectors(register):
    register("eligen", f"{_P}.injector:EliGen")


@hookimpl
def qi_register_adapters(register):
    register("eligen-lora", f"{_P}.lora_slot:ComponentLoRA")


@hookimpl
def qi_register_pipelines(register):
    for name, lora_id, what, defaults in _VARIANTS:
        register(
            Recipe(
                name=name,
                description=f"{what}: regional entity prompts and masks (Qwen-Image + LoRA {lora_id})",
                components={
                    **BASE_COMPONENTS,
                    "lora": Component(
                        part="eligen-lora",
                        subfolder=None,
                        model=lora_id,
                        pattern="model.safetensors",
                        required=False,
                    ),
                },
                scheduler=SCHEDULER,
                injectors=(INPUT_IMAGE, "eligen"),
                adapters=("eligen-lora",),
                defaults=defaults,
                model="Qwen/Qwen-Image",
                model_ids=(lora_id,),
                tiny="qi_plugins.eligen.tiny:make_tiny_eligen_model",
            )
        )
