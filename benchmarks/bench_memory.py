"""Peak memory per memory policy on a random model whose DiT weighs --dit-gb GB, each policy in its own process.

    python benchmarks/bench_memory.py [--dit-gb 3 --policies none,offload,stream,disk,fp8,low-vram]

Prints peak RSS (and peak CUDA memory on a GPU) per policy, peak RSS against the DiT's weight bytes, and the
largest difference of each policy's output from ``none``'s.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

GiB = 1024**3
CALL = dict(prompt="a lighthouse", negative_prompt="fog", cfg_scale=3.0, height=64, width=96, seed=1,
            num_inference_steps=2, output_type="np")  # fmt: skip


def build(folder: Path, dit_gb: float, width: int) -> tuple[Path, int]:
    from qi_plugins.qwen_image.dit import DiTConfig, QwenImageDiT
    from qi_plugins.qwen_image.tiny import TINY_VAE, make_tiny_model

    heads = width // 128
    per_block = sum(p.numel() for p in QwenImageDiT(DiTConfig(num_layers=1, num_attention_heads=heads,
                    attention_head_dim=128, joint_attention_dim=64)).transformer_blocks.parameters()) * 4  # fmt: skip
    layers = max(2, round(dit_gb * 1e9 / per_block))
    cfg = DiTConfig(
        num_layers=layers, num_attention_heads=heads, attention_head_dim=128, joint_attention_dim=64
    )
    make_tiny_model(folder, dit_config=cfg, vae_config=TINY_VAE, overwrite=True)
    weights = (folder / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    return folder, weights


def peak_rss() -> int:
    """High-water mark of this process's resident memory (VmHWM: reset at exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(policy: str, model: str, out: str) -> None:
    import torch

    import qi_core as qi

    device = "cuda" if torch.cuda.is_available() else "cpu"
    memory = json.loads(policy) if policy.startswith("{") else policy
    before = peak_rss()
    pipe = qi.compose("qwen-image", model=model, device=device, memory=memory, progress=False)
    image = pipe(**CALL, progress_bar_cmd=lambda x: x)
    np.save(out, image)
    peak = peak_rss()
    cuda = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    print(json.dumps({"peak_rss": peak, "before": before, "cuda_peak": cuda}))


def run(policy: str, model: Path, tmp: Path) -> dict:
    out = tmp / f"{abs(hash(policy))}.npy"
    r = subprocess.run([sys.executable, __file__, "--child", policy, "--model", str(model), "--out", str(out)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"{policy} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    res["image"] = np.load(out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dit-gb", type=float, default=3.0)
    ap.add_argument("--width", type=int, default=1536)
    ap.add_argument("--policies", default="none,offload,stream,disk,fp8,low-vram,lowest-vram")
    ap.add_argument("--child")
    ap.add_argument("--model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.model, args.out)
    tmp = Path(tempfile.mkdtemp())
    model, weights = build(tmp / "model", args.dit_gb, args.width)
    print(f"DiT weights: {weights / GiB:.2f} GiB ({weights / 1e9:.2f} GB), float32, "
          f"{CALL['height']}x{CALL['width']}, {CALL['num_inference_steps']} steps, CFG")  # fmt: skip
    print(f"{'policy':<14} {'peak RSS GiB':>12} {'RSS/weights':>11} {'bound 0.3W+1GiB':>15} {'CUDA GiB':>9} "
          f"{'max|diff| vs none':>18}")  # fmt: skip
    base = None
    for policy in args.policies.split(","):
        res = run(policy, model, tmp)
        base = res["image"] if base is None else base
        diff = float(np.abs(res["image"] - base).max())
        bound = 0.3 * weights + GiB
        print(f"{policy:<14} {res['peak_rss'] / GiB:>12.2f} {res['peak_rss'] / weights:>11.2f} "
              f"{'ok' if res['peak_rss'] <= bound else 'over':>15} {res['cuda_peak'] / GiB:>9.2f} {diff:>18.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
