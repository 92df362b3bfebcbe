"""The training loop: accelerate for devices and data parallelism (DDP, DeepSpeed), a deterministic data plan,
gradient accumulation, atomic checkpoints and exact resume.

    from qi_plugins.sft import make_args, train
    result = train(make_args(dataset_base_path="data", dataset_metadata_path="data/metadata.csv",
                             lora_base_model="dit", output_path="out"))

One optimizer step = ``gradient_accumulation_steps`` micro-batches; with the seed's defaults (batch 1, no
accumulation) a step is one sample, as in DiffSynth-Studio, and ``--save_steps`` counts the same steps.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qi_core.conditioning import Conditioning
from qi_core.errors import InvalidInputError
from qi_core.sizing import SizeSpec
from qi_plugins.sft import checkpoint as ckpt
from qi_plugins.sft.args import TrainArgs, make_args
from qi_plugins.sft.batching import collate
from qi_plugins.sft.data import CachedDataset, MetadataDataset, collate_samples
from qi_plugins.sft.encoding import encode_sample, injector_declarations, load_conditioning, save_conditioning
from qi_plugins.sft.metrics import MetricsLog
from qi_plugins.sft.models import (
    TrainingModule,
    as_module,
    default_dtype,
    load_pipeline,
    load_trainable,
    prepare_for_training,
    trainable_state_dict,
)
from qi_plugins.sft.plan import PlanSampler, PlanSpec, epoch_plan, local, sample_seed


@dataclass
class TrainResult:
    """What a run produced."""

    output_path: Path  # where everything was written
    global_step: int = 0  # optimizer steps done (including those before a resume)
    losses: list[float] = field(
        default_factory=list
    )  # loss per optimizer step of this run (mean over processes)
    checkpoints: list[Path] = field(default_factory=list)  # weight files written (seed layout)
    skipped_rows: int = 0  # bad rows skipped (--skip_bad_rows)
    cache_files: list[Path] = field(default_factory=list)  # files written by a ":data_process" stage
    components: list[str] = field(default_factory=list)  # the roles this stage loaded
    pipe: Any = field(
        default=None, repr=False
    )  # the trained pipeline (LoRA attached), for validation in-process
    main_process: bool = True  # False on the other processes of a multi-process job


def get_task(args: TrainArgs, task: Any = None) -> Any:
    from qi_core.plugin_host import host

    if task is None:
        task = host().registry.get("training_task", args.task_name).load()()
    if hasattr(task, "configure"):
        task.configure(args)
    return task


def make_accelerator(args: TrainArgs) -> Any:
    """An ``Accelerator`` for this run. Outside a launched multi-process job, accelerate's process-wide state
    is reset first, so several runs can follow each other in one process."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(reset_partial_state=True)
    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    ddp = DistributedDataParallelKwargs(find_unused_parameters=args.find_unused_parameters)
    acc = Accelerator(
        cpu=cpu, gradient_accumulation_steps=args.gradient_accumulation_steps, kwargs_handlers=[ddp]
    )
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if plugin is not None:  # no prepared DataLoader tells DeepSpeed the micro-batch size: say it
        cfg = plugin.deepspeed_config
        if cfg.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            cfg["train_micro_batch_size_per_gpu"] = args.batch_size
    return acc


def stage_roles(args: TrainArgs, recipe: Any) -> set[str] | None:
    """Components a stage loads: all (one stage), the frozen encoders (``:data_process``), or the denoiser and
    the trained models (``:train``)."""
    trained = set(TrainArgs.split(args.trainable_models)) | ({args.lora_base_model} - {None})
    denoisers = {r for r, c in recipe.components.items() if c.kind == "denoiser"}
    if args.stage == "data_process":
        return {r for r in recipe.components if r not in trained | denoisers}
    if args.stage == "train":
        return denoisers | trained
    return None


def train(args: TrainArgs | dict[str, Any], *, task: Any = None) -> TrainResult:
    """Run ``qi train`` with ``args`` (a :class:`TrainArgs` or its fields as a dict); ``task``: a training task
    object instead of the registered ``args.task``."""
    from qi_core.plugin_host import host

    if isinstance(args, dict):
        args = make_args(**args)
    check_dataset(args)  # before any model loads
    task = get_task(args, task)
    acc = make_accelerator(args)
    device = acc.device
    dtype = default_dtype(args, device)
    recipe = host().registry.get("pipeline", args.pipeline).load()
    load_device = torch.device("cpu") if args.initialize_model_on_cpu else device
    pipe = load_pipeline(args, stage_roles(args, recipe), load_device, dtype)
    out = Path(args.output_path)
    # nothing is written to `out` until the arguments and the data are checked (write_run_files)
    if args.stage == "data_process":
        return _data_process(args, acc, pipe, task, out)
    return _Run(args, acc, pipe, task, out).run()


