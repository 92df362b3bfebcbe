"""Full-size Qwen-Image DiT (20.43 B parameters, random bf16 weights) on one GPU at 1328x1328 with CFG.

    python benchmarks/gpu_full_size.py [--steps 40 --size 1328 --policies none,low-vram --diffusers]

Reports seconds per denoising step (both CFG passes) and peak GPU memory for each memory policy, and the same
for diffusers' QwenImageTransformer2DModel (two separate passes per step, as its pipeline runs them) when
diffusers is installed. Needs about 45 GB of GPU memory for `none`, 45 GB of host RAM for `low-vram`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def make_dit(device: str):
    from qi_plugins.qwen_image.dit import DiTConfig, QwenImageDiT

    with torch.device("meta"):
        dit = QwenImageDiT(DiTConfig())
    dit = dit.to_empty(device="cuda").to(torch.bfloat16)
    g = torch.Generator("cuda").manual_seed(0)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.02, generator=g)
    if device == "cpu":
        dit = dit.to("cpu")
    return dit.eval().requires_grad_(False)


def inputs(size: int, dtype=torch.bfloat16):
    from qi_core.protocols import TextSegment

    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 16, size // 8, size // 8, device="cuda", dtype=dtype, generator=g)
    pos = TextSegment(torch.randn(1, 128, 3584, device="cuda", dtype=dtype, generator=g))
    neg = TextSegment(torch.randn(1, 8, 3584, device="cuda", dtype=dtype, generator=g))
    return x, pos, neg


def run_qi(policy_name: str, steps: int, size: int) -> tuple[float, float]:
    from qi_core.composer import memory_policies
    from qi_core.protocols import DenoiseInput

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    policy = memory_policies(policy_name, ["dit"])["dit"]
    dit = make_dit("cuda" if policy_name == "none" else "cpu")
    dit = policy.attach(dit, device="cuda", dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    x, pos, neg = inputs(size)
    sigmas = torch.linspace(1, 0.02, steps, device="cuda")
    times = []
    with torch.inference_mode(), policy.use(dit):
        if hasattr(policy, "skip_parameters"):
            first = [DenoiseInput(latents=x, timestep=sigmas[:1] * 1000, text=[s]) for s in (pos, neg)]
            dit.fill_step_cache(first, sigmas * 1000)
            policy.skip_parameters(dit.step_cache_parameters())
        for i in range(steps):
            t = (sigmas[i : i + 1] * 1000).to(torch.bfloat16)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            v_pos, v_neg = dit.forward_many(
                [DenoiseInput(latents=x, timestep=t, text=[s]) for s in (pos, neg)]
            )
            x = x + (v_neg + 4.0 * (v_pos - v_neg)) * -0.02
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    del dit
    return statistics.median(times[1:] or times), torch.cuda.max_memory_allocated() / 1024**3


def run_diffusers(steps: int, size: int) -> tuple[float, float]:
    import diffusers

    torch.cuda.empty_cache()
    with torch.device("meta"):
        ref = diffusers.QwenImageTransformer2DModel()
    ref = ref.to_empty(device="cuda").to(torch.bfloat16).eval().requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    torch.cuda.reset_peak_memory_stats()
    x, pos, neg = inputs(size)
    packed = x.view(1, 16, size // 16, 2, size // 16, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, -1, 64)
    shapes = [[(1, size // 16, size // 16)]]
    times = []
    with torch.inference_mode():
        for i in range(steps):
            t = torch.full((1,), 1 - i / steps, device="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
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
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] or times), torch.cuda.max_memory_allocated() / 1024**3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6, help="steps measured (the median is reported)")
    ap.add_argument("--size", type=int, default=1328)
    ap.add_argument("--policies", default="none,low-vram")
    ap.add_argument("--diffusers", action="store_true")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, {args.size}x{args.size}, CFG (text 128 + 8 tokens), bf16")
    print(f"{'engine / policy':<24} {'s/step':>8} {'40-step image (s)':>18} {'peak GPU GiB':>13}")
    for name in args.policies.split(","):
        s, mem = run_qi(name, args.steps, args.size)
        print(f"{'qi ' + name:<24} {s:>8.3f} {40 * s:>18.1f} {mem:>13.2f}", flush=True)
    if args.diffusers:
        s, mem = run_diffusers(args.steps, args.size)
        print(f"{'diffusers':<24} {s:>8.3f} {40 * s:>18.1f} {mem:>13.2f}")


if __name__ == "__main__":
    main()
