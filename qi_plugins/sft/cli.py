"""``qi train`` (the seed's train.py arguments, same names) and ``qi validate``.

Both run directly (``qi train …``) or under ``accelerate launch`` (``accelerate launch -m qi_core.cli train …``
or ``accelerate launch $(which qi) train …``). Heavy modules are imported inside the run functions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qi_plugins.sft.args import add_train_arguments


def configure_train(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)
    parser.add_argument("--zero_cond_t", action="store_true",
                        help="Edit-2511: reference-image tokens modulated at t = 0 (the seed's flag)")  # fmt: skip
    parser.set_defaults(func=run_train)


def run_train(ns: argparse.Namespace) -> int:
    from qi_plugins.sft.args import from_namespace
    from qi_plugins.sft.trainer import train

    args = from_namespace(ns)
    if getattr(ns, "zero_cond_t", False):
        args.call_params["zero_cond_t"] = True
    result = train(args)
    if not result.main_process:
        return 0
    if args.stage == "data_process":
        print(f"cached {len(result.cache_files)} samples under {result.output_path}")
    else:
        last = f", last loss {result.losses[-1]:.6f}" if result.losses else ""
        print(f"trained {result.global_step} steps{last}; checkpoints in {result.output_path}")
        if result.checkpoints:
            print(f"latest: {result.checkpoints[-1]}")
    if result.skipped_rows:
        print(f"skipped {result.skipped_rows} bad rows")
    return 0


def configure_validate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="a step-N/epoch-K .safetensors (LoRA or full weights) or a training output folder "
                             "(its newest checkpoint); repeatable")  # fmt: skip
    parser.add_argument("--lora", action="append", default=[], help="a LoRA file (any layout); repeatable")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument(
        "--dit-weights", default=None, help="full DiT weights saved by --trainable_models dit"
    )
    parser.add_argument("--role", default="dit", help="component the checkpoint belongs to")
    parser.add_argument("--strip-prefix", default="", help="prefix to remove from full-weight keys")
    parser.add_argument("--pipeline", default="qwen-image")
    parser.add_argument("--model", default=None, help="folder, hub id or 'tiny'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--out", default="validate.png")
    parser.set_defaults(func=run_validate)


def run_validate(ns: argparse.Namespace) -> int:
    import torch

    import qi_core as qi
    from qi_core.devices import parse_dtype
    from qi_core.errors import InvalidInputError
    from qi_core.images import save_image
    from qi_plugins.sft.validate import checkpoint_keys, load_trained, require_lora, resolve_checkpoint

    if not (ns.checkpoint or ns.lora or ns.dit_weights):
        raise InvalidInputError(
            "qi validate needs --checkpoint, --lora or --dit-weights (what training saved)"
        )
    # every file is checked before the pipeline is built (minutes for a real model) and before anything is written
    checkpoints = [resolve_checkpoint(given) for given in ns.checkpoint]
    for path in checkpoints + ([Path(ns.dit_weights)] if ns.dit_weights else []):
        checkpoint_keys(path)
    paths = checkpoints + [require_lora(given) for given in ns.lora]
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = parse_dtype(ns.dtype, ("float32", "bfloat16", "float16"))
    pipe = qi.compose(ns.pipeline, model=ns.model, device=device, torch_dtype=dtype)
    loaded = []
    for path in paths:
        kind = load_trained(pipe, path, role=ns.role, scale=ns.lora_scale, strip_prefix=ns.strip_prefix)
        loaded.append(f"{kind}:{Path(path).name}")
    if ns.dit_weights:
        load_trained(pipe, ns.dit_weights, role="dit", strip_prefix=ns.strip_prefix)
        loaded.append(f"full:{Path(ns.dit_weights).name}")
    call = {"prompt": ns.prompt, "negative_prompt": ns.negative_prompt, "seed": ns.seed}
    for key, value in (("num_inference_steps", ns.steps), ("cfg_scale", ns.cfg_scale), ("height", ns.height),
                       ("width", ns.width)):  # fmt: skip
        if value is not None:
            call[key] = value
    image = pipe(**call)
    meta = {**{k: v for k, v in {**pipe.parameters(), **call}.items() if k in (
        "prompt", "negative_prompt", "seed", "num_inference_steps", "cfg_scale", "height", "width")},
        "pipeline": ns.pipeline, "model": str(ns.model or pipe.model), "weights": ", ".join(loaded)}  # fmt: skip
    save_image(image if not isinstance(image, list) else image[0], Path(ns.out), meta)
    print(f"wrote {ns.out} ({', '.join(loaded)})")
    return 0
