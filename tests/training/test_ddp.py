"""Data parallelism through accelerate: 2 CPU processes (gloo, DDP) with batch 1 each train like 1 process with
batch 2 — same samples, same per-sample noise, averaged gradients — to float32 rounding in loss and weights.

The tolerances come from float64 runs of this very test (``torch_dtype`` float64 allowed by patching the
trainer's dtype lists; the loss itself is always reduced in float32): there DDP and one process agree
to 1e-15 in the weights and exactly in the losses, so what is left in float32 is rounding. Each float32 side's
distance to its float64 run was 2.4e-7 (one process) / 4.8e-7 (DDP) in the losses (of 2–8.2) and 2.7e-5 /
1.5e-5 in the weights (of up to 0.13): AdamW normalises every step to ~lr = 1e-2 whatever the gradient's size,
so an entry whose gradient is at rounding level moves by more than rounding. The tolerances are at least 4x
the sum of both sides' errors: 1e-5 for the losses (4 x 7.2e-7 = 2.9e-6) and 2e-4 for the weights (4 x 4.2e-5
= 1.7e-4); a DDP mistake (other samples, noise or averaging) moves them by ~1 and ~lr = 1e-2."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket

import torch
from training_helpers import args_for, make_dataset, one_thread, read  # noqa: F401

from qi_plugins.sft import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, args: dict, queue) -> None:
    """One process of the job, as ``accelerate launch`` would start it (the environment it sets)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
    torch.set_num_threads(1)  # forked after the parent ran OpenMP regions: stay single-threaded
    try:
        result = train(args)
        queue.put((rank, result.losses, result.global_step, None))
    except BaseException as e:  # report instead of hanging the parent
        queue.put((rank, None, None, repr(e)))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_two_gloo_processes_match_one_process_with_twice_the_batch(tmp_path):
    ds = make_dataset(tmp_path / "ds", [(32, 32)] * 4)
    common = dict(
        lora_base_model="dit",
        lora_rank=4,
        learning_rate=1e-2,
        dataset_repeat=2,
        save_steps=2,
        find_unused_parameters=True,
    )  # the last block's text MLP feeds no output: DDP must know
    single = train(args_for(ds, tmp_path / "single", batch_size=2, **common))

    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = free_port()
    ddp_args = args_for(ds, tmp_path / "ddp", batch_size=1, **common)
    procs = [ctx.Process(target=_rank, args=(r, port, ddp_args, queue)) for r in range(2)]
    for p in procs:
        p.start()
    reports = sorted(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [r[3] for r in reports] == [None, None], reports
    assert [p.exitcode for p in procs] == [0, 0]

    (_, losses0, steps0, _), (_, losses1, steps1, _) = reports
    assert steps0 == steps1 == single.global_step == 4
    assert losses0 == losses1  # the logged loss is the mean over processes
    # tolerances: see the module docstring
    assert max(abs(a - b) for a, b in zip(losses0, single.losses, strict=True)) < 1e-5
    got, want = (
        read(tmp_path / "ddp" / "step-4.safetensors"),
        read(tmp_path / "single" / "step-4.safetensors"),
    )
    assert set(got) == set(want)
    assert max((got[k] - want[k]).abs().max().item() for k in want) < 2e-4
    # only the main process writes checkpoints; every process writes its RNG state
    assert {p.name for p in (tmp_path / "ddp" / "checkpoints" / "step-4").iterdir()} >= {"rng-0.safetensors",
                                                                                         "rng-1.safetensors"}  # fmt: skip
