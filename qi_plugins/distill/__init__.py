"""Distill plugin: DiffSynth-Studio's 15-step, cfg-1 distillations of Qwen-Image.

* ``qwen-image-distill-lora``: Qwen-Image + the Distill-LoRA fused (adapter ``distill-lora``, also composable
  onto ``qwen-image`` by name).
* ``qwen-image-distill-full``: the fully distilled DiT weights (``DiffSynth-Studio/Qwen-Image-Distill-Full``)
  with the text encoder and VAE of Qwen-Image.

Both keep the "Qwen-Image" schedule (DiffSynth's examples do).
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_core.recipe import Component, Recipe
from qi_plugins.qwen_image.names import DIT, INPUT_IMAGE, SCHEDULER, TEXT_ENCODER, VAE

QI_HOOK_API = 1
QI_REQUIRES = ("qwen_image", "lora")  # the base parts; the Distill-LoRA is a preset LoRA
_P = "qi_plugins.distill.parts"

DEFAULTS = {"num_inference_steps": 15, "cfg_scale": 1.0, "height": 1328, "width": 1328}
BASE = {
    "text_encoder": Component(part=TEXT_ENCODER, subfolder="text_encoder"),
    "dit": Component(part=DIT, subfolder="transformer", kind="denoiser"),
    "vae": Component(part=VAE, subfolder="vae"),
}


def __getattr__(name: str):  # lazy: registration must not import torch
    if name in ("DistillLoRA", "dit_weights"):
        import importlib

        return getattr(importlib.import_module("qi_plugins.distill.parts"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def qi_register_denoisers(register):
    register("qwen-image-dit-weights", f"{_P}:dit_weights")


@hookimpl
def qi_register_adapters(register):
    register("distill-lora", f"{_P}:DistillLoRA")


@hookimpl
def qi_register_pipelines(register):
    register(
        Recipe(
            name="qwen-image-distill-lora",
            description="Qwen-Image + Distill-LoRA fused: 15 steps, cfg 1",
            components=BASE,
            scheduler=SCHEDULER,
            injectors=(INPUT_IMAGE,),
            adapters=("distill-lora",),
            defaults=DEFAULTS,
            model="Qwen/Qwen-Image",
            model_ids=("DiffSynth-Studio/Qwen-Image-Distill-LoRA",),
            tiny="qi_plugins.distill.tiny:make_tiny_distill_model",
        )
    )
    register(
        Recipe(
            name="qwen-image-distill-full",
            description="Qwen-Image-Distill-Full: fully distilled DiT, 15 steps, cfg 1",
            components={
                **BASE,
                # the distilled DiT sits at the root of its own repository, sharded
                "dit": Component(
                    part="qwen-image-dit-weights",
                    subfolder=None,
                    kind="denoiser",
                    model="DiffSynth-Studio/Qwen-Image-Distill-Full",
                    pattern="diffusion_pytorch_model*",
                ),  # fmt: skip
            },
            scheduler=SCHEDULER,
            injectors=(INPUT_IMAGE,),
            defaults=DEFAULTS,
            model="Qwen/Qwen-Image",
            model_ids=("DiffSynth-Studio/Qwen-Image-Distill-Full",),
            tiny="qi_plugins.distill.tiny:make_tiny_distill_model",
        )
    )
