"""qi vs diffusers on the same random medium-size model, in one process, alternating runs.

    python benchmarks/bench_pipeline.py [--blocks 8 --width 768 --size 512 --steps 4 --repeats 3] [--compile]

Prints the median of each measurement and the ratio qi / diffusers (lower is better) for the denoising loop,
the VAE decode and the whole pipeline (text encoding + loop + decode). Float32 on CPU unless --device cuda. On
CPU also the roofline: each loop's time against its FLOPs at the float32 GEMM peak measured beside it. With
``--compile``, qi's loop once more with its blocks compiled (``compile=True``, opt-in), against the same roofline.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_model(folder: Path, blocks: int, width: int, vae_base: int) -> Path:
    from qi_plugins.qwen_image.dit import DiTConfig
    from qi_plugins.qwen_image.tiny import make_tiny_model
    from qi_plugins.qwen_image.vae import VAEConfig

    heads = width // 128
    dit = DiTConfig(
        num_layers=blocks, num_attention_heads=heads, attention_head_dim=128, joint_attention_dim=64
    )
    vae = VAEConfig(base_dim=vae_base)
    return make_tiny_model(folder, dit_config=dit, vae_config=vae, overwrite=True)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--vae-base", type=int, default=96, help="VAE base_dim (96 = real Qwen-Image VAE)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--compile", action="store_true", help="also time qi's loop with compiled blocks")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers

    import qi_core as qi

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    folder = build_model(Path(tempfile.mkdtemp()) / "medium", args.blocks, args.width, args.vae_base)
    ours = qi.compose("qwen-image", model=folder, device=args.device, torch_dtype=dtype, progress=False)
    ref = diffusers.QwenImagePipeline.from_pretrained(folder, dtype=dtype).to(args.device)
    ref.set_progress_bar_config(disable=True)

    prompt, negative = "a red fox sitting in the snow, watercolor", "blurry, low quality"
    common = dict(height=args.size, width=args.size, num_inference_steps=args.steps)

    def qi_loop():
        ours(prompt, negative_prompt=negative, cfg_scale=4.0, seed=0, output_type="latent",
             progress_bar_cmd=lambda x: x, **common)  # fmt: skip

    def ref_loop():
        ref(prompt=prompt, negative_prompt=negative, true_cfg_scale=4.0, generator=torch.Generator().manual_seed(0),
            output_type="latent", **common)  # fmt: skip

    def qi_full():
        ours(prompt, negative_prompt=negative, cfg_scale=4.0, seed=0, output_type="pil",
             progress_bar_cmd=lambda x: x, **common)  # fmt: skip

    def ref_full():
        ref(prompt=prompt, negative_prompt=negative, true_cfg_scale=4.0, generator=torch.Generator().manual_seed(0),
            output_type="pil", **common)  # fmt: skip

    z = torch.randn(1, 16, args.size // 8, args.size // 8, device=args.device, dtype=dtype)

    def qi_decode():
        with torch.inference_mode():
            ours.vae.decode(z)

    def ref_decode():
        with torch.inference_mode():
            ref.vae.decode(z.unsqueeze(2))

    pairs = {"denoising loop": (qi_loop, ref_loop), "VAE decode": (qi_decode, ref_decode),
             "whole pipeline": (qi_full, ref_full)}  # fmt: skip
    for fn in (qi_loop, ref_loop, qi_decode, ref_decode):  # warm-up
        fn()
    print(f"model: {args.blocks} blocks x width {args.width}, VAE base {args.vae_base}, {args.size}x{args.size}, "
          f"{args.steps} steps, CFG on, {dtype}, {args.device}, {torch.get_num_threads()} threads")  # fmt: skip
    loops: tuple[list[float], list[float], list[float]] = ([], [], [])
    print(f"{'measurement':<16} {'qi (s)':>9} {'diffusers (s)':>14} {'ratio':>7}")
    for name, (a, b) in pairs.items():
        ta, tb, peaks = [], [], []
        for _ in range(args.repeats):
            if name == "denoising loop" and args.device == "cpu":  # the machine's speed beside each pair
                peaks.append(gemm_peak())
            ta.append(timed(a))
            tb.append(timed(b))
        ma, mb = statistics.median(ta), statistics.median(tb)
        print(f"{name:<16} {ma:>9.3f} {mb:>14.3f} {ma / mb:>7.2f}")
        if name == "denoising loop":
            loops = (ta, tb, peaks)
    if args.device != "cpu":
        return
    flops = roofline(ref_loop, *loops)
    if args.compile:
        from qi_plugins.cache import compile_blocks

        compile_blocks(ours)
        first = timed(qi_loop)  # the compile
        times, peaks = [], []
        for _ in range(args.repeats):
            peaks.append(gemm_peak())
            times.append(timed(qi_loop))
        median = statistics.median(times)
        print(f"compiled blocks: first loop {first:.1f} s (the compile), then {median:.3f} s "
              f"= {statistics.median(loops[0]) / median:.2f}x eager -> {at_peak(times, peaks, flops):.2f} x the "
              f"time at peak ({flops / median / 1e9:.0f} GFLOP/s)")  # fmt: skip


def gemm_peak(tries: int = 3) -> float:
    """FLOP/s of the fastest float32 GEMM this torch has here: a large square product through ``kernels.linear``
    on each of its paths (oneDNN where this build has it, and the BLAS), best of ``tries`` each."""
    from qi_plugins.qwen_image import kernels

    n = 2048
    layer, a = torch.nn.Linear(n, n, bias=False).requires_grad_(False), torch.randn(n, n)
    paths = [kernels.disabled] + ([kernels.forced] if kernels.available() else [])
    best = 0.0
    for path in paths:
        with path():
            kernels.linear(layer, a)
            best = max(best, *(2 * n**3 / timed(lambda: kernels.linear(layer, a)) for _ in range(tries)))
    return best


def at_peak(times: list[float], peaks: list[float], flops: float) -> float:
    """The median over runs of each run's time against ``flops`` at the GEMM peak measured just before it."""
    return statistics.median(t * p / flops for t, p in zip(times, peaks, strict=True))


def roofline(ref_loop, ours: list[float], theirs: list[float], peaks: list[float]) -> float:
    """How close both loops are to the machine: the loop's FLOPs (counted on the reference) at the GEMM peak
    measured just before each pair of runs (a shared machine's speed drifts), the median over the pairs.
    Returns the FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    def attention_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:  # QKᵀ and PV; CPU flash is unlisted
        *batch, sq, d = q
        return 4 * math.prod(batch) * sq * k[-2] * d

    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_flash: attention_flops})
    with counter:
        ref_loop()
    flops = counter.get_total_flops()
    ratio, ref_ratio = at_peak(ours, peaks, flops), at_peak(theirs, peaks, flops)
    print(f"loop work {flops / 1e9:.0f} GFLOP; float32 GEMM peak here {min(peaks) / 1e9:.0f}–{max(peaks) / 1e9:.0f} "
          f"GFLOP/s over the runs -> qi's loop {ratio:.2f} x the time at peak, diffusers' {ref_ratio:.2f} x "
          f"(qi {flops / statistics.median(ours) / 1e9:.0f} GFLOP/s, diffusers "
          f"{flops / statistics.median(theirs) / 1e9:.0f})")  # fmt: skip
    return flops


if __name__ == "__main__":
    main()
