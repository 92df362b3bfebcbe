"""i2L plugin: images → a LoRA for the Qwen-Image DiT (DiffSynth-Studio's Qwen-Image-i2L).

    from qi_plugins.i2l import load_i2l, I2LEncoder, decode, save_lora
    enc = I2LEncoder.load("General-Image-Encoders/SigLIP2-G384", "General-Image-Encoders/DINOv3-7B")
    lora = decode([load_i2l("Qwen-Image-i2L-Style.safetensors")], enc.embed(images))
    save_lora(lora, "style.safetensors")   # then LoRA("style.safetensors").apply(pipe) on any Qwen-Image pipeline

or in one step ``qi.compose("qwen-image", adapters=[ImageToLoRA(images, encoder=enc)])``, or
``qi i2l IMAGES... --out lora.safetensors``. Registration is cheap: the model and the encoders are imported
on first attribute access.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_core.plugin_host import lazy_attributes

QI_HOOK_API = 1
QI_REQUIRES = ("qwen_image", "lora")  # the base text encoder; its output is a LoRA of the LoRA plugin

_LAZY = {
    "Image2LoRA": "qi_plugins.i2l.model",
    "I2LConfig": "qi_plugins.i2l.model",
    "load_i2l": "qi_plugins.i2l.model",
    "decode": "qi_plugins.i2l.model",
    "merge_loras": "qi_plugins.i2l.model",
    "save_lora": "qi_plugins.i2l.model",
    "I2LEncoder": "qi_plugins.i2l.encoders",
    "ImageToLoRA": "qi_plugins.i2l.adapter",
}
__all__ = sorted(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)


@hookimpl
def qi_register_commands(register):
    from qi_plugins.i2l.cli import configure

    register("i2l", configure, help="turn images into a LoRA for the Qwen-Image DiT (image-to-LoRA)")
