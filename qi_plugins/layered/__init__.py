"""Layered plugin: Qwen-Image-Layered (decompose an RGBA image into the composite and ``layer_num`` layers)
and Qwen-Image-Layered-Control (one layer chosen by the prompt, optionally by a brush mask ``context_image``).

Parts: the ``qwen-image-layered-dit`` denoiser (the base DiT + ``addition_t_embedding`` + layer-3D RoPE), the
``layered`` injector, the two recipes, the ``layered-control-v2`` adapter (its LoRA, 10 steps) and the
``qi layered`` command. The RGBA VAE is the base VAE part
(``input_channels: 4`` in its config). Registration only names factories; nothing heavy is imported here.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_core.recipe import Component, Recipe
from qi_plugins.qwen_image.names import SCHEDULER, TEXT_ENCODER, VAE

QI_HOOK_API = 1
QI_REQUIRES = ("qwen_image", "lora")  # its DiT extends the base one; Control-V2 is a preset LoRA

LAYERED_MODEL = "Qwen/Qwen-Image-Layered"
CONTROL_MODEL = "DiffSynth-Studio/Qwen-Image-Layered-Control"
DIT = Component(part="qwen-image-layered-dit", subfolder="transformer", kind="denoiser")


@hookimpl
def qi_register_denoisers(register):
    register("qwen-image-layered-dit", "qi_plugins.layered.dit:dit")


@hookimpl
def qi_register_injectors(register):
    register("layered", "qi_plugins.layered.injector:LayeredInjector")


@hookimpl
def qi_register_adapters(register):
    register("layered-control-v2", "qi_plugins.layered.adapters:LayeredControlV2")


@hookimpl
def qi_register_pipelines(register):
    register(
        Recipe(
            name="qwen-image-layered",
            description="Qwen-Image-Layered: an RGBA image → the composite + layer_num RGBA layers",
            components={
                "text_encoder": Component(part=TEXT_ENCODER, subfolder="text_encoder"),
                "dit": DIT,
                "vae": Component(part=VAE, subfolder="vae"),  # RGBA: input_channels 4
            },
            scheduler=SCHEDULER,
            injectors=("layered",),
            required=("layer_input_image",),
            # DiffSynth's example: 50 steps, layer_num 3, 864x480 (the input image's size)
            defaults={
                "num_inference_steps": 50,
                "cfg_scale": 4.0,
                "layer_num": 3,
                "height": 480,
                "width": 864,
            },
            model=LAYERED_MODEL,
            model_ids=(LAYERED_MODEL,),
            tiny="qi_plugins.layered.tiny:make_tiny_layered_model",
        )
    )
    register(
        Recipe(
            name="qwen-image-layered-control",
            description="Qwen-Image-Layered-Control: the layer the prompt (or a brush-mask context_image) names",
            components={
                # text encoder + tokenizer from the pipeline's model (Qwen/Qwen-Image)
                "text_encoder": Component(part=TEXT_ENCODER, subfolder="text_encoder"),
                "dit": Component(
                    part="qwen-image-layered-dit",
                    subfolder="transformer",
                    kind="denoiser",
                    model=CONTROL_MODEL,
                ),  # fmt: skip
                "vae": Component(part=VAE, subfolder="vae", model=LAYERED_MODEL),
            },
            scheduler=SCHEDULER,
            injectors=("layered",),
            required=("layer_input_image",),
            # DiffSynth's example: 1024², 30 steps, cfg 4, one output layer (V2 + mask: 10 steps, cfg 1)
            defaults={
                "num_inference_steps": 30,
                "cfg_scale": 4.0,
                "layer_num": 0,
                "height": 1024,
                "width": 1024,
            },
            model="Qwen/Qwen-Image",
            model_ids=(CONTROL_MODEL,),
            tiny="qi_plugins.layered.tiny:make_tiny_layered_control_model",
        )
    )


@hookimpl
def qi_register_commands(register):
    from qi_plugins.layered.cli import configure

    register("layered", configure, help="decompose an RGBA image into layers (one PNG per layer)")
