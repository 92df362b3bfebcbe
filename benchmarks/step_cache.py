"""Step caches and regional compilation on random models, side by side in one process.

Times are the best of two runs, the reference re-run beside each cached run; on a shared or busy CPU they still
move by tens of percent, so read a ratio near 1 as "no change".

    python benchmarks/step_cache.py [--steps 50,8] [--thresholds 0.05,0.1,0.3,0.6] [--big] [--compile inductor]

For each model (the golden tiny DiT; with ``--big`` a random 8-block, width-512 DiT on the tiny text encoder and
VAE) and step count: the default runner vs ``first-block-cache`` and ``teacache`` at a few thresholds, printing
the skipped evaluations, the time ratio (default / cached, > 1 is faster) and the max abs difference of the
float images. Then regional compilation (``compile_blocks``) with ``--compile`` (``inductor``, or ``aot_eager``
when no C++ compiler is wanted) vs eager: first-call time (the compile) and steady-state ratio.

Random weights do not behave like trained ones: their first-block residual changes by 0.3–0.6 (relative L1)
between steps where a trained Qwen-Image's changes by a few hundredths, so the thresholds that skip here are
far above the useful ones on real weights (0.05–0.12, see docs/cache.md), and the differences are those of
a model with no smooth trajectory. The time ratios show the mechanism's cost and saving, not image quality.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import qi_core as qi
from qi_plugins.cache import FirstBlockCache, TeaCache, compile_blocks, uncompile_blocks

CALL = dict(prompt="a lighthouse on a cliff at dusk", negative_prompt="fog", cfg_scale=4.0, seed=1,
            output_type="np", progress_bar_cmd=lambda x: x)  # fmt: skip


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def models(big: bool, tmp: Path) -> list[tuple[str, Path, int]]:
    golden = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "golden" / "models" / "qwen_image"
    out = [("golden tiny DiT (2 blocks, width 64)", golden, 64)]
    if big:
        from qi_plugins.qwen_image.dit import DiTConfig
        from qi_plugins.qwen_image.tiny import make_tiny_model

        cfg = DiTConfig(num_layers=8, num_attention_heads=4, attention_head_dim=128, joint_attention_dim=64,
                        axes_dims_rope=(16, 56, 56))  # fmt: skip
        out.append(("random DiT (8 blocks, width 512)", make_tiny_model(tmp / "big", dit_config=cfg), 128))
    return out


def caches(thresholds: list[float]):
    yield from (FirstBlockCache(t, max_skips=None) for t in thresholds)
    yield from (TeaCache(t / 10, max_skips=None) for t in thresholds)  # its signal moves ~10x less here


def step_caches(name: str, root: Path, size: int, steps: list[int], thresholds: list[float]) -> None:
    pipe = qi.compose("qwen-image", model=root, device="cpu", torch_dtype=torch.float32, progress=False)
    call = dict(CALL, height=size, width=size)
    for n in steps:
        pipe.step_runner = "batched"
        ref, t0 = timed(lambda n=n: pipe(num_inference_steps=n, **call), 2)
        print(f"\n{name}, {size}x{size}, {n} steps, CFG: default runner {t0:.2f} s")
        for runner in caches(thresholds):
            pipe.step_runner = runner
            out, t = timed(lambda n=n: pipe(num_inference_steps=n, **call), 2)
            pipe.step_runner = "batched"  # the reference again beside it: a shared CPU's load drifts
            t0 = min(t0, timed(lambda n=n: pipe(num_inference_steps=n, **call))[1])
            log = runner.last
            print(f"  {runner.name:<18} threshold {runner.threshold:<6g} skipped {log.skipped:>3}/{len(log.events):<3}"
                  f" time ratio {t0 / t:5.2f}x  max abs diff {np.abs(out - ref).max():.3g}")  # fmt: skip


def compiling(name: str, root: Path, size: int, backend: str) -> None:
    pipe = qi.compose("qwen-image", model=root, device="cpu", torch_dtype=torch.float32, progress=False)
    call = dict(CALL, num_inference_steps=4)
    sizes = [(size, size), (size, size + 32)]
    ref = {hw: timed(lambda hw=hw: pipe(height=hw[0], width=hw[1], **call), 3) for hw in sizes}
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compile_blocks(pipe, backend=backend)
    print(f"\n{name}: regional compile, backend {backend!r}, 4 steps, CFG")
    for hw in sizes:
        (_, first) = timed(lambda hw=hw: pipe(height=hw[0], width=hw[1], **call))
        out, t = timed(lambda hw=hw: pipe(height=hw[0], width=hw[1], **call), 3)
        (r, t0) = ref[hw]
        print(
            f"  {hw[0]}x{hw[1]}: eager {t0:.2f} s, compiled first call {first:.2f} s, then {t:.2f} s "
            f"(ratio {t0 / t:.2f}x), max abs diff {np.abs(out - r).max():.3g}"
        )
    print(
        f"  graphs compiled: {counters['stats']['unique_graphs']}, graph breaks: {sum(counters['graph_break'].values())}"
    )
    uncompile_blocks(pipe)


def medium(tmp: Path, steps: int, thresholds: list[float]) -> None:
    """The medium model of bench_pipeline.py (8 blocks x 768, 512², CFG): default runner vs first-block-cache,
    one run each (a run takes minutes on 2 cores): skipped fraction, time ratio, max and mean abs diff."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_pipeline import build_model

    pipe = qi.compose("qwen-image", model=build_model(tmp / "medium", 8, 768, 96), device="cpu",
                      torch_dtype=torch.float32, progress=False)  # fmt: skip
    call = dict(CALL, height=512, width=512, num_inference_steps=steps)
    ref, t0 = timed(lambda: pipe(**call))
    print(f"\nmedium DiT (8 blocks, width 768), 512x512, {steps} steps, CFG: default runner {t0:.1f} s")
    for t in thresholds:
        runner = pipe.step_runner = FirstBlockCache(t, max_skips=None)
        out, t1 = timed(lambda: pipe(**call))
        pipe.step_runner = "batched"
        d = np.abs(out - ref)
        print(
            f"  first-block-cache threshold {t:g}: skipped {runner.last.skipped}/{len(runner.last.events)}, "
            f"{t1:.1f} s, time ratio {t0 / t1:.2f}x, max abs diff {d.max():.3g}, mean {d.mean():.3g}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="50,8")
    ap.add_argument("--thresholds", default="0.05,0.3,0.6")
    ap.add_argument("--big", action="store_true", help="also a random 8-block, width-512 DiT")
    ap.add_argument(
        "--medium",
        type=int,
        default=0,
        metavar="STEPS",
        help="only the medium model of bench_pipeline.py (8 x 768, 512²) at STEPS steps",
    )
    ap.add_argument("--compile", default="aot_eager", help="backend for compile_blocks ('' to skip)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = [int(s) for s in args.steps.split(",")]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.medium:
            medium(Path(tmp), args.medium, thresholds)
            return 0
        for name, root, size in models(args.big, Path(tmp)):
            step_caches(name, root, size, steps, thresholds)
            if args.compile:
                compiling(name, root, size, args.compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
