"""``layered-control-v2``: the Layered-Control-V2 LoRA on the Layered-Control DiT, with its 10 steps.

DiffSynth-Studio's example fuses ``DiffSynth-Studio/Qwen-Image-Layered-Control-V2:model.safetensors`` into the
Layered-Control DiT and runs 10 steps (cfg 4 with a text prompt; cfg 1 with a brush-mask ``context_image``).
"""

from __future__ import annotations

from qi_plugins.lora.preset import PresetLoRA


class LayeredControlV2(PresetLoRA):
    name = "layered-control-v2"
    model_id = "DiffSynth-Studio/Qwen-Image-Layered-Control-V2"
    file = "model.safetensors"
    default_steps = 10
    call_defaults = {}  # cfg stays the recipe's 4; pass cfg_scale=1.0 with a brush mask, as the example does
