"""One job's work in the worker thread: apply the request's LoRAs, generate its ``n`` images (image ``j`` with
seed ``seed + j``), write each atomically with its reproduction record, remove the LoRAs."""

from __future__ import annotations

import base64
import tempfile
import time
from pathlib import Path
from typing import Any

from qi_core.images import save_image
from qi_plugins.doors.outputs import reproduction_record
from qi_plugins.serve.calls import FORMATS, Call
from qi_plugins.serve.jobs import Job
from qi_plugins.serve.loras import LoraFolder


def record(pipe: Any, call: Call, seed: int, loras: LoraFolder | None) -> dict[str, Any]:
    """What reproduces one image (the record ``qi generate`` writes): every JSON call parameter, the pipeline,
    model, LoRAs (by name, with SHA-256), sampler, guidance, per-call options, dtype, device and qi version."""
    chosen = (
        [{"name": c.name, "scale": c.scale, "sha256": loras.sha256(c.path)} for c in call.loras]
        if loras
        else []
    )
    return reproduction_record(pipe, {**call.settings(pipe), "seed": seed}, pipeline=pipe.name, model=pipe.model,
                               adapters=[], loras=chosen, memory=None, options=call.options)  # fmt: skip


def run_call(pipe: Any, job: Job, out_dir: Path, loras: LoraFolder | None = None) -> dict[str, Any]:
    """Generate ``job.call``'s images; the OpenAI images response (``url`` items point at ``job.base_url``),
    with each image's seed and the reproduction record."""
    from qi_plugins.lora.adapter import load_lora

    call: Call = job.call
    suffix = FORMATS[call.output_format]
    applied = []
    data = []
    try:
        for choice in call.loras:
            applied.append(load_lora(pipe, choice.path, choice.scale))
        for j, seed in enumerate(call.seeds):
            out = pipe(**call.params, **call.options, seed=seed, progress_bar_cmd=job.progress_bar(j, call.n))
            meta = record(pipe, call, seed, loras)
            for k, image in enumerate(out if isinstance(out, list) else [out]):
                name = f"{job.id}-{j}{f'-{k}' if isinstance(out, list) else ''}{suffix}"
                data.append({"seed": seed, **_output(image, name, meta, call, out_dir, job.base_url)})
    finally:
        for lora in reversed(applied):
            lora.remove(pipe)
    return {
        "created": int(time.time()),
        "data": data,
        "output_format": call.output_format,
        "seed": call.seed,
        "parameters": record(pipe, call, call.seed, loras),
    }


def _output(
    image: Any, name: str, meta: dict[str, Any], call: Call, out_dir: Path, base_url: str
) -> dict[str, str]:
    if call.response_format == "url":
        save_image(image, out_dir / name, meta, quality=call.quality)
        return {"url": f"{base_url}v1/files/{name}"}
    with tempfile.TemporaryDirectory(prefix="qi-serve-") as tmp:  # the same bytes a url would serve
        path = Path(tmp) / name
        save_image(image, path, meta, quality=call.quality)
        return {"b64_json": base64.b64encode(path.read_bytes()).decode("ascii")}
