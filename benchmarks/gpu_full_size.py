"""Full-size Qwen-Image DiT (20.43 B parameters, random bf16 weights) on one GPU at 1328x1328 with CFG.

    python benchmarks/gpu_full_size.py [--steps 6 --size 1328 --policies none,low-vram,cache,compile --diffusers]
    python benchmarks/gpu_full_size.py --smoke      # a tiny config on the CPU: checks the script itself

Reports seconds per denoising step (both CFG passes) and peak GPU memory for each memory policy, and the same
for diffusers' QwenImageTransformer2DModel (two separate passes per step, as its pipeline runs them) when
diffusers is installed. Besides the memory policies, ``--policies`` takes two speed options on the ``none``
policy: ``cache`` (the first-block cache at ``--cache-threshold`` over ``--cache-steps`` steps; the mean s/step,
and how many evaluations it skipped: on random weights a skip rate says nothing about real images) and
``compile`` (the repeated block compiled with inductor; the first step, which compiles, is reported apart).
Needs about 45 GB of GPU memory for `none`, 45 GB of host RAM for `low-vram`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

DEV = "cuda"  # the compute device (--smoke: cpu)
CONFIG: dict = {}  # DiTConfig overrides (--smoke: a tiny one)
DTYPE = torch.bfloat16


def make_dit(device: str):
    from qi_plugins.qwen_image.dit import DiTConfig, QwenImageDiT

    with torch.device("meta"):
        dit = QwenImageDiT(DiTConfig(**CONFIG))
    dit = dit.to_empty(device=DEV).to(DTYPE)
    g = torch.Generator(DEV).manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.02, generator=g)
    if device == "cpu":
        dit = dit.to("cpu")
    return dit.eval().requires_grad_(False)


def inputs(size: int):
    from qi_core.protocols import TextSegment

    g = torch.Generator(DEV).manual_seed(1)
    d = CONFIG.get("joint_attention_dim", 3584)
    x = torch.randn(1, 16, size // 8, size // 8, device=DEV, dtype=DTYPE, generator=g)
    pos = TextSegment(torch.randn(1, 128, d, device=DEV, dtype=DTYPE, generator=g))
    neg = TextSegment(torch.randn(1, 8, d, device=DEV, dtype=DTYPE, generator=g))
    return x, pos, neg


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 1024**3 if DEV == "cuda" else 0.0


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_qi(variant: str, steps: int, size: int, threshold: float = 0.1) -> tuple[float, float, str]:
    """(s/step, peak GiB, a note) of qi's DiT for a memory policy, or ``cache`` / ``compile`` on ``none``."""
    from types import SimpleNamespace

    from qi_core.composer import memory_policies
    from qi_core.loading import Loaded
    from qi_core.protocols import DenoiseInput
    from qi_plugins.cache import FirstBlockCache, compile_blocks
    from qi_plugins.sampling.runners import Batched

    policy_name = variant if variant not in ("cache", "compile") else "none"
    reset_peak()
    policy = memory_policies(policy_name, ["dit"])["dit"]
    dit = make_dit(DEV if policy_name == "none" else "cpu")
    dit = policy.attach(Loaded(dit), device=DEV, dtype=DTYPE)
    runner = FirstBlockCache(threshold) if variant == "cache" else Batched()
    if variant == "compile":
        compile_blocks(dit, backend="inductor" if DEV == "cuda" else "aot_eager")
    reset_peak()
    x, pos, neg = inputs(size)
    sigmas = torch.linspace(1, 0.02, steps, device=DEV)
    state = SimpleNamespace(sigmas=sigmas, data={}, items=[])  # what a step runner reads of the run state
    times = []
    with torch.inference_mode(), policy.use(dit):
        if hasattr(policy, "prepare"):  # the modulation of every step, as the pipeline's first step does
            ts = (sigmas * 1000).to(DTYPE)
            first = [DenoiseInput(latents=x, timestep=ts[:1], text=[s]) for s in (pos, neg)]
            policy.prepare(dit, first, timesteps=ts)
        for i in range(steps):
            t = (sigmas[i : i + 1] * 1000).to(DTYPE)
            sync()
            t0 = time.perf_counter()
            sides = {
                side: DenoiseInput(latents=x, timestep=t, text=[s])
                for side, s in (("pos", pos), ("neg", neg))
            }
            v = runner.run(dit, sides, state=state, step=i, sigma=sigmas[i])
            x = x + (v["neg"] + 4.0 * (v["pos"] - v["neg"])) * -0.02
            sync()
            times.append(time.perf_counter() - t0)
    del dit
    if variant == "cache":  # every step counts: the skipped ones are the point
        return statistics.mean(times), peak_gib(), runner.last.summary()
    note = f"first step {times[0]:.1f} s (compiles)" if variant == "compile" else ""
    return statistics.median(times[1:] or times), peak_gib(), note


