"""The generic trainer behind ``qi train`` (variant-free): data, encoding, the loop, checkpoints, resume, logs.

    from qi_core.training import make_args, train
    train(make_args(dataset_base_path="data", dataset_metadata_path="data/metadata.csv",
                    lora_base_model="dit", output_path="out"))

Training tasks (the loss) are plugins of the ``qi_register_training_tasks`` hook; ``qi_plugins.sft`` registers
``sft`` and ``direct_distill``. Importing this package is cheap; torch loads on first use of the trainer.
"""

from __future__ import annotations

from typing import Any

from qi_core.training.args import TrainArgs, add_train_arguments, from_namespace, make_args

_LAZY = {
    "train": "qi_core.training.trainer",
    "TrainResult": "qi_core.training.trainer",
    "Conditioning": "qi_core.training.conditioning",
    "encode_sample": "qi_core.training.conditioning",
    "collate": "qi_core.training.conditioning",
    "MetadataDataset": "qi_core.training.data",
    "CachedDataset": "qi_core.training.data",
    "BadRowError": "qi_core.training.data",
    "SizeSpec": "qi_core.training.data",
    "register_file_loader": "qi_core.training.data",
    "register_column_adapter": "qi_core.training.data",
    "LoRAFiles": "qi_core.training.models",
    "read_log": "qi_core.training.metrics",
}

__all__ = [
    "BadRowError",
    "CachedDataset",
    "Conditioning",
    "LoRAFiles",
    "MetadataDataset",
    "SizeSpec",
    "TrainArgs",
    "TrainResult",
    "add_train_arguments",
    "collate",
    "encode_sample",
    "from_namespace",
    "make_args",
    "read_log",
    "register_column_adapter",
    "register_file_loader",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
