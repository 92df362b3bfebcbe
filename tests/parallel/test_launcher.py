"""``qi generate --nproc``: the command starts its workers with torch's elastic launcher. CFG-parallel writes the
bytes of one process, Ulysses on an odd token count its pixels; a bad argument on one rank, a killed worker and
Ctrl-C end the run non-zero with the first error and leave no process behind.

Faults are injected from outside the code under test: a ``sitecustomize.py`` on ``PYTHONPATH`` that acts only in
the worker of rank 1 (the launcher and rank 0 import it too and do nothing)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from qi_core.cli import main

ARGS = ["a fox", "--model", "tiny", "--steps", "2", "--cfg-scale", "3", "--seed", "1"]
QI = [sys.executable, "-m", "qi_core.cli", "generate"]

BAD_ARGUMENT = """import os, sys
if os.environ.get("RANK") == "1":
    sys.argv += ["--height", "65"]  # this rank alone gets a bad argument
"""
KILLED = """import os, signal, sys
from importlib.machinery import PathFinder
if os.environ.get("RANK") == "1":
    class _KillAtFirstStep:  # once the runner module loads, its first step SIGKILLs this worker
        def find_spec(self, name, path=None, target=None):
            if name != "qi_plugins.parallel.runner":
                return None
            spec = PathFinder.find_spec(name, path)
            run_module = spec.loader.exec_module
            def exec_module(module):
                run_module(module)
                module.Parallel.run = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
            spec.loader.exec_module = exec_module
            return spec
    sys.meta_path.insert(0, _KillAtFirstStep())
"""


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))  # the tiny model, built once for the module


def _env(tmp_path: Path, marker: str, cache: str, site: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(QI_CACHE_DIR=cache, OMP_NUM_THREADS="1", QI_LAUNCH_TEST=marker)
    if site is not None:
        (tmp_path / "site").mkdir()
        (tmp_path / "site" / "sitecustomize.py").write_text(site)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env.get("PYTHONPATH", "")])
    return env


def _marked(marker: str) -> list[tuple[int, bool]]:
    """(pid, is a worker) of every live process whose environment carries ``marker``."""
    needle, found = f"QI_LAUNCH_TEST={marker}".encode(), []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                environ = (proc / "environ").read_bytes().split(b"\0")
            except OSError:  # gone, or not ours
                continue
            if needle in environ:
                found.append((int(proc.name), any(e.startswith(b"RANK=") for e in environ)))
    return found


def _no_orphans(marker: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while _marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _marked(marker), f"processes left behind: {_marked(marker)}"


def _launch(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    # its own session, like a command started from a shell; the marker finds whatever it leaves behind
    return subprocess.run([*QI, *argv], env=env, capture_output=True, text=True, timeout=180,
                          start_new_session=True)  # fmt: skip


def _single(cache: str, monkeypatch, out: Path, *extra: str) -> Path:
    """One process, in this one, on the workers' thread count (OMP_NUM_THREADS=1): a BLAS may sum in another
    order on another number of threads."""
    monkeypatch.setenv("QI_CACHE_DIR", cache)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["generate", *ARGS, *extra, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_nproc_cfg_parallel_writes_the_bytes_of_one_process(tmp_path, cache, monkeypatch):
    marker = uuid.uuid4().hex
    single = _single(cache, monkeypatch, tmp_path / "single.png", "--height", "64", "--width", "64")
    parallel = tmp_path / "parallel.png"
    r = _launch([*ARGS, "--height", "64", "--width", "64", "--nproc", "2", "--cfg-parallel", "2",
                 "--out", str(parallel)], _env(tmp_path, marker, cache))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote ") == 1  # rank 0 writes
    assert parallel.read_bytes() == single.read_bytes()
    _no_orphans(marker)


def test_nproc_ulysses_on_an_odd_token_count(tmp_path, cache, monkeypatch):
    """48×48: 9 image tokens over 2 ranks (5 + 4); the pixels within the float32 rounding (one 8-bit level)."""
    marker = uuid.uuid4().hex
    single = _single(cache, monkeypatch, tmp_path / "single.png", "--height", "48", "--width", "48")
    parallel = tmp_path / "parallel.png"
    r = _launch([*ARGS, "--height", "48", "--width", "48", "--ulysses", "2", "--out", str(parallel)],
                _env(tmp_path, marker, cache))  # fmt: skip
    assert r.returncode == 0, r.stderr
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (single, parallel))
    assert a.shape == b.shape == (48, 48, 3)
    assert np.abs(a - b).max() <= 1
    _no_orphans(marker)


@pytest.mark.parametrize(
    ("site", "said"),
    [
        (BAD_ARGUMENT, "qi: error: rank 1: height and width must be multiples of 16, got 65x32"),
        (KILLED, "qi: error: rank 1 (pid "),
    ],
    ids=["bad-argument-on-rank-1", "killed-worker"],
)
def test_a_failing_worker_ends_the_run_with_its_error(tmp_path, cache, site, said):
    marker = uuid.uuid4().hex
    began = time.monotonic()
    r = _launch([*ARGS, "--height", "32", "--width", "32", "--nproc", "2", "--out", str(tmp_path / "x.png")],
                _env(tmp_path, marker, cache, site))  # fmt: skip
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("qi: error:")]
    assert len(errors) == 1 and errors[0].startswith(said), r.stderr
    if site is KILLED:
        assert "SIGKILL" in errors[0]
    assert time.monotonic() - began < 60
    assert not (tmp_path / "x.png").exists()
    _no_orphans(marker)


def test_ctrl_c_stops_every_worker(tmp_path, cache):
    marker = uuid.uuid4().hex
    env = _env(tmp_path, marker, cache)
    argv = [*QI, *ARGS, "--height", "32", "--width", "32", "--steps", "1000", "--nproc", "2",
            "--out", str(tmp_path / "x.png")]  # fmt: skip
    launcher = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while sum(worker for _, worker in _marked(marker)) < 2 and time.monotonic() < deadline:
            assert launcher.poll() is None, launcher.communicate()
            time.sleep(0.1)
        assert sum(worker for _, worker in _marked(marker)) == 2, "the workers did not start"
        launcher.send_signal(signal.SIGINT)
        _, stderr = launcher.communicate(timeout=30)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 130, stderr
    assert "qi: interrupted" in stderr
    _no_orphans(marker, within=5)
