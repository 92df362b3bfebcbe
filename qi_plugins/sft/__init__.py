"""Training: the trainer behind ``qi train`` / ``qi validate`` and its tasks, ``sft`` (flow matching with
DiffSynth's timestep weighting) and ``direct_distill``, as plugins of the training-task hook.

    qi train --dataset_base_path data --dataset_metadata_path data/metadata.csv --model Qwen/Qwen-Image \\
        --lora_base_model dit --lora_rank 32 --output_path out
    qi validate "a dog" --model Qwen/Qwen-Image --checkpoint out --out dog.png

    from qi_plugins.sft import make_args, train
    result = train(make_args(dataset_base_path="data", dataset_metadata_path="data/metadata.csv",
                             lora_base_model="dit", output_path="out"))

The core holds only the contract (:class:`qi_core.protocols.TrainingTask`, :mod:`qi_core.conditioning`,
:mod:`qi_core.sizing`). Here: ``args`` (DiffSynth's ``train.py`` arguments), ``data`` (metadata, datasets),
``batching``, ``plan`` (the deterministic epoch order), ``models`` (sources, what is trained, fp8 storage),
``trainer`` (the loop, accelerate), ``checkpoint``, ``metrics``, ``tasks``, ``cli``, ``validate``.

Registration is cheap: nothing heavy is imported until a task or command runs.
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl
from qi_core.plugin_host import lazy_attributes

QI_HOOK_API = 1
# trainable LoRAs and LoRA files through the LoRA plugin; fp8 storage with the memory plugin's quantiser;
# ORG/NAME:pattern sources as DiffSynth's ModelConfig
QI_REQUIRES = ("lora", "memory", "diffsynth_compat")
_T = "qi_plugins.sft.tasks"

_LAZY = {
    "train": "qi_plugins.sft.trainer",
    "TrainResult": "qi_plugins.sft.trainer",
    "TrainArgs": "qi_plugins.sft.args",
    "make_args": "qi_plugins.sft.args",
    "QWEN_LORA_TARGETS": "qi_plugins.sft.args",
    "SFT": _T,
    "DirectDistill": _T,
    "load_trained": "qi_plugins.sft.validate",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)


@hookimpl
def qi_register_training_tasks(register):
    register("sft", f"{_T}:SFT")
    register("direct_distill", f"{_T}:DirectDistill")


@hookimpl
def qi_register_commands(register):
    from qi_plugins.sft import cli

    register(
        "train",
        cli.configure_train,
        help="train a LoRA or the full DiT (DiffSynth-Studio's train.py arguments)",
    )
    register(
        "validate", cli.configure_validate, help="generate with what `qi train` saved (LoRA or DiT weights)"
    )
