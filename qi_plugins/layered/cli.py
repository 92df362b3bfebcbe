"""``qi layered IMAGE --prompt ... --out layers.png``: writes ``layers_0.png`` (the composite) …
``layers_N.png``, RGBA PNGs with the generation settings in their text chunks. Heavy imports happen inside
:func:`run`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="the RGBA (or RGB) image to decompose; sides must be multiples of 16")
    parser.add_argument(
        "--prompt", default="", help="a description of the image (layered) or the layer (control)"
    )
    parser.add_argument("--negative-prompt", default=" ")
    parser.add_argument(
        "--pipeline", default="qwen-image-layered", help="qwen-image-layered or …-layered-control"
    )
    parser.add_argument("--model", default=None, help="folder, hub id or 'tiny'")
    parser.add_argument("--layers", type=int, default=None, help="layer_num (default: the recipe's)")
    parser.add_argument("--context-image", default=None, help="brush mask for Layered-Control-V2")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--height", type=int, default=None, help="default: the image's height")
    parser.add_argument("--width", type=int, default=None, help="default: the image's width")
    parser.add_argument("--adapter", action="append", help="adapter name (repeatable)")
    parser.add_argument("--memory", default="none", help="memory policy name")
    parser.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda when available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--out", default="layers.png", help="OUT.png → OUT_0.png (composite), OUT_1.png, …")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import random

    import torch

    import qi_core as qi
    from qi_core.devices import parse_dtype
    from qi_core.images import load_image, save_image

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype, ("float32", "bfloat16", "float16"))
    pipe = qi.compose(args.pipeline, model=args.model, device=device, torch_dtype=dtype,
                      adapters=args.adapter or (), memory=args.memory)  # fmt: skip
    image = load_image(args.image, "image")
    call: dict[str, Any] = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "seed": random.randrange(2**31) if args.seed is None else args.seed,
        "layer_input_image": image,
        "height": args.height or image.height,
        "width": args.width or image.width,
    }
    for key, value in (("num_inference_steps", args.steps), ("cfg_scale", args.cfg_scale),
                       ("layer_num", args.layers), ("context_image", args.context_image)):  # fmt: skip
        if value is not None:
            call[key] = value
    images = pipe(**call)
    settings = {**pipe.parameters(), **call}
    meta = {k: settings[k] for k in ("prompt", "negative_prompt", "seed", "num_inference_steps", "cfg_scale",
                                     "height", "width", "layer_num")}  # fmt: skip
    meta.update(pipeline=args.pipeline, model=str(args.model or pipe.model), input=str(args.image),
                qi_version=qi.__version__)  # fmt: skip
    target = Path(args.out)
    for i, layer in enumerate(images):
        path = target.with_name(f"{target.stem}_{i}{target.suffix or '.png'}")
        save_image(layer, path, {**meta, "frame": i})  # frame 0 = composite when layer_num > 0
        print(f"wrote {path}")
    return 0
