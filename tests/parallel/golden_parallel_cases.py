"""The golden cases the parallel tests run, in the test process (single-process references) and in the spawned
ranks: each case's pipeline composed as its golden test composes it, called with the case's recorded arguments,
returning the float image (the raw decoder output, frames stacked ``(F, H, W, C)``)."""

from __future__ import annotations

import json
import traceback
from pathlib import Path

import numpy as np
import torch
from conftest import GOLDEN, GOLDEN_MODEL, golden_call, golden_case
from parallel_cases import record_parts, start_rank

LAYERED = GOLDEN / "models" / "qwen_image_layered"

#: golden case → recipe it runs through
CASES = {
    "t2i": "qwen-image",
    "edit_multi": "qwen-image-edit-2509",
    "edit_2511": "qwen-image-edit-2511",
    "eligen": "qwen-image-eligen",
    "controlnet": "qwen-image-blockwise-controlnet-canny",
    "layered": "qwen-image-layered",
}


def components(name: str, case: dict) -> dict:
    """The component overrides of the golden tests: the case's ControlNets, no LoRA, the layered DiT and VAE."""
    if name == "layered":
        return {"dit": LAYERED / "transformer", "vae": LAYERED / "vae"}
    files = case["models"].get("blockwise_controlnets")
    if files:  # in controlnet_id order
        return {"blockwise_controlnet": [GOLDEN / f for f in files]}
    return {"lora": []} if name == "eligen" else {}


def compose(name: str, **options):
    import qi_core as qi

    case, _, _ = golden_case(name)
    return qi.compose(CASES[name], model=GOLDEN_MODEL, device="cpu", torch_dtype=torch.float32,
                      progress=False, components=components(name, case), **options)  # fmt: skip


def run_case(pipe, name: str) -> torch.Tensor:
    """The case's golden call; the float image, ``(frames, H, W, C)`` float32."""
    case, _, folder = golden_case(name)
    with torch.inference_mode():
        out = pipe(**golden_call(case, folder), output_type="np", progress_bar_cmd=lambda x: x)
    frames = out if isinstance(out, list) else [out]
    return torch.from_numpy(np.stack(frames)).to(torch.float32)


def golden_image(name: str) -> tuple[torch.Tensor, float]:
    """The recorded ``image_float`` as ``(frames, H, W, C)`` and the case's recommended tolerance for it."""
    case, want, _ = golden_case(name)
    return want["image_float"].permute(0, 2, 3, 1), case["tolerances"]["image_float"]["recommended_atol"]


def rank_main(rank: int, world: int, port: int, jobs: list[tuple[int, int, list[str]]], out: str) -> None:
    """One rank: start gloo; for each job ``(cfg, ulysses, cases)`` run every golden case, its pipeline composed
    with ``parallel={"cfg": cfg, "ulysses": ulysses}``, and save its float image, how many sequence
    parts its forwards split and the mesh (``{cfg}x{ulysses}.{case}.{rank}.safetensors``), or the error
    (``error.{rank}.txt``)."""
    import torch.distributed as dist

    from qi_plugins.parallel.ulysses import UlyssesSplit

    parts = record_parts(UlyssesSplit)  # every part this rank's forwards split
    start_rank(rank, world, port)
    try:
        for cfg, ulysses, cases in jobs:
            for name in cases:
                pipe = compose(name, parallel={"cfg": cfg, "ulysses": ulysses})
                runner = pipe.step_runner
                parts.clear()
                image = run_case(pipe, name)
                mesh = (runner.mesh.world, runner.mesh.cfg, runner.mesh.ulysses)
                save_result(Path(out) / f"{cfg}x{ulysses}.{name}.{rank}.safetensors", image, len(parts), mesh)
    except BaseException:
        (Path(out) / f"error.{rank}.txt").write_text(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def save_result(path: Path, image: torch.Tensor, parts: int, mesh: tuple[int, int, int]) -> None:
    """A rank's float image, the number of sequence parts its forwards split and the runner's mesh
    ``(world, cfg, ulysses)`` (safetensors, the numbers in the header)."""
    from safetensors.torch import save_file

    meta = {"parts": json.dumps(parts), "mesh": json.dumps(mesh)}
    save_file({"image": image.contiguous()}, str(path), metadata=meta)


def load_result(path: Path) -> dict:
    """What :func:`save_result` wrote: {"image", "parts", "mesh"}."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        return {"image": f.get_tensor("image"), "parts": json.loads(meta["parts"]),
                "mesh": tuple(json.loads(meta["mesh"]))}  # fmt: skip
