"""What the parallel tests run, in the test process (single-process references) and in the spawned ranks: each
case a tiny pipeline and a call (2 steps, CFG on), returning the final latents."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image

STEPS = 2
# 5 words: an odd text length for the tiny tokenizer, so the text stream splits unevenly over 2 ranks
ODD_PROMPT = "a red cube on green grass"
NEGATIVE = "blurry"


def _image(size: int, channels: int = 3) -> Image.Image:
    rng = np.random.default_rng(0)
    mode = "RGBA" if channels == 4 else "RGB"
    return Image.fromarray(rng.integers(0, 256, (size, size, channels), dtype=np.uint8), mode)


def _half_mask(size: int) -> Image.Image:
    m = np.zeros((size, size), np.uint8)
    m[:, : size // 2] = 255
    return Image.fromarray(m)


def _odd_size(size: int = 48) -> dict:
    """48×48 pixels: a 6×6 latent, 3×3 = 9 image tokens, odd."""
    return dict(height=size, width=size)


#: case name → (pipeline, call parameters besides the common ones)
CASES = {
    "qwen-image": ("qwen-image", lambda: {**_odd_size()}),
    "edit": (
        "qwen-image-edit-2511",
        lambda: {**_odd_size(), "edit_image": [_image(48)], "edit_image_auto_resize": False},
    ),  # fmt: skip
    "eligen": (
        "qwen-image-eligen",
        lambda: {**_odd_size(), "eligen_entity_prompts": ["a cat"], "eligen_entity_masks": [_half_mask(48)]},
    ),  # fmt: skip
    "controlnet": (
        "qwen-image-blockwise-controlnet-canny",
        lambda: {**_odd_size(), "blockwise_controlnet_inputs": [{"image": _image(48)}]},
    ),  # fmt: skip
    "layered": (
        "qwen-image-layered",
        lambda: {"height": 32, "width": 32, "layer_num": 1, "layer_input_image": _image(32, 4)},
    ),  # fmt: skip
    "batch": ("qwen-image", lambda: {**_odd_size(), "prompt": [ODD_PROMPT, "a small blue sphere"]}),
}


def call(case: str, steps: int = STEPS) -> dict:
    base = dict(prompt=ODD_PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, cfg_scale=4.0, seed=3,
                output_type="latent", progress_bar_cmd=lambda x: x)  # fmt: skip
    return {**base, **CASES[case][1]()}


def latents(out) -> torch.Tensor:
    return torch.cat(out) if isinstance(out, list) else out


def run_case(pipe, case: str, steps: int = STEPS) -> torch.Tensor:
    return latents(pipe(**call(case, steps)))


def run_ranks(main, world: int, jobs: list, folder: Path, start_method: str = "spawn") -> None:
    """Run ``main(rank, world, port, jobs, folder)`` on ``world`` processes; a failure raises with every rank's
    ``error.{rank}.txt``."""
    import time

    import torch.multiprocessing as mp

    began = time.perf_counter()
    try:
        mp.start_processes(main, args=(world, free_port(), jobs, str(folder)), nprocs=world,
                           start_method=start_method)  # fmt: skip
    except Exception:
        errors = sorted(Path(folder).glob("error.*.txt"))
        raise AssertionError("\n".join(e.read_text() for e in errors) or "a rank failed") from None
    print(f"\n{world} ranks: {time.perf_counter() - began:.1f} s")


def start_rank(rank: int, world: int, port: int) -> None:
    """This process as gloo rank ``rank`` of ``world`` (one CPU thread)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world)


def record_parts(split_class: type, expect: type | None = None) -> list[tuple]:
    """Every part ``split_class.part`` cuts from now on in this process, as ``(text sizes, image sizes, masked)``
    (the list is appended to; clear it between runs); ``expect``: the class each part must be."""
    split = split_class.part
    parts: list[tuple] = []

    def part(self, inp, n_txt, n_img, mask):
        got = split(self, inp, n_txt, n_img, mask)
        assert expect is None or isinstance(got, expect), type(got)
        parts.append((tuple(got.txt_sizes), tuple(got.img_sizes), got.mask is not None))
        return got

    split_class.part = part
    return parts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(
    rank: int, world: int, port: int, jobs: list[tuple[int, int, list[str], int]], out: str
) -> None:
    """One rank: start gloo; for each job ``(cfg, ulysses, cases, steps)`` run every case's tiny pipeline (composed
    once per rank) with ``Parallel(cfg, ulysses)`` and save its latents and the sequence parts its forwards
    split (``{cfg}x{ulysses}.{case}.{rank}.pt``), or the error (``error.{rank}.txt``)."""
    import torch.distributed as dist

    import qi_core as qi
    from qi_plugins.parallel.runner import Parallel
    from qi_plugins.parallel.ulysses import UlyssesSplit

    parts = record_parts(UlyssesSplit)  # every part this rank's forwards split
    start_rank(rank, world, port)
    pipes: dict[str, object] = {}
    try:
        for cfg, ulysses, cases, steps in jobs:
            runner = Parallel(cfg=cfg, ulysses=ulysses)
            for case in cases:
                name = CASES[case][0]
                if name not in pipes:
                    pipes[name] = qi.compose(name, model="tiny", progress=False)
                pipe = pipes[name]
                pipe.step_runner = runner
                parts.clear()
                with torch.inference_mode():
                    result = run_case(pipe, case, steps)
                save_result(Path(out) / f"{cfg}x{ulysses}.{case}.{rank}.safetensors", result, parts)
    except BaseException:
        (Path(out) / f"error.{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def save_result(path: Path, latents: torch.Tensor, parts: list) -> None:
    """A rank's final latents and the parts its sequence split used (safetensors, the parts in the header)."""
    from safetensors.torch import save_file

    save_file({"latents": latents.contiguous()}, str(path), metadata={"parts": json.dumps(parts)})


def load_result(path: Path) -> dict:
    """What :func:`save_result` wrote: {"latents", "parts"} (each part ``(text sizes, image sizes, masked)``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        parts = json.loads(f.metadata()["parts"])
        return {"latents": f.get_tensor("latents"), "parts": [(tuple(t), tuple(i), m) for t, i, m in parts]}
