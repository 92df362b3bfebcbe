"""The Lightning schedule and adapter (imported when used)."""

from __future__ import annotations

import math
from typing import Any

from qi_plugins.lora.preset import PresetLoRA
from qi_plugins.qwen_image.scheduler import FlowMatchSchedule

# lightx2v's LoRAs per pipeline (longest matching name prefix wins): (hub id, file with {steps}, default steps).
# Qwen-Image: huggingface.co/lightx2v/Qwen-Image-Lightning (V1.0, 4 and 8 steps; also on ModelScope);
# Edit-2511: DiffSynth-Studio's example examples/qwen_image/model_inference/Qwen-Image-Edit-2511-Lightning.py.
LIGHTNING_LORAS: dict[str, tuple[str, str, int]] = {
    "qwen-image": ("lightx2v/Qwen-Image-Lightning", "Qwen-Image-Lightning-{steps}steps-V1.0.safetensors", 8),
    "qwen-image-edit": (
        "lightx2v/Qwen-Image-Lightning",
        "Qwen-Image-Edit-Lightning-{steps}steps-V1.0.safetensors",
        8,
    ),
    "qwen-image-edit-2511": (
        "lightx2v/Qwen-Image-Edit-2511-Lightning",
        "Qwen-Image-Edit-2511-Lightning-{steps}steps-V1.0-bf16.safetensors",
        4,
    ),
}


def scheduler() -> FlowMatchSchedule:
    """ "Qwen-Image-Lightning": μ = ln 3 whatever the resolution (unless exponential_shift_mu), no stretch."""
    return FlowMatchSchedule("qwen-image-lightning", fixed_mu=math.log(3), shift_terminal=None)


def lightning_lora(pipeline: str) -> tuple[str, str, int]:
    """The Lightning LoRA entry for a pipeline name (``qwen-image-edit-2511-lightning`` → Edit-2511's)."""
    name = pipeline.removesuffix("-lightning")
    best = max((k for k in LIGHTNING_LORAS if name == k or name.startswith(k + "-")), key=len, default=None)
    return LIGHTNING_LORAS[best or "qwen-image"]


class LightningAdapter(PresetLoRA):
    """Lightning: fuse lightx2v's few-step LoRA, set 8 (or 4) steps and cfg 1, switch to the μ = ln 3 schedule.

    ``LightningAdapter()`` picks the LoRA for the pipeline it is applied to (see :data:`LIGHTNING_LORAS`);
    ``LightningAdapter(lora="file.safetensors", steps=4)`` uses a local LoRA instead.
    """

    name = "lightning"
    steps_choices = (4, 8)
    scheduler = "qwen-image-lightning"

    def pick_steps(self, pipe: Any) -> int:
        return self.steps if self.steps is not None else lightning_lora(pipe.name)[2]

    def hub_file(self, pipe: Any, steps: int) -> tuple[str, str]:
        model_id, file, _ = lightning_lora(pipe.name)
        return model_id, file