def check_dataset(args: TrainArgs) -> None:
    """The dataset must be named: a metadata file, or (no metadata: split training's second stage) the cache
    folder. An empty ``--dataset_base_path`` would otherwise make the current folder the cache, and every
    ``.safetensors`` below it (downloaded models too) a training sample."""
    meta, base = args.dataset_metadata_path, args.dataset_base_path
    if meta is None:
        if args.stage == "data_process":
            raise InvalidInputError(
                f"--task {args.task} encodes a raw dataset: pass --dataset_metadata_path (a .csv/.json/.jsonl) "
                "and --dataset_base_path (the folder its file paths are relative to)"
            )
        if not base:
            raise InvalidInputError(
                "no dataset given: pass --dataset_metadata_path (a .csv/.json/.jsonl) and --dataset_base_path "
                f"(the folder its file paths are relative to); for split training's second stage (--task "
                f"{args.task_name}:train), pass --dataset_base_path set to the --output_path of the "
                f"--task {args.task_name}:data_process run"
            )
        if not Path(base).is_dir():
            raise InvalidInputError(
                f"--dataset_base_path {base!r} (the cache of --task {args.task_name}:data_process, as no "
                "--dataset_metadata_path is given) is not a folder"
            )
        return
    if not Path(meta).is_file():
        raise InvalidInputError(f"--dataset_metadata_path {meta!r} does not exist (a .csv/.json/.jsonl file)")
    if base and not Path(base).is_dir():
        raise InvalidInputError(
            f"--dataset_base_path {base!r} is not a folder (the folder the metadata's file paths are relative to)"
        )


def write_run_files(args: TrainArgs, acc: Any, out: Path) -> None:
    """``training_args.json`` in the output folder, once the run is about to start (arguments and data checked),
    so that a run refused for bad input leaves no files behind."""
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "training_args.json").write_text(json.dumps(args.model_dump(), indent=1))


def _encoder(args: TrainArgs, pipe: Any, task: Any):
    extra = tuple(TrainArgs.split(args.extra_inputs))
    overrides = dict(args.call_params)
    encode = getattr(task, "encode", None)

    def run(sample: dict[str, Any]) -> Conditioning:
        if "_cache" in sample:
            return load_conditioning(sample["_cache"])
        if encode is not None:
            return encode(pipe, sample, extra_inputs=extra, overrides=overrides)
        return encode_sample(pipe, sample, extra_inputs=extra, overrides=overrides)

    return run


def _dataset(args: TrainArgs, task: Any, pipe: Any) -> Any:
    if args.dataset_metadata_path is None:
        return CachedDataset(args.dataset_base_path, repeat=args.dataset_repeat)
    size = SizeSpec(args.height, args.width, args.max_pixels, getattr(pipe, "size_multiple", 16))
    # the pipeline's injectors may decode their columns their own way (Injector.file_loaders), for this run only
    loaders = injector_declarations(pipe, "file_loaders")
    return MetadataDataset(
        args.dataset_base_path, args.dataset_metadata_path, TrainArgs.split(args.data_file_keys),
        repeat=args.dataset_repeat, size=size, required=getattr(task, "required_columns", ("image",)),
        skip_bad_rows=args.skip_bad_rows, loaders=loaders, columns=TrainArgs.split(args.extra_inputs),
    )  # fmt: skip


def _loader(dataset: Any, batches: Any, workers: int):
    from torch.utils.data import DataLoader

    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_samples, num_workers=workers)


def _data_process(args: TrainArgs, acc: Any, pipe: Any, task: Any, out: Path) -> TrainResult:
    """Stage 1 of split training: encode every sample once and save it (``<output>/<rank>/<i>.safetensors``)."""
    from tqdm.auto import tqdm

    dataset = _dataset(args, task, pipe)  # check_dataset made sure there is a metadata file
    encode = _encoder(args, pipe, task)
    write_run_files(args, acc, out)
    mine = [[i] for i in range(acc.process_index, len(dataset), acc.num_processes)]
    folder = out / str(acc.process_index)
    files = []
    bar = tqdm(
        _loader(dataset, mine, args.dataset_num_workers), desc="encoding", disable=not acc.is_main_process
    )
    for k, samples in enumerate(bar):
        files.append(save_conditioning(encode(samples[0]), folder / f"{k}.safetensors"))
    acc.wait_for_everyone()
    return TrainResult(out, main_process=acc.is_main_process, cache_files=files,
                       skipped_rows=len(dataset.skipped), components=list(pipe.components), pipe=pipe)  # fmt: skip


