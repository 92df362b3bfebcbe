"""``qi generate`` under torchrun: CFG-parallel over two gloo processes writes, from rank 0 only, the same
bytes as one process; without --seed it refuses (every rank must draw the same noise)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
ARGS = ["a fox", "--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--cfg-scale", "3"]


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)


def test_cfg_parallel_generate_equals_one_process(tmp_path):
    env = {
        **os.environ,
        "QI_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
        "QI_PARALLEL_CFG": "2",
    }
    single, parallel = tmp_path / "single.png", tmp_path / "parallel.png"
    r = run([str(BIN / "qi"), "generate", *ARGS, "--seed", "1", "--out", str(single)], env)
    assert r.returncode == 0, r.stderr
    torchrun = [
        shutil.which("torchrun", path=str(BIN)),
        "--nproc-per-node",
        "2",
        "--no-python",
        str(BIN / "qi"),
    ]
    r = run(
        [*torchrun, "generate", *ARGS, "--step-runner", "parallel", "--seed", "1", "--out", str(parallel)],
        env,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote ") == 1  # rank 0 writes
    assert parallel.read_bytes() == single.read_bytes()
    r = run(
        [*torchrun, "generate", *ARGS, "--step-runner", "parallel", "--out", str(tmp_path / "x.png")], env
    )
    assert r.returncode != 0 and "give --seed when running on several processes" in r.stderr
