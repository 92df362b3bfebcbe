"""The arguments of ``qi train``: the names, meaning and defaults of DiffSynth-Studio's ``train.py``, plus a few
qi additions.

Importing this module is cheap (no torch): the ``qi train`` parser is built from :class:`TrainArgs` when the
command is set up. :class:`TrainArgs` validates the values (pydantic) so a bad value fails with a readable message.
"""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qi_core.errors import InvalidInputError

#: ``--lora_target_modules`` of the seed's Qwen-Image scripts (its parser default, "q,k,v,o,ffn.0,ffn.2", is
#: Wan-style and matches nothing in a Qwen DiT), the default of ``qi train``.
QWEN_LORA_TARGETS = (
    "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,"
    "txt_mlp.net.2,txt_mod.1"
)


class TrainArgs(BaseModel):
    """Every ``qi train`` argument. Names and meaning follow DiffSynth-Studio's ``train.py``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # -- dataset (seed) --
    dataset_base_path: str = ""  # folder the metadata paths are relative to; the cache folder for ":train"
    dataset_metadata_path: str | None = None  # .csv / .json / .jsonl; None = cached samples (split training)
    dataset_repeat: int = Field(1, ge=1)  # times each row is seen per epoch
    dataset_num_workers: int = Field(0, ge=0)  # DataLoader worker processes
    data_file_keys: str = "image,video"  # comma-separated columns holding file paths (loaded as images)
    height: int | None = Field(None, ge=16)  # fixed training height (with width); None = dynamic resolution
    width: int | None = Field(None, ge=16)  # fixed training width
    max_pixels: int = Field(1024 * 1024, ge=256)  # dynamic resolution: larger images are scaled down to this
    # -- models (seed) --
    model_paths: str | None = None  # JSON list (or {role: path}) of weight files / component folders
    model_id_with_origin_paths: str | None = None  # "ORG/NAME:pattern,…" hub files
    extra_inputs: str | None = None  # comma-separated metadata columns passed as pipeline call parameters
    fp8_models: str | None = None  # frozen models stored in float8_e4m3fn (roles or the strings above)
    offload_models: str | None = None  # frozen models kept on the CPU between uses (roles or strings)
    resume_from_checkpoint: str | None = None  # a step-N.safetensors, a checkpoints/step-N folder or "latest"
    tokenizer_path: str | None = None  # tokenizer folder replacing the model's tokenizer/
    processor_path: str | None = None  # VL processor folder replacing the model's processor/
    call_params: dict[
        str, Any
    ] = {}  # call parameters given to the pipeline for every sample (plugins' flags)
    initialize_model_on_cpu: bool = False  # build on the CPU, let accelerate/DeepSpeed place (ZeRO-3)
    # -- training (seed) --
    learning_rate: float = Field(1e-4, gt=0)  # AdamW learning rate (ConstantLR as the seed)
    num_epochs: int = Field(1, ge=1)  # passes over the (repeated) dataset
    trainable_models: str | None = None  # comma-separated roles trained in full, e.g. "dit"
    find_unused_parameters: bool = False  # DDP find_unused_parameters
    weight_decay: float = Field(0.01, ge=0)  # AdamW weight decay
    task: str = "sft"  # registered training task, optionally ":data_process" or ":train" (split training)
    min_timestep_boundary: float = Field(0.0, ge=0, le=1)  # fraction of the timestep grid sampled from
    max_timestep_boundary: float = Field(1.0, ge=0, le=1)  # fraction of the timestep grid sampled up to
    # -- output (seed) --
    output_path: str = "./models"  # checkpoints, logs, caches
    remove_prefix_in_ckpt: str | None = "pipe.dit."  # stripped from saved parameter names
    save_steps: int | None = Field(None, ge=1)  # save every N optimizer steps; None = every epoch
    # -- LoRA (seed) --
    lora_base_model: str | None = None  # role LoRA is added to (e.g. "dit"); None = no LoRA
    # comma-separated module names; "" = auto-detected, None = the denoiser's own (qi_plugins.lora.training)
    lora_target_modules: str | None = QWEN_LORA_TARGETS
    lora_rank: int = Field(32, ge=1)  # LoRA rank (alpha = rank, so scale 1)
    lora_checkpoint: str | None = None  # LoRA file to start from (any layout qi reads)
    preset_lora_path: str | None = None  # LoRA fused into the base before training (differential LoRA)
    preset_lora_model: str | None = None  # role the preset LoRA is fused into (default: lora_base_model)
    # -- memory (seed) --
    use_gradient_checkpointing: bool = False  # recompute each DiT block in backward
    use_gradient_checkpointing_offload: bool = False  # also keep the saved activations on the CPU
    gradient_accumulation_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    # -- qi additions --
    pipeline: str = "qwen-image"  # recipe name (see `qi pipelines`)
    model: str | None = None  # model folder or hub id in the official layout (default: the recipe's)
    seed: int = 0  # seeds LoRA init, data order and every sample's timestep/noise draw
    batch_size: int = Field(1, ge=1)  # samples per micro-batch per process (same-size samples are bucketed)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps
    skip_bad_rows: bool = False  # skip (and count) rows with missing/unreadable/escaping files
    device: str | None = None  # cpu, cuda … (default: accelerate's device)
    torch_dtype: str | None = None  # float32 / bfloat16 / float16 (default: bfloat16 on GPU, float32 on CPU)
    keep_last_states: int = Field(2, ge=1)  # resumable states kept in output_path/checkpoints/
    shuffle: bool = True  # shuffle the data order each epoch

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        _, _, stage = v.partition(":")
        if stage not in ("", "data_process", "train"):
            raise ValueError(f"task stage must be ':data_process' or ':train', got {v!r}")
        return v

    @field_validator("torch_dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in DTYPES:
            raise ValueError(f"torch_dtype must be one of {', '.join(DTYPES)}, got {v!r}")
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainArgs:
        if (self.height is None) != (self.width is None):
            raise ValueError("give both --height and --width (fixed size) or neither (dynamic resolution)")
        for side in ("height", "width"):
            v = getattr(self, side)
            if v is not None and v % 16:
                raise ValueError(f"--{side} must be a multiple of 16, got {v} (try {v // 16 * 16 or 16})")
        if self.min_timestep_boundary >= self.max_timestep_boundary:
            raise ValueError(
                f"min_timestep_boundary ({self.min_timestep_boundary}) must be below max_timestep_boundary "
                f"({self.max_timestep_boundary})"
            )
        return self

    # -- derived ------------------------------------------------------------------------------------------
    @property
    def task_name(self) -> str:
        return self.task.partition(":")[0]

    @property
    def stage(self) -> str:
        """ "" (one stage), "data_process" or "train"."""
        return self.task.partition(":")[2]

    @staticmethod
    def split(v: str | None) -> list[str]:
        return [s.strip() for s in (v or "").split(",") if s.strip()]


DTYPES = ("float32", "bfloat16", "float16")

# argparse flags without a value (store_true), as the seed declares them
_FLAGS = {
    "find_unused_parameters",
    "use_gradient_checkpointing",
    "use_gradient_checkpointing_offload",
    "initialize_model_on_cpu",
    "skip_bad_rows",
}


def add_train_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any] | None = None) -> None:
    """Add every :class:`TrainArgs` field as ``--name`` (underscores, as the seed) to ``parser``."""
    defaults = defaults or {}
    for name, f in TrainArgs.model_fields.items():
        if name == "call_params":  # filled by plugins' own flags, not a command-line argument
            continue
        default = defaults.get(name, f.default)
        help_ = _HELP.get(name, "")
        if name in _FLAGS:
            parser.add_argument(f"--{name}", action="store_true", default=default, help=help_)
        elif name == "shuffle":
            parser.add_argument(
                "--no_shuffle", dest="shuffle", action="store_false", help="keep metadata order"
            )
        else:
            parser.add_argument(f"--{name}", type=_type(f.annotation), default=default, help=help_)


def _type(annotation: Any):
    text = str(annotation)
    if "int" in text:
        return int
    if "float" in text:
        return float
    return str


def from_namespace(ns: argparse.Namespace) -> TrainArgs:
    """:class:`TrainArgs` from parsed arguments; pydantic errors become :class:`InvalidInputError`."""
    values = {k: v for k, v in vars(ns).items() if k in TrainArgs.model_fields}
    return make_args(**values)


def make_args(**values: Any) -> TrainArgs:
    try:
        return TrainArgs(**values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(x) for x in err["loc"]) or "arguments"
            lines.append(f"--{where}: {err['msg']}" if err["loc"] else err["msg"])
        raise InvalidInputError("invalid training arguments: " + "; ".join(lines)) from None


_HELP = {
    "dataset_base_path": "folder the metadata paths are relative to (the cache folder for --task X:train)",
    "dataset_metadata_path": "metadata .csv/.json/.jsonl; leave out to read cached samples (split training)",
    "dataset_repeat": "times each row is seen per epoch",
    "dataset_num_workers": "DataLoader worker processes",
    "data_file_keys": "comma-separated metadata columns holding image paths",
    "height": "fixed training height; leave height and width out for dynamic resolution",
    "width": "fixed training width",
    "max_pixels": "dynamic resolution: larger images are scaled down to this many pixels",
    "model_paths": 'JSON list of weight files or component folders (or {"role": path})',
    "model_id_with_origin_paths": "comma-separated ORG/NAME:file-pattern hub files",
    "extra_inputs": "comma-separated metadata columns passed to the pipeline as call parameters",
    "fp8_models": "frozen models stored in float8_e4m3fn (roles such as text_encoder, or model strings)",
    "offload_models": "frozen models kept on the CPU between uses",
    "resume_from_checkpoint": "step-N.safetensors (weights), a checkpoints/step-N folder or 'latest' (exact resume)",
    "learning_rate": "AdamW learning rate",
    "num_epochs": "number of epochs",
    "trainable_models": "comma-separated roles trained in full, e.g. dit",
    "find_unused_parameters": "DDP find_unused_parameters",
    "weight_decay": "AdamW weight decay",
    "task": "training task: sft, direct_distill; add :data_process / :train for split training",
    "output_path": "where checkpoints, logs and caches go",
    "remove_prefix_in_ckpt": "prefix removed from the saved parameter names",
    "save_steps": "save every N optimizer steps (default: every epoch)",
    "lora_base_model": "role the trainable LoRA is added to (e.g. dit)",
    "lora_target_modules": "comma-separated module names for LoRA ('' = every Linear ≥ 512 wide in the blocks)",
    "lora_rank": "LoRA rank",
    "lora_checkpoint": "LoRA file to start from",
    "preset_lora_path": "LoRA fused into the base model before training (differential LoRA)",
    "preset_lora_model": "role the preset LoRA is fused into (default: --lora_base_model)",
    "use_gradient_checkpointing": "recompute DiT blocks in backward (less memory)",
    "use_gradient_checkpointing_offload": "keep checkpointed activations on the CPU",
    "gradient_accumulation_steps": "micro-batches per optimizer step",
    "tokenizer_path": "tokenizer folder replacing the model's tokenizer/",
    "processor_path": "processor folder replacing the model's processor/",
    "initialize_model_on_cpu": "build models on the CPU (DeepSpeed ZeRO-3)",
    "pipeline": "recipe name (see `qi pipelines`)",
    "model": "model folder or hub id in the official layout",
    "seed": "seed of LoRA init, data order and noise",
    "batch_size": "samples per micro-batch per process (same-size samples are bucketed)",
    "max_steps": "stop after this many optimizer steps",
    "skip_bad_rows": "skip rows whose files are missing, unreadable or outside the base folder",
    "device": "cpu, cuda … (default: accelerate's choice)",
    "torch_dtype": "float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)",
    "keep_last_states": "resumable training states kept in output_path/checkpoints",
    "min_timestep_boundary": "lowest fraction of the timestep grid sampled",
    "max_timestep_boundary": "highest fraction of the timestep grid sampled",
}