def run_diffusers(steps: int, size: int) -> tuple[float, float]:
    import diffusers

    reset_peak()
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in CONFIG.items()}
    # built directly on the device in the benchmark dtype: its RoPE tables are plain attributes, not buffers,
    # so a meta-device build would leave them empty
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        with torch.device(DEV):
            ref = diffusers.QwenImageTransformer2DModel(**cfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    reset_peak()
    x, pos, neg = inputs(size)
    packed = x.view(1, 16, size // 16, 2, size // 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, 64)
    shapes = [[(1, size // 16, size // 16)]]
    times = []
    with torch.inference_mode():
        for i in range(steps):
            t = torch.full((1,), 1 - i / steps, device=DEV, dtype=DTYPE)
            sync()
            t0 = time.perf_counter()
            a = ref(
                hidden_states=packed,
                encoder_hidden_states=pos.emb,
                timestep=t,
                img_shapes=shapes,
                return_dict=False,
            )[0]
            b = ref(
                hidden_states=packed,
                encoder_hidden_states=neg.emb,
                timestep=t,
                img_shapes=shapes,
                return_dict=False,
            )[0]
            packed = packed + (b + 4.0 * (a - b)) * -0.02
            sync()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] or times), peak_gib()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6, help="steps measured (the median is reported)")
    ap.add_argument("--size", type=int, default=1328)
    ap.add_argument("--policies", default="none,low-vram,cache,compile")
    ap.add_argument(
        "--cache-steps", type=int, default=20, help="steps of the cache run (all of them are timed)"
    )
    ap.add_argument("--cache-threshold", type=float, default=0.1)
    ap.add_argument("--diffusers", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny DiT on the CPU in float32 (checks the script)")
    args = ap.parse_args()
    global DEV, DTYPE
    if args.smoke:
        DEV, DTYPE = "cpu", torch.float32
        CONFIG.update(num_layers=2, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
                      axes_dims_rope=(8, 12, 12))  # fmt: skip
        args.size, args.steps, args.cache_steps = (
            min(args.size, 128),
            min(args.steps, 3),
            min(args.cache_steps, 12),
        )
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (smoke test)"
    print(f"{name}, {args.size}x{args.size}, CFG (text 128 + 8 tokens), {DTYPE}")
    print(f"{'engine / policy':<24} {'s/step':>8} {'40-step image (s)':>18} {'peak GPU GiB':>13}")
    for name in args.policies.split(","):
        steps = args.cache_steps if name == "cache" else args.steps
        s, mem, note = run_qi(name, steps, args.size, args.cache_threshold)
        print(f"{'qi ' + name:<24} {s:>8.3f} {40 * s:>18.1f} {mem:>13.2f}  {note}", flush=True)
    if args.diffusers:
        s, mem = run_diffusers(args.steps, args.size)
        print(f"{'diffusers':<24} {s:>8.3f} {40 * s:>18.1f} {mem:>13.2f}")


if __name__ == "__main__":
    main()