class _Run:
    """One training run (state shared by the loop, the saves and the resume)."""

    def __init__(self, args: TrainArgs, acc: Any, pipe: Any, task: Any, out: Path):
        from accelerate.utils import DistributedType

        self.args, self.acc, self.pipe, self.task, self.out = args, acc, pipe, task, out
        self.deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
        torch.manual_seed(args.seed)  # LoRA initialisation (DDP broadcasts rank 0's anyway)
        roles = prepare_for_training(pipe, args)
        if args.initialize_model_on_cpu and acc.device.type != "cpu":
            for role, comp in pipe.components.items():  # trained roles: accelerate/DeepSpeed place them
                if role not in roles or not self.deepspeed:
                    as_module(comp, role).to(acc.device)
            pipe.device = acc.device
        self.module = TrainingModule(
            pipe, task, roles, offload_activations=args.use_gradient_checkpointing_offload
        )
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.weight_decay)
        # the seed's scheduler: ConstantLR's defaults (lr/3 for the first 5 steps), stepped once per optimizer step
        self.scheduler = torch.optim.lr_scheduler.ConstantLR(self.optimizer)
        self.dataset = _dataset(args, task, pipe)
        self.encode = _encoder(args, pipe, task)
        self.spec = PlanSpec(args.batch_size, acc.num_processes, args.gradient_accumulation_steps, args.seed,
                             args.shuffle)  # fmt: skip
        self.buckets = [self.dataset.bucket(i) for i in range(len(self.dataset))]
        self.result = TrainResult(out, main_process=acc.is_main_process, skipped_rows=len(self.dataset.skipped),
                                  components=list(pipe.components), pipe=pipe)  # fmt: skip
        self.epoch, self.step_in_epoch = 0, 0
        # weights go in before accelerate/DeepSpeed wrap (ZeRO-3 partitions them), the rest after
        state = self.load_weights(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        self.model, self.optimizer = acc.prepare(self.module, self.optimizer)
        if state is not None:
            self.restore(*state)

    # -- resume ----------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"global_step": self.result.global_step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "seed": self.args.seed, "batch_size": self.args.batch_size, "processes": self.acc.num_processes,
                "accumulation": self.args.gradient_accumulation_steps, "samples": len(self.dataset),
                "shuffle": self.args.shuffle, "task": self.args.task}  # fmt: skip

    def load_weights(self, spec: str) -> tuple[Path, dict[str, Any], dict[str, Any] | None] | None:
        """Load the trained weights of ``--resume_from_checkpoint``; return what :meth:`restore` needs for an
        exact resume (None for a weight file: the seed's meaning, a new schedule from these weights)."""
        folder, weights_file = ckpt.find_resume(spec, self.args.output_path)
        if folder is None:
            load_trainable(self.module, ckpt.read_weights(weights_file), self.args.remove_prefix_in_ckpt,
                           f"--resume_from_checkpoint {weights_file}")  # fmt: skip
            return None
        info, weights, opt = ckpt.read_state(folder)
        mine = self.info()
        for key in ("seed", "batch_size", "processes", "accumulation", "samples", "shuffle"):
            if info[key] != mine[key]:
                raise InvalidInputError(
                    f"cannot resume exactly from {folder}: it was saved with {key}={info[key]}, this run has "
                    f"{key}={mine[key]}; use the same settings, or resume from the weights file "
                    f"({Path(self.args.output_path) / (folder.name + '.safetensors')}) to start a new schedule"
                )
        load_trainable(self.module, weights, None, f"training state {folder}")
        return folder, info, opt

    def restore(self, folder: Path, info: dict[str, Any], opt: dict[str, Any] | None) -> None:
        """Optimizer, LR scheduler, RNG and data position of an exact resume."""
        if self.deepspeed:
            self.acc.load_state(str(folder / "accelerate"))
        elif opt is not None:
            self.optimizer.load_state_dict(opt)
        self.scheduler.load_state_dict(info["scheduler"])
        ckpt.restore_rng(folder, self.acc.process_index)
        self.result.global_step, self.epoch, self.step_in_epoch = (
            info["global_step"], info["epoch"], info["step_in_epoch"]
        )  # fmt: skip

    # -- saving ----------------------------------------------------------------------------------------------
    def save(self, tag: str) -> Path:
        acc, args = self.acc, self.args
        gathered = acc.get_state_dict(self.model) if self.deepspeed else None
        unwrapped = acc.unwrap_model(self.model)
        path = self.out / f"{tag}.safetensors"
        tmp = ckpt.begin_state(self.out, self.result.global_step) if acc.is_main_process else None
        acc.wait_for_everyone()
        tmp = tmp or (self.out / ckpt.STATES / f".step-{self.result.global_step}.tmp")
        if self.deepspeed:
            acc.save_state(str(tmp / "accelerate"))  # DeepSpeed's own sharded optimizer format
        ckpt.write_rng(tmp, acc.process_index)
        if acc.is_main_process:
            weights = trainable_state_dict(unwrapped, args.remove_prefix_in_ckpt, gathered)
            ckpt.save_weights(weights, path, {"format": "pt", "qi_step": str(self.result.global_step)})
            opt = None if self.deepspeed else self.optimizer.state_dict()
            ckpt.write_main_state(tmp, weights=trainable_state_dict(unwrapped, None, gathered), optimizer=opt,
                                  scheduler=self.scheduler.state_dict(), info=self.info())  # fmt: skip
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.commit_state(tmp, ckpt.state_dir(self.out, self.result.global_step))
            ckpt.prune_states(self.out, args.keep_last_states)
        acc.wait_for_everyone()
        self.result.checkpoints.append(path)
        return path

    # -- the loop --------------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        args, acc = self.args, self.acc
        rank = acc.process_index
        write_run_files(args, acc, self.out)
        log = MetricsLog(self.out, enabled=acc.is_main_process, resume_step=self.result.global_step)
        # every epoch has the same number of steps (the buckets do not change); plans are made one at a time
        total = len(epoch_plan(self.buckets, self.spec, 0)) * args.num_epochs
        if args.max_steps is not None:
            total = min(total, args.max_steps)
        bar = tqdm(total=total, initial=min(self.result.global_step, total), desc="training",
                   disable=not acc.is_main_process)  # fmt: skip
        saved_at = None
        try:
            while self.epoch < args.num_epochs and not self.done():
                steps = epoch_plan(self.buckets, self.spec, self.epoch)
                batches = PlanSampler(steps, self.spec, rank, self.step_in_epoch)
                it = iter(_loader(self.dataset, batches, args.dataset_num_workers))
                epoch_done = False
                while not epoch_done and not self.done():
                    record = self.step(steps[self.step_in_epoch], it)
                    self.step_in_epoch += 1
                    self.result.global_step += 1
                    finished = self.epoch
                    if self.step_in_epoch >= len(steps):  # the saved position is the next epoch's start
                        self.epoch, self.step_in_epoch, epoch_done = self.epoch + 1, 0, True
                    record["step"] = self.result.global_step
                    self.result.losses.append(record["loss"])
                    log.log(record)
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.2f}")
                    if args.save_steps and self.result.global_step % args.save_steps == 0:
                        self.save(f"step-{self.result.global_step}")
                        saved_at = self.result.global_step
                    elif epoch_done and args.save_steps is None:
                        self.save(f"epoch-{finished}")
                        saved_at = self.result.global_step
            if saved_at != self.result.global_step:  # what the last step made is always saved
                self.save(f"step-{self.result.global_step}")
        finally:
            bar.close()
            log.close()
        return self.result

    def done(self) -> bool:
        return self.args.max_steps is not None and self.result.global_step >= self.args.max_steps

    def step(self, micro_batches: list, it: Any) -> dict[str, Any]:
        """One optimizer step over its micro-batches; returns the log record."""
        acc, args = self.acc, self.args
        t0 = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]
        losses = []
        n = len(micro_batches)
        for m, micro in enumerate(micro_batches):
            samples = next(it)
            mine = local(micro, self.spec, acc.process_index)
            batch = collate([self.encode(s) for s in samples]).to(self.pipe.device, self.pipe.dtype)
            gens = [torch.Generator().manual_seed(sample_seed(args.seed, self.epoch, pos)) for _, pos in mine]
            last = m == n - 1
            # DeepSpeed and DDP sync gradients on the last micro-batch only (accelerate's flag; we own the grouping)
            acc.gradient_state._set_sync_gradients(last)
            try:
                with nullcontext() if last else acc.no_sync(self.model):
                    loss = self.model(batch, gens)
                    # accelerate divides by gradient_accumulation_steps; make it the mean over this step's n
                    acc.backward(loss * (args.gradient_accumulation_steps / n))
            except RuntimeError as e:
                if "find_unused_parameters" not in str(e):
                    raise
                raise InvalidInputError(
                    "some trained parameters do not reach the loss (e.g. LoRA on the last block's text MLP, whose "
                    "output nothing reads); DDP needs --find_unused_parameters for that"
                ) from e
            losses.append(loss.detach().float())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_loss = acc.reduce(torch.stack(losses).mean().to(acc.device), reduction="mean")
        dt = time.perf_counter() - t0
        samples = sum(len(mb) for mb in micro_batches)
        return {"epoch": self.epoch, "loss": float(step_loss), "lr": lr, "samples": samples,
                "step_time_s": round(dt, 6), "samples_per_s": round(samples / dt, 4) if dt > 0 else 0.0}  # fmt: skip
