"""The ``parallel`` step runner on the golden cases (gloo, CPU, float32): ``cfg=2``, ``ulysses=2`` (2 ranks) and
``cfg=2 × ulysses=2`` (4 ranks) give the float image of one process within 1e-5 on t2i, edit_multi, edit_2511,
eligen, controlnet and layered, and every rank holds the same image. ``qi generate --nproc 2`` on the golden
t2i case writes the image of one process: the same bytes under CFG-parallel, pixels within one 8-bit level
under Ulysses and ring attention. The ranks are forked from the test process (its imports inherited), each
composing its pipelines with ``parallel=``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import GOLDEN_MODEL, golden_case
from golden_parallel_cases import CASES, compose, golden_image, load_result, rank_main, run_case
from parallel_cases import run_ranks
from PIL import Image

from qi_core.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")

ATOL = 1e-5  # the requirement: max abs diff of the float image against one process
MODES = {"cfg=2": (2, 1), "ulysses=2": (1, 2), "cfg=2 x ulysses=2": (2, 2)}
# fork: the ranks inherit the imports of the test process (a spawned rank spends ~6 s importing)
START = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
QI = [sys.executable, "-m", "qi_core.cli", "generate"]
LAUNCHER_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "QI_PARALLEL_CFG", "QI_PARALLEL_ULYSSES")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """No launcher variables in the test process, the ranks and the launches; a cache folder of its own."""
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("QI_CACHE_DIR", str(tmp_path_factory.mktemp("qi-cache")))
        for name in LAUNCHER_VARS:
            mp_.delenv(name, raising=False)
        yield


@pytest.fixture(scope="module")
def pipes(env):
    return {name: compose(name) for name in CASES}


@pytest.fixture(scope="module")
def single(pipes):
    """The single-process float image of each case (the pipeline's default runner)."""
    return {name: run_case(pipe, name) for name, pipe in pipes.items()}


def spawn(world: int, jobs: list, folder) -> dict:
    """Run ``jobs`` on ``world`` gloo ranks; {(cfg, ulysses, case): [each rank's :func:`load_result`]}."""
    run_ranks(rank_main, world, jobs, folder, START)
    return {(c, u, name): [load_result(folder / f"{c}x{u}.{name}.{r}.safetensors") for r in range(world)]
            for c, u, cases in jobs for name in cases}  # fmt: skip


@pytest.fixture(scope="module")
def ranks(env, tmp_path_factory):
    """Every mode's results: cfg=2 and ulysses=2 in one spawn of 2 ranks, cfg=2 × ulysses=2 in one of 4."""
    two = spawn(2, [(2, 1, list(CASES)), (1, 2, list(CASES))], tmp_path_factory.mktemp("golden-ranks2"))
    four = spawn(4, [(2, 2, list(CASES))], tmp_path_factory.mktemp("golden-ranks4"))
    return {**two, **four}


def test_golden_tiny_dit_heads_split_over_two_ranks(pipes):
    for name, pipe in pipes.items():
        dit = pipe.components["dit"]
        assert dit.config.num_attention_heads % 2 == 0, (name, dit.config.num_attention_heads)


@pytest.mark.parametrize("name", CASES)
def test_single_process_matches_the_golden_image(name, single):
    want, atol = golden_image(name)
    got = single[name]
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = float((got - want).abs().max())
    print(f"{name}: single process vs golden image_float {diff:.3g} (atol {atol})")
    assert diff <= atol


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_parallel_equals_single_process(name, mode, ranks, single):
    cfg, ulysses = MODES[mode]
    results = ranks[(cfg, ulysses, name)]
    first = results[0]["image"]
    for r, res in enumerate(results[1:], 1):
        assert torch.equal(res["image"], first), f"{mode} {name}: rank {r} holds another image than rank 0"
    assert all(res["mesh"] == (cfg * ulysses, cfg, ulysses) for res in results), [r["mesh"] for r in results]
    if ulysses > 1:  # the sequence was split on every rank
        assert all(res["parts"] > 0 for res in results), [res["parts"] for res in results]
    else:
        assert all(res["parts"] == 0 for res in results)
    want = single[name]
    assert first.shape == want.shape, (first.shape, want.shape)
    diff = float((first - want).abs().max())
    print(f"{mode} {name}: max abs diff of the float image vs one process {diff:.3g}")
    assert diff <= ATOL, f"{mode} {name}: {diff:.3g} > {ATOL}"


# -- qi generate --nproc ---------------------------------------------------------------------------------------
def t2i_argv() -> list[str]:
    """The golden t2i call as ``qi generate`` arguments, float32 on the CPU."""
    case, _, _ = golden_case("t2i")
    call = dict(case["call"])
    argv = [call.pop("prompt"), "--model", str(GOLDEN_MODEL), "--dtype", "float32", "--device", "cpu"]
    for key, value in call.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


CLI_MODES = {"cfg": ["--cfg-parallel", "2"], "ulysses": ["--ulysses", "2"], "ring": ["--ring", "2"]}


@pytest.fixture(scope="module")
def cli(env, tmp_path_factory) -> dict:
    """The t2i PNG of one process (``qi generate`` in the test process) and of both ``--nproc 2`` launches,
    started together (each spends most of its time importing): {"single": png, mode: png}."""
    folder = tmp_path_factory.mktemp("cli")
    outs = {"single": folder / "single.png", **{mode: folder / f"{mode}.png" for mode in CLI_MODES}}
    environ = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    environ["OMP_NUM_THREADS"] = "1"
    launches = {
        mode: subprocess.Popen(
            [*QI, *t2i_argv(), "--nproc", "2", *flags, "--out", str(outs[mode])],
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        for mode, flags in CLI_MODES.items()
    }
    try:
        assert main(["generate", *t2i_argv(), "--out", str(outs["single"])]) == 0
        for mode, launch in launches.items():
            stdout, stderr = launch.communicate(timeout=180)
            assert launch.returncode == 0, f"--nproc 2 {' '.join(CLI_MODES[mode])}: {stderr}"
            assert stdout.count("wrote ") == 1  # rank 0 writes
    finally:
        for launch in launches.values():
            if launch.poll() is None:
                os.killpg(launch.pid, signal.SIGKILL)
    return outs


def test_cli_nproc_cfg_parallel_writes_the_bytes_of_one_process(cli):
    assert cli["cfg"].read_bytes() == cli["single"].read_bytes()


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_cli_nproc_sequence_parallel_within_one_level_of_one_process(cli, mode):
    a, b = (np.asarray(Image.open(cli[k]), dtype=np.int16) for k in ("single", mode))
    assert a.shape == b.shape == (64, 96, 3)
    diff = int(np.abs(a - b).max())
    print(f"qi generate --nproc 2 --{mode} 2, t2i: max 8-bit difference vs one process {diff}")
    assert diff <= 1
