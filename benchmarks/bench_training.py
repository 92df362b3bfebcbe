"""LoRA training: seconds per step and peak RSS of ``qi train`` on a small random model, in its own process.

    python benchmarks/bench_training.py [--size 256 --steps 20 --rank 16 --blocks 4 --width 256]

Step time is the median of the logged ``step_time_s`` after the first 3 steps (warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import sys
from pathlib import Path
from qi_core.cli import main
rc = main(sys.argv[1:])
hwm = next(int(l.split()[1]) * 1024 for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM'))
print('PEAK_RSS', hwm)
sys.exit(rc)
"""


def make_data(folder: Path, size: int, n: int = 4) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["image,prompt"]
    for i in range(n):
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / "images" / f"{i}.png")
        lines.append(f"images/{i}.png,a picture number {i}")
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def run_qi(model: Path, data: Path, out: Path, args) -> tuple[float, int]:
    argv = ["train", "--dataset_base_path", str(data), "--dataset_metadata_path", str(data / "metadata.csv"),
            "--model", str(model), "--lora_base_model", "dit", "--lora_rank", str(args.rank),
            "--learning_rate", "1e-4", "--dataset_repeat", "100", "--max_steps", str(args.steps),
            "--save_steps", str(10**6), "--height", str(args.size), "--width", str(args.size),
            "--output_path", str(out)]  # fmt: skip
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    peak = int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("PEAK_RSS")))
    rows = [json.loads(line) for line in (out / "logs" / "train_log.jsonl").read_text().splitlines()]
    return statistics.median(r["step_time_s"] for r in rows[3:] or rows), peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--width", type=int, default=256)
    args = ap.parse_args()

    from qi_plugins.qwen_image.dit import DiTConfig
    from qi_plugins.qwen_image.tiny import make_tiny_model

    tmp = Path(tempfile.mkdtemp())
    cfg = DiTConfig(num_layers=args.blocks, num_attention_heads=args.width // 128, attention_head_dim=128,
                    joint_attention_dim=64)  # fmt: skip
    model = make_tiny_model(tmp / "model", dit_config=cfg)
    data = make_data(tmp / "data", args.size)
    step, peak = run_qi(model, data, tmp / "out-qi", args)
    print(f"LoRA rank {args.rank}, DiT {args.blocks} blocks x width {args.width}, {args.size}x{args.size}, "
          f"batch 1, float32, CPU")  # fmt: skip
    print(f"{'trainer':<12} {'s/step':>8} {'peak RSS GiB':>13}")
    print(f"{'qi':<12} {step:>8.3f} {peak / 1024**3:>13.2f}")
    # DiffSynth-Studio's trainer needs torchvision and a CUDA build of torch, which cannot be installed beside
    # this project's pinned torch, so the side-by-side ratio is not measured here.
    print("DiffSynth-Studio trainer: not run here (needs torchvision beside a different torch build)")


if __name__ == "__main__":
    main()
