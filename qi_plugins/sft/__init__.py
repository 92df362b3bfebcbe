"""Training tasks and commands: ``sft`` (flow matching with DiffSynth's timestep weighting) and
``direct_distill`` as plugins of the training-task hook, and the ``qi train`` / ``qi validate`` commands.

    qi train --dataset_base_path data --dataset_metadata_path data/metadata.csv --model Qwen/Qwen-Image \\
        --lora_base_model dit --lora_rank 32 --output_path out
    qi validate "a dog" --model Qwen/Qwen-Image --checkpoint out --out dog.png

    from qi_plugins.sft import train          # the trainer with the LoRA plugin's file readers wired in

Registration is cheap: nothing heavy is imported until a task or command runs.
"""

from __future__ import annotations

from typing import Any

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
_T = "qi_plugins.sft.tasks"

#: ``--lora_target_modules`` of the seed's Qwen-Image scripts (its parser default, "q,k,v,o,ffn.0,ffn.2", is
#: Wan-style and matches nothing in a Qwen DiT), the default of ``qi train``.
QWEN_LORA_TARGETS = (
    "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,"
    "txt_mlp.net.2,txt_mod.1"
)


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


def train(args: Any, **kw: Any) -> Any:
    """:func:`qi_core.training.train` with the LoRA plugin's readers (for ``--preset_lora_path`` and
    ``--lora_checkpoint``) and the seed's Qwen LoRA targets when none are given."""
    from qi_core.training.args import make_args
    from qi_core.training.trainer import train as _train
    from qi_plugins.sft.validate import lora_files

    if isinstance(args, dict):
        args = make_args(**args)
    if args.lora_target_modules is None:
        args = args.model_copy(update={"lora_target_modules": QWEN_LORA_TARGETS})
    kw.setdefault("lora_files", lora_files())
    return _train(args, **kw)


def __getattr__(name: str) -> Any:
    if name in ("SFT", "DirectDistill"):
        from qi_plugins.sft import tasks

        return getattr(tasks, name)
    if name in ("load_trained", "lora_files"):
        from qi_plugins.sft import validate

        return getattr(validate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
