"""DiffSynth-Studio compatible front: run DiffSynth user code on qi by changing one import line.

    # from diffsynth.pipelines.qwen_image import QwenImagePipeline, ModelConfig, ControlNetInput
    from qi_plugins.diffsynth_compat import QwenImagePipeline, ModelConfig, ControlNetInput

``QwenImagePipeline.from_pretrained(...)`` resolves the ``ModelConfig`` s the DiffSynth way (``./models`` or
``DIFFSYNTH_MODEL_BASE_PATH``, ``DIFFSYNTH_SKIP_DOWNLOAD``, ``DIFFSYNTH_DOWNLOAD_SOURCE``, ModelScope), picks
the recipe the variant plugins registered for those model ids and composes it; ``pipe(prompt, ...)`` takes
DiffSynth's call parameters (plus ``output_type``); ``pipe.load_lora(pipe.dit, path, alpha=...)`` goes through
the LoRA plugin. ``load_state_dict`` and ``merge_lora`` are the helpers DiffSynth's examples import beside the
pipeline. The plugin also registers ``qi migrate-diffsynth`` (rewrites those import lines).

Registration is cheap: the pipeline (and torch) load on first attribute access.
"""

from __future__ import annotations

from typing import Any

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = ("qwen_image", "memory")  # base schedule/model; VRAM settings are memory policies

_LAZY = {
    "QwenImagePipeline": "qi_plugins.diffsynth_compat.pipeline",
    "FlowMatchScheduler": "qi_plugins.diffsynth_compat.pipeline",
    "ModelConfig": "qi_plugins.diffsynth_compat.config",
    "ControlNetInput": "qi_plugins.blockwise_controlnet.inputs",  # the blockwise ControlNet plugin's
    # helpers DiffSynth's examples import from diffsynth.core / diffsynth / diffsynth.utils.lora
    "load_state_dict": "qi_plugins.diffsynth_compat.helpers",
    "merge_lora": "qi_plugins.diffsynth_compat.helpers",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as e:
            raise ImportError(f"{name} needs {_LAZY[name]} (a qi plugin that is not installed): {e}") from e
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@hookimpl
def qi_register_commands(register):
    register(
        "migrate-diffsynth",
        "qi_plugins.diffsynth_compat.cli:configure",
        help="rewrite DiffSynth-Studio Qwen-Image imports in Python files to qi's compatible front",
    )
