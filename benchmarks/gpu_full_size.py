"""Full-size Qwen-Image DiT (20.43 B parameters, random bf16 weights) on one GPU at 1328x1328 with CFG.

    python benchmarks/gpu_full_size.py [--steps 6 --size 1328 --policies none,low-vram --diffusers]
    python benchmarks/gpu_full_size.py --smoke      # a tiny config on the CPU: checks the script itself

Reports seconds per denoising step (both CFG passes) and peak GPU memory for each memory policy, and the same
for diffusers' QwenImageTransformer2DModel (two separate passes per step, as its pipeline runs them) when
diffusers is installed. Needs about 45 GB of GPU memory for `none`, 45 GB of host RAM for `low-vram`.
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


def run_qi(policy_name: str, steps: int, size: int) -> tuple[float, float]:
    from qi_core.composer import memory_policies
    from qi_core.loading import Loaded
    from qi_core.protocols import DenoiseInput

    reset_peak()
    policy = memory_policies(policy_name, ["dit"])["dit"]
    dit = make_dit(DEV if policy_name == "none" else "cpu")
    dit = policy.attach(Loaded(dit), device=DEV, dtype=DTYPE)
    reset_peak()
    x, pos, neg = inputs(size)
    sigmas = torch.linspace(1, 0.02, steps, device=DEV)
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
            v_pos, v_neg = dit.forward_many(
                [DenoiseInput(latents=x, timestep=t, text=[s]) for s in (pos, neg)]
            )
            x = x + (v_neg + 4.0 * (v_pos - v_neg)) * -0.02
            sync()
            times.append(time.perf_counter() - t0)
    del dit
    return statistics.median(times[1:] or times), peak_gib()


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
    ap.add_argument("--policies", default="none,low-vram")
    ap.add_argument("--diffusers", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny DiT on the CPU in float32 (checks the script)")
    args = ap.parse_args()
    global DEV, DTYPE
    if args.smoke:
        DEV, DTYPE = "cpu", torch.float32
        CONFIG.update(num_layers=2, num_attention_heads=2, attention_head_dim=32, joint_attention_dim=64,
                      axes_dims_rope=(8, 12, 12))  # fmt: skip
        args.size, args.steps = min(args.size, 128), min(args.steps, 3)
    name = torch.cuda.get_device_name() if DEV == "cuda" else "CPU (smoke test)"
    print(f"{name}, {args.size}x{args.size}, CFG (text 128 + 8 tokens), {DTYPE}")
    print(f"{'engine / policy':<24} {'s/step':>8} {'40-step image (s)':>18} {'peak GPU GiB':>13}")
    for name in args.policies.split(","):
        s, mem = run_qi(name, args.steps, args.size)
        print(f"{'qi ' + name:<24} {s:>8.3f} {40 * s:>18.1f} {mem:>13.2f}", flush=True)
    if args.diffusers:
        s, mem = run_diffusers(args.steps, args.size)
        print(f"{'diffusers':<24} {s:>8.3f} {40 * s:>18.1f} {mem:>13.2f}")


if __name__ == "__main__":
    main()
