"""Single process vs CFG-parallel vs Ulysses (vs both) with the ``parallel`` step runner.

    python benchmarks/parallel_cpu.py [--size 64 --steps 4 --repeats 2 --four]        # gloo, CPU, tiny model
    python benchmarks/parallel_cpu.py --gpu [--model FOLDER --size 1024 --steps 20]   # NCCL, one rank per GPU

CPU: every configuration runs on gloo over local processes, the cores shared out (single process: all of them;
N ranks: cores / N threads each), on the tiny model, which is far too small for parallelism to pay: expect the
ranks to be slower than one process (the numbers are printed as they are). GPU (``--gpu``, when CUDA devices
exist): NCCL, rank r on ``cuda:r``, bfloat16, the configurations that fit the visible GPUs (cfg 2 needs 2,
cfg 2 × ulysses 2 needs 4). Each configuration prints its time per call (the slowest rank's, after a warm-up
call), its ratio to the single process, and the largest difference of its latents from the single process.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file


def call(args: argparse.Namespace) -> dict:
    return dict(prompt="a lighthouse on a cliff at dusk", negative_prompt="fog", cfg_scale=4.0, seed=1,
                height=args.size, width=args.size, num_inference_steps=args.steps, output_type="latent",
                progress_bar_cmd=lambda x: x)  # fmt: skip


def compose(args: argparse.Namespace, device: str, runner=None):
    import qi_core as qi

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    kw = {} if runner is None else {"step_runner": runner}
    return qi.compose(args.pipeline, model=args.model, device=device, torch_dtype=dtype, progress=False, **kw)


def timed(pipe, args: argparse.Namespace, sync) -> tuple[float, torch.Tensor]:
    """Seconds per call (after one warm-up call) and the last latents."""
    with torch.inference_mode():
        out = pipe(**call(args))
        sync()
        began = time.perf_counter()
        for _ in range(args.repeats):
            out = pipe(**call(args))
        sync()
    return (time.perf_counter() - began) / args.repeats, out


def rank_main(rank: int, world: int, port: int, cfg: int, ulysses: int, args: argparse.Namespace, out: str):
    import torch.distributed as dist

    from qi_plugins.parallel.runner import Parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    if args.gpu:
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world)

        def sync():
            torch.cuda.synchronize()
            dist.barrier()
    else:
        device = "cpu"
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
        sync = dist.barrier
    try:
        pipe = compose(args, device, Parallel(cfg=cfg, ulysses=ulysses))
        seconds, latents = timed(pipe, args, sync)
        slowest = torch.tensor([seconds], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if rank == 0:
            save_file({"latents": latents.float().cpu().contiguous(), "seconds": slowest.cpu()},
                      str(Path(out) / "rank0.safetensors"))  # fmt: skip
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipeline", default="qwen-image")
    ap.add_argument("--model", default="tiny", help="'tiny' or a model folder / hub id")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--four", action="store_true", help="also cfg 2 × ulysses 2 on 4 ranks (CPU)")
    ap.add_argument("--gpu", action="store_true", help="NCCL on the CUDA devices (one rank per GPU)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads per process (default: the cores shared out over the ranks)",
    )
    args = ap.parse_args()
    gpus = torch.cuda.device_count() if args.gpu else 0
    if args.gpu and gpus == 0:
        raise SystemExit("--gpu: no CUDA device is visible")

    device = "cuda:0" if args.gpu else "cpu"
    if not args.gpu:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    single, reference = timed(compose(args, device), args, sync)
    reference = reference.float().cpu()
    threads = f", {args.threads} thread(s) per process" if args.threads else ""
    backend = f"NCCL, {gpus} GPU(s)" if args.gpu else f"gloo, {os.cpu_count()} CPU cores{threads}"
    print(f"{args.pipeline} ({args.model}), {args.size}x{args.size}, {args.steps} steps, CFG on; {backend}")
    print(f"{'configuration':<22} {'ranks':>5} {'s / call':>9} {'vs single':>10} {'max abs diff':>13}")
    print(f"{'single process':<22} {1:>5} {single:>9.3f} {1.0:>9.2f}x {0.0:>13.3g}")
    configs = [("cfg 2", 2, 1), ("ulysses 2", 1, 2)]
    if args.four or gpus >= 4:
        configs.append(("cfg 2 x ulysses 2", 2, 2))
    for label, cfg, ulysses in configs:
        world = cfg * ulysses
        if args.gpu and world > gpus:
            print(f"{label:<22} {world:>5}   (needs {world} GPUs, {gpus} visible)")
            continue
        with tempfile.TemporaryDirectory() as out:
            mp.spawn(rank_main, args=(world, free_port(), cfg, ulysses, args, out), nprocs=world)
            got = load_file(str(Path(out) / "rank0.safetensors"))
        diff = float((got["latents"].double() - reference.double()).abs().max())
        # ratio > 1: slower than one process
        print(
            f"{label:<22} {world:>5} {float(got['seconds']):>9.3f} {float(got['seconds']) / single:>9.2f}x {diff:>13.3g}"
        )


if __name__ == "__main__":
    main()
