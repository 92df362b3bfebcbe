"""``qi i2l IMAGES... --out lora.safetensors``: images → one LoRA for the Qwen-Image DiT (any LoRA loader).

The seed's recipe (``examples/qwen_image/model_inference/Qwen-Image-i2L.py``): encode every image (SigLIP2 +
DINOv3, plus the Qwen-VL residual for coarse/fine), run each chosen i2L model on each image, merge the LoRAs
(mean over images), optionally merge the Bias LoRA (alpha 1). ``--embeddings FILE`` takes precomputed inputs
instead of images (``image2lora_x`` (n, 1, E), ``image2lora_residual`` / ``image2lora_residual_highres``).
Heavy imports happen inside :func:`run`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from qi_core.errors import InvalidInputError

I2L_REPO = "DiffSynth-Studio/Qwen-Image-i2L"
I2L_FILES = {
    "style": "Qwen-Image-i2L-Style.safetensors",  # no residual
    "coarse": "Qwen-Image-i2L-Coarse.safetensors",  # residual of a 224² image
    "fine": "Qwen-Image-i2L-Fine.safetensors",  # residual of a 1024² image
    "bias": "Qwen-Image-i2L-Bias.safetensors",  # a LoRA merged after the others
}
ENCODERS_REPO = "DiffSynth-Studio/General-Image-Encoders"  # SigLIP2-G384/, DINOv3-7B/
TEXT_ENCODER_REPO = "Qwen/Qwen-Image-Edit"  # text_encoder/, tokenizer/ and the VL processor/
VL_PROCESSOR = "qwen2-vl-processor"  # registered by the edit plugin (processor/ of the Edit repositories)
INPUTS = ("image2lora_x", "image2lora_residual", "image2lora_residual_highres")  # names in --embeddings files


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="*", help="image files (several are merged into one LoRA)")
    parser.add_argument("--out", required=True, help="the LoRA file to write (.safetensors)")
    parser.add_argument(
        "--i2l", action="append", metavar="NAME_OR_FILE",
        help="style, coarse, fine (DiffSynth-Studio/Qwen-Image-i2L) or an i2L .safetensors; repeatable (default: style)",
    )  # fmt: skip
    parser.add_argument(
        "--bias", nargs="?", const="bias", default=None, metavar="FILE",
        help="merge the i2L Bias LoRA (the hub file, or FILE) after the images, as the seed does",
    )  # fmt: skip
    parser.add_argument(
        "--encoders", default=ENCODERS_REPO, help="folder or hub id with SigLIP2-G384/ and DINOv3-7B/"
    )
    parser.add_argument("--siglip2", default=None, help="SigLIP2 folder or file (overrides --encoders)")
    parser.add_argument("--dinov3", default=None, help="DINOv3 folder or file (overrides --encoders)")
    parser.add_argument(
        "--text-encoder", default=TEXT_ENCODER_REPO,
        help="model with text_encoder/, tokenizer/, processor/ (for coarse and fine models)",
    )  # fmt: skip
    parser.add_argument("--embeddings", default=None, help="precomputed image2lora_x / _residual tensors")
    parser.add_argument(
        "--dim", type=int, default=None, help="target DiT width (default 3072, or the side-car json)"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, … (default: cuda when available)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default=None,
        help="compute and file dtype (default: bfloat16 on GPU, float32 on CPU)",
    )  # fmt: skip
    parser.set_defaults(func=run)


def hub_file(name_or_path: str) -> Path:
    """A local file, or one of the named i2L files downloaded once from DiffSynth-Studio/Qwen-Image-i2L."""
    if name_or_path not in I2L_FILES:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise InvalidInputError(
                f"--i2l/--bias {name_or_path!r} is neither a file nor one of {', '.join(I2L_FILES)}"
            )
        return path
    from qi_plugins.lora.sources import fetch_file

    return fetch_file(I2L_REPO, I2L_FILES[name_or_path])


def load_embeddings(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors.torch import load_file

    t = load_file(os.fspath(path))
    if "image2lora_x" not in t:
        raise InvalidInputError(f"{path} has no 'image2lora_x' tensor (n, 1, E); found {sorted(t)}")
    return {k: t.get(k) for k in INPUTS}


def encode(args: argparse.Namespace, models: list[Any], device: str, dtype: Any) -> dict[str, Any]:
    """Run the real encoders on the images (only the residuals some model needs)."""
    from qi_core.loading import resolve_model_root
    from qi_plugins.i2l.encoders import I2LEncoder

    enc_root = None
    if args.siglip2 is None or args.dinov3 is None:
        enc_root = resolve_model_root(args.encoders, ["SigLIP2-G384", "DINOv3-7B"])
    text_encoder = processor = None
    if any(m.config.use_residual for m in models):
        from qi_plugins.qwen_image.text_encoder import load_text_encoder

        root = resolve_model_root(args.text_encoder, ["text_encoder", "tokenizer", "processor"])
        text_encoder = load_text_encoder(root, root / "text_encoder", device=device, dtype=dtype)
        processor = vl_processor(root, device, dtype)
    encoder = I2LEncoder.load(args.siglip2 or enc_root / "SigLIP2-G384", args.dinov3 or enc_root / "DINOv3-7B",
                              text_encoder, processor, device=device, dtype=dtype)  # fmt: skip
    return encoder.inputs(args.images, models)


def vl_processor(root: Path, device: Any, dtype: Any) -> Any:
    """The registered Qwen2-VL processor part (the edit plugin's, torch only) for ``root/processor``, or None
    (then the text encoder's own transformers processor is used)."""
    from qi_core.errors import UnknownNameError
    from qi_core.plugin_host import host

    try:
        factory = host().registry.get("encoder", VL_PROCESSOR).load()
    except UnknownNameError:
        return None
    return factory(root=root, folder=root / "processor", device=device, dtype=dtype)


def run(args: argparse.Namespace) -> int:
    import torch

    from qi_core.devices import parse_dtype
    from qi_plugins.i2l.model import decode, load_i2l, merge_loras, save_lora

    if bool(args.images) == bool(args.embeddings):
        raise InvalidInputError(
            "give image files or --embeddings FILE (precomputed inputs), not both or neither"
        )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(args.dtype, ("float32", "bfloat16", "float16")) or (
        torch.float32 if device == "cpu" else torch.bfloat16
    )
    order = {"style": 0, "coarse": 1, "fine": 2}  # the seed runs style, then coarse, then fine
    names = sorted(args.i2l or ["style"], key=lambda n: order.get(n, 3))
    models = [load_i2l(hub_file(n), dim=args.dim, device=device, dtype=dtype) for n in names]
    inputs = load_embeddings(args.embeddings) if args.embeddings else encode(args, models, device, dtype)
    inputs = {k: None if inputs.get(k) is None else inputs[k].to(device, dtype) for k in INPUTS}
    with torch.no_grad():
        lora = decode(models, inputs["image2lora_x"], inputs["image2lora_residual"],
                      inputs["image2lora_residual_highres"])  # fmt: skip
        if args.bias:
            from safetensors.torch import load_file

            bias = {k: v.to(device, dtype) for k, v in load_file(str(hub_file(args.bias))).items()}
            lora = merge_loras([lora, bias])
    meta = {"qi:i2l_models": ",".join(names), "qi:images": str(len(inputs["image2lora_x"])),
            "qi:bias": str(args.bias or "")}  # fmt: skip
    path = save_lora({k: v.to(dtype) for k, v in lora.items()}, args.out, meta)
    print(f"wrote {path} ({len(lora) // 2} LoRA modules)")
    return 0
