"""In-Context-Control-Union plugin: the ``context-image`` injector (``context_image`` as extra image tokens), the
``context-control-prefix`` injector (``"Context_Control. "`` before the prompt) and the recipe
``qwen-image-in-context-control-union`` (both injectors + its LoRA, a recipe component fused by the
``in-context-lora`` adapter; ``components={"lora": []}`` runs without it).
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_core.recipe import Component, Recipe
from qi_plugins.eligen import NEGATIVE_PROMPT_ZH  # the In-Context example's negative prompt too
from qi_plugins.qwen_image import COMPONENTS as BASE_COMPONENTS
from qi_plugins.qwen_image.names import INPUT_IMAGE, SCHEDULER

QI_HOOK_API = 1
QI_REQUIRES = ("qwen_image", "eligen")  # the base parts; the LoRA-as-component helper is EliGen's
_P = "qi_plugins.in_context"
LORA_ID = "DiffSynth-Studio/Qwen-Image-In-Context-Control-Union"


@hookimpl
def qi_register_encoders(register):
    # the LoRA-as-component helper is shared with the EliGen plugin (same distribution)
    register("in-context-lora", "qi_plugins.eligen.lora_slot:lora_files", role="lora")


@hookimpl
def qi_register_injectors(register):
    register("context-image", f"{_P}.injector:ContextImage")
    register("context-control-prefix", f"{_P}.injector:ContextControlPrefix")


@hookimpl
def qi_register_adapters(register):
    register("in-context-lora", "qi_plugins.eligen.lora_slot:ComponentLoRA")


@hookimpl
def qi_register_pipelines(register):
    register(
        Recipe(
            name="qwen-image-in-context-control-union",
            description="In-Context-Control-Union: a control image (canny, depth, pose …) as context tokens",
            components={
                **BASE_COMPONENTS,
                "lora": Component(
                    part="in-context-lora", subfolder=None, model=LORA_ID, pattern="model.safetensors",
                    required=False,
                ),
            },
            scheduler=SCHEDULER,
            injectors=(INPUT_IMAGE, "context-image", "context-control-prefix"),
            adapters=("in-context-lora",),
            defaults={"num_inference_steps": 30, "cfg_scale": 4.0, "height": 1024, "width": 1024,
                      "negative_prompt": NEGATIVE_PROMPT_ZH},
            model="Qwen/Qwen-Image",
            model_ids=(LORA_ID,),
            tiny="qi_plugins.in_context.tiny:make_tiny_in_context_model",
        )
    )  # fmt: skip
