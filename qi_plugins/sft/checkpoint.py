"""Checkpoints: the seed's weight files, and resumable training states. Safetensors only (no pickle).

``output_path/step-N.safetensors`` (or ``epoch-K.safetensors``) holds the trained weights in the seed's key
layout — what ``qi validate`` and any LoRA loader read. ``output_path/checkpoints/step-N/`` holds everything
needed to continue exactly: the trained weights under their full names, the optimizer state, the LR scheduler,
every process's RNG states and the data position (epoch, step within it). The folder is assembled under a
temporary name and renamed into place, so a run killed while saving leaves the previous state intact.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qi_core.atomic import save_safetensors
from qi_core.errors import InvalidInputError, ModelLoadError

STATES = "checkpoints"
STATE_FILE = "state.json"


def save_weights(
    weights: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """``weights`` as a safetensors file, written atomically (readers never see a half-written file)."""
    return save_safetensors(weights, path, metadata=metadata or {"format": "pt"})


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path}: qi reads and writes .safetensors checkpoints only")
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist")
    return load_file(str(path))


# -- optimizer state as tensors + JSON ---------------------------------------------------------------------
def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                plain.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "plain": plain, "ids": [int(i) for i in sd["state"]]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): {} for i in meta["ids"]}
    for key, t in tensors.items():
        _, pid, k = key.split(".", 2)
        state[int(pid)][k] = t
    for pid, d in meta["plain"].items():
        state[int(pid)].update(d)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- RNG -----------------------------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Python, NumPy, torch CPU (and CUDA) generator states of this process."""
    np_state = np.random.get_state()
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                               float(np_state[4])]}  # fmt: skip
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    v, internal, gauss = meta["python"]
    random.setstate((v, tuple(internal), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# -- training states -----------------------------------------------------------------------------------------
def state_dir(output_path: str | Path, step: int) -> Path:
    return Path(output_path) / STATES / f"step-{step}"


def begin_state(output_path: str | Path, step: int) -> Path:
    """The temporary folder a state is assembled in (the same name on every process)."""
    tmp = Path(output_path) / STATES / f".step-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_main_state(tmp: Path, *, weights: dict[str, torch.Tensor], optimizer: dict[str, Any] | None,
                     scheduler: dict[str, Any] | None, info: dict[str, Any]) -> None:  # fmt: skip
    """What the main process writes: trained weights (full names), optimizer, scheduler, position."""
    from safetensors.torch import save_file

    save_file(weights, str(tmp / "trainable.safetensors"))
    if optimizer is not None:
        tensors, meta = flatten_optimizer(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"qi": json.dumps(meta)})
    (tmp / STATE_FILE).write_text(json.dumps({**info, "scheduler": scheduler}, indent=1))


def write_rng(tmp: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors, meta = rng_state()
    save_file(tensors, str(tmp / f"rng-{rank}.safetensors"), metadata={"qi": json.dumps(meta)})


def commit_state(tmp: Path, final: Path) -> Path:
    """Rename the assembled folder into place (the atomic step)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def prune_states(output_path: str | Path, keep: int) -> None:
    states = sorted(list_states(output_path), key=lambda p: _step(p))
    for old in states[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_states(output_path: str | Path) -> list[Path]:
    root = Path(output_path) / STATES
    if not root.is_dir():
        return []
    return [
        p
        for p in root.iterdir()
        if p.is_dir() and re.fullmatch(r"step-\d+", p.name) and (p / STATE_FILE).exists()
    ]


def _step(p: Path) -> int:
    return int(p.name.split("-")[1])


def find_resume(spec: str, output_path: str | Path) -> tuple[Path | None, Path | None]:
    """``--resume_from_checkpoint`` → (state folder for an exact resume, or None; weight file, or None).

    Accepts ``latest`` (newest state under ``output_path``), a state folder, an output folder, or a weight file
    (the seed's meaning: weights only — unless its matching state folder exists next to it).
    """
    path = Path(spec)
    if spec == "latest" or (path.is_dir() and (path / STATES).is_dir()):
        root = Path(output_path) if spec == "latest" else path
        states = list_states(root)
        if not states:
            raise InvalidInputError(
                f"--resume_from_checkpoint {spec}: no training state under {root / STATES}"
            )
        return max(states, key=_step), None
    if path.is_dir():
        if not (path / STATE_FILE).exists():
            raise InvalidInputError(f"--resume_from_checkpoint {spec}: {path} holds no {STATE_FILE}")
        return path, None
    if path.is_file():
        match = path.parent / STATES / path.stem
        return (match if (match / STATE_FILE).exists() else None), path
    raise InvalidInputError(f"--resume_from_checkpoint {spec!r} does not exist")


def read_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None]:
    """(info incl. scheduler, trained weights by full name, optimizer state dict or None)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    info = json.loads((folder / STATE_FILE).read_text())
    weights = load_file(str(folder / "trainable.safetensors"))
    opt = None
    if (folder / "optimizer.safetensors").exists():
        with safe_open(str(folder / "optimizer.safetensors"), framework="pt") as f:
            meta = json.loads(f.metadata()["qi"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        opt = unflatten_optimizer(tensors, meta)
    return info, weights, opt


def restore_rng(folder: Path, rank: int) -> bool:
    from safetensors import safe_open

    path = folder / f"rng-{rank}.safetensors"
    if not path.exists():
        return False
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["qi"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    set_rng_state(tensors, meta)
    return True
