"""Base Qwen-Image plugin: the MMDiT, the VAE, the Qwen2.5-VL text encoder, the "Qwen-Image" schedule,
img2img and inpainting, and the ``qwen-image`` recipe (also serves Qwen-Image-2512 and Distill-Full weights).

Registration only names factories; nothing heavy is imported until a pipeline is composed.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_core.recipe import Component, Recipe
from qi_plugins.qwen_image.names import DIT, INPUT_IMAGE, RECIPE, SCHEDULER, TEXT_ENCODER, VAE

QI_HOOK_API = 1
QI_REQUIRES = ()  # the base plugin needs no other plugin
_P = "qi_plugins.qwen_image.parts"

COMPONENTS = {
    "text_encoder": Component(part=TEXT_ENCODER, subfolder="text_encoder"),
    "dit": Component(part=DIT, subfolder="transformer", kind="denoiser"),
    "vae": Component(part=VAE, subfolder="vae"),
}


@hookimpl
def qi_register_encoders(register):
    register(TEXT_ENCODER, f"{_P}:text_encoder", role="text_encoder")
    register(VAE, f"{_P}:vae", role="vae")


@hookimpl
def qi_register_denoisers(register):
    register(DIT, f"{_P}:dit")


@hookimpl
def qi_register_schedulers(register):
    register(SCHEDULER, f"{_P}:scheduler")


@hookimpl
def qi_register_injectors(register):
    register(INPUT_IMAGE, "qi_plugins.qwen_image.injectors:InputImage")


@hookimpl
def qi_register_pipelines(register):
    register(
        Recipe(
            name=RECIPE,
            description="Qwen-Image text-to-image, img2img and inpainting (also Qwen-Image-2512, Distill-Full)",
            components=COMPONENTS,
            scheduler=SCHEDULER,
            injectors=(INPUT_IMAGE,),
            defaults={"num_inference_steps": 30, "cfg_scale": 4.0, "height": 1328, "width": 1328},
            model="Qwen/Qwen-Image",
            tiny="qi_plugins.qwen_image.tiny:make_tiny_model",
            model_ids=("Qwen/Qwen-Image", "Qwen/Qwen-Image-2512", "DiffSynth-Studio/Qwen-Image-Distill-Full"),
        )
    )
