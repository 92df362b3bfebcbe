"""What a written image carries and where it goes: the reproduction record, output names for a batch, the
closing summary line."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

from qi_core.errors import InvalidInputError, OutputPathError
from qi_core.params import json_params


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_files(settings: dict[str, Any]) -> list[str]:
    """The files a call reads: string parameters (and items of list parameters) that name an existing file."""
    values = [v for k, v in settings.items() if k not in ("prompt", "negative_prompt")]
    values += [x for v in values if isinstance(v, (list, tuple)) for x in v]
    values += [
        x.get("image") for v in values if isinstance(v, (list, tuple)) for x in v if isinstance(x, dict)
    ]
    return list(dict.fromkeys(v for v in values if isinstance(v, str) and v and Path(v).is_file()))


def part_name(part: Any) -> Any:
    """A loop part's registered name (a name stays a name; an object gives its ``name``)."""
    return part if isinstance(part, str) or part is None else getattr(part, "name", type(part).__name__)


def reproduction_record(pipe: Any, settings: dict[str, Any], *, pipeline: str, model: Any,
                        adapters: list[str], loras: list[dict[str, Any]], memory: Any,
                        options: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """What reproduces a run: every call parameter with a JSON form, the pipeline, model, adapters, LoRA files
    with their SHA-256, sampler, guidance, memory policy, compose options, dtype, device and qi version, and the
    SHA-256 of every input file."""
    import qi_core as qi

    meta = json_params(settings)
    meta.update(
        pipeline=pipeline, model=str(model or pipe.model), adapters=list(adapters), loras=loras,
        sampler=part_name(settings.get("sampler") or getattr(pipe, "sampler", None)),
        guidance=part_name(settings.get("guidance") or getattr(pipe, "guider", None)),
        memory=memory, options=dict(options or {}), dtype=str(pipe.dtype).removeprefix("torch."), device=str(pipe.device),
        qi_version=qi.__version__, inputs_sha256={f: sha256(f) for f in input_files(settings)},
    )  # fmt: skip
    return meta


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:limit].rstrip("-") or "image"


def output_paths(out: str, items: list[tuple[str, int]], suffixes: tuple[str, ...]) -> list[Path]:
    """Where each image of a run goes. ``out`` is a file (one image; several get ``_0``, ``_1`` … before the
    suffix), a pattern with ``{i}``, ``{seed}``, ``{prompt}`` (a slug of it), or a folder (an existing one, or a
    path ending in ``/``: ``NNNN-SEED.png`` inside)."""
    from qi_core.atomic import check_output_file

    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        paths = [Path(out) / f"{i:04d}-{seed}.png" for i, (_, seed) in enumerate(items)]
    elif "{" in out:
        if Path(out).suffix.lower() not in suffixes:
            raise OutputPathError(f"--out pattern {out!r} must end in {' or '.join(suffixes)}")
        try:
            paths = [Path(out.format(i=i, seed=seed, prompt=_slug(p))) for i, (p, seed) in enumerate(items)]
        except (KeyError, IndexError, ValueError) as e:
            raise InvalidInputError(
                f"--out pattern {out!r} is not valid ({e}); fields are {{i}}, {{seed}} and {{prompt}}"
            ) from None
        if len(set(paths)) < len(paths):
            raise OutputPathError(f"--out pattern {out!r} gives the same name to several images; add {{i}}")
    elif len(items) == 1:
        paths = [Path(out)]
    else:
        base = Path(out)
        paths = [base.with_name(f"{base.stem}_{i}{base.suffix}") for i in range(len(items))]
    for p in paths:
        check_output_file(p, suffixes, "--out")
    return paths


def summary(start: float, generation: float, steps: int, device: str) -> str:
    """The closing line: wall time, seconds per denoising step of the generation calls (prompt encoding and
    decoding included), peak memory (RSS; GPU memory where used)."""
    import resource
    import time

    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux → GiB
    line = f"{wall:.1f} s in all, {generation / max(steps, 1):.2f} s/step, peak RSS {rss:.2f} GiB"
    if device.startswith("cuda"):
        import torch

        line += f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return line
