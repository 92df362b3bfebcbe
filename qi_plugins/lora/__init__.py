"""LoRA plugin: read, apply (fused or as branches) and convert LoRAs in the DiffSynth, PEFT/diffusers, kohya
and ComfyUI layouts; the ``qi lora convert`` command.

    from qi_plugins.lora import LoRA
    pipe = qi.compose("qwen-image", model=..., adapters=[LoRA("style.safetensors", scale=0.8)])

Registration is cheap: ``LoRA`` and friends are imported on first attribute access.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_core.plugin_host import lazy_attributes

QI_HOOK_API = 1
QI_REQUIRES = ()

_LAZY = {
    "LoRA": "qi_plugins.lora.adapter",
    "LoRABranches": "qi_plugins.lora.adapter",
    "load_lora": "qi_plugins.lora.adapter",
    "LoRAWeight": "qi_plugins.lora.formats",
    "LoRAFormatError": "qi_plugins.lora.formats",
    "read_lora": "qi_plugins.lora.formats",
    "detect_format": "qi_plugins.lora.formats",
    "to_format": "qi_plugins.lora.formats",
    "convert_file": "qi_plugins.lora.formats",
    "FORMATS": "qi_plugins.lora.formats",
    "PresetLoRA": "qi_plugins.lora.preset",
}
__all__ = sorted(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)


@hookimpl
def qi_register_commands(register):
    from qi_plugins.lora.cli import configure

    register(
        "lora", configure, help="convert LoRA files between the DiffSynth, PEFT, kohya and ComfyUI layouts"
    )
