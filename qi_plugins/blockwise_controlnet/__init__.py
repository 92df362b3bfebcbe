"""Blockwise ControlNet plugin (Canny, Depth, Inpaint): the ControlNet model as an extra pipeline component, the
``blockwise-controlnet`` injector (``blockwise_controlnet_inputs``) and one recipe per released ControlNet.

The ControlNets come from their own repositories (``model.safetensors``); pass local files, in ``controlnet_id``
order, with ``qi.compose(..., components={"blockwise_controlnet": [file0, file1, ...]})``.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_core.recipe import Component, Recipe
from qi_plugins.qwen_image import COMPONENTS as BASE_COMPONENTS
from qi_plugins.qwen_image.names import INPUT_IMAGE, SCHEDULER

QI_HOOK_API = 1
QI_REQUIRES = ("qwen_image",)  # the base text encoder, DiT, VAE and schedule
_P = "qi_plugins.blockwise_controlnet"
PART = "qwen-image-blockwise-controlnet"

# (recipe suffix, hub id, description, defaults from DiffSynth-Studio's example scripts)
_VARIANTS = (
    ("canny", "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Canny", "Canny-edge control",
     {"num_inference_steps": 30, "cfg_scale": 4.0, "height": 1328, "width": 1328}),
    ("depth", "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Depth", "depth-map control",
     {"num_inference_steps": 30, "cfg_scale": 4.0, "height": 1328, "width": 1328}),
    ("inpaint", "DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Inpaint",
     "inpainting control (ControlNetInput with inpaint_mask)",
     {"num_inference_steps": 40, "cfg_scale": 4.0, "height": 1024, "width": 1024}),
)  # fmt: skip


@hookimpl
def qi_register_encoders(register):
    register(PART, f"{_P}.model:controlnets", role="blockwise_controlnet")


@hookimpl
def qi_register_injectors(register):
    register("blockwise-controlnet", f"{_P}.injector:BlockwiseControlNetInjector")


@hookimpl
def qi_register_pipelines(register):
    for suffix, hub_id, what, defaults in _VARIANTS:
        register(
            Recipe(
                name=f"qwen-image-blockwise-controlnet-{suffix}",
                description=f"Qwen-Image with a blockwise ControlNet: {what}",
                components={
                    **BASE_COMPONENTS,
                    "blockwise_controlnet": Component(
                        part=PART, subfolder=None, model=hub_id, pattern="model.safetensors", required=False
                    ),
                },
                scheduler=SCHEDULER,
                injectors=(INPUT_IMAGE, "blockwise-controlnet"),
                defaults=defaults,
                model="Qwen/Qwen-Image",
                model_ids=(hub_id,),
                tiny="qi_plugins.blockwise_controlnet.tiny:make_tiny_controlnet_model",
            )
        )
