"""``qi generate``: every declared call parameter of the chosen pipeline as a flag, several prompts and images
per prompt as real batches, LoRA files, outputs that record how to reproduce them, and ``--from`` re-runs."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from qi_core.errors import InvalidInputError, QiError
from qi_plugins.doors import launch
from qi_plugins.doors.flags import (
    add_option_flags,
    add_parameter_flags,
    as_flag_error,
    call_from_args,
    options_from_args,
)

DEFAULT_PIPELINE = "qwen-image"
#: Settings of a record that are not call parameters (``--from`` restores them as options).
RUN_SETTINGS = ("pipeline", "model", "adapters", "loras", "memory", "options", "dtype", "device", "qi_version",
                "inputs_sha256")  # fmt: skip


def _option(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def pipeline_of(argv: list[str] | None) -> str | None:
    """The pipeline whose flags ``argv`` needs: ``--pipeline``, else the one recorded in ``--from FILE``."""
    if argv is None:
        return None
    named = _option(argv, "--pipeline")
    source = _option(argv, "--from")
    if named is None and source is not None and Path(source).is_file():
        named = _record(source).get("pipeline")
    return named or DEFAULT_PIPELINE


def configure(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> None:
    parser.description = "Generate images. `qi generate --pipeline NAME --help` lists NAME's flags."
    parser.add_argument("prompt", nargs="*", help="one or more prompts (each a batch item)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="more prompts: a text file (one a line) or JSONL (a prompt and parameters a row)")  # fmt: skip
    parser.add_argument("--from", dest="source", metavar="IMAGE",
                        help="re-run the settings recorded in an image qi wrote (flags given here override)")  # fmt: skip
    parser.add_argument(
        "--pipeline", default=None, help=f"recipe name (see `qi pipelines`; default {DEFAULT_PIPELINE})"
    )
    parser.add_argument(
        "--model", default=None, help="folder, hub id (hf:ORG/NAME for Hugging Face) or 'tiny'"
    )
    parser.add_argument("--lora", action="append", metavar="FILE[:SCALE]",
                        help="LoRA file in any layout qi reads, with its scale (default 1; repeatable)")  # fmt: skip
    parser.add_argument("--adapter", action="append", help="adapter name (repeatable)")
    parser.add_argument("--memory", default=None, help="memory policy name (default: none)")
    parser.add_argument("--step-runner", default=None,
                        help="step runner by name (default: the pipeline's; `parallel` under torchrun)")  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--out", default="out.png",
                        help="image to write (.png, .jpg, .webp: format from the suffix); with several images a "
                        "pattern with {i}, {seed}, {prompt}, or a folder")  # fmt: skip
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality, 1-100 (default: 95)")
    launch.add_flags(parser)
    pipeline = pipeline_of(argv)
    parser.set_defaults(func=run, parameter_flags=_parameter_flags(parser, pipeline) if pipeline else {},
                        option_flags=add_option_flags(parser), command_argv=argv)  # fmt: skip


def _parameter_flags(parser: argparse.ArgumentParser, pipeline: str) -> dict[str, str | None]:
    """Flags for every declared parameter of ``pipeline`` (an unknown name is reported when the command runs)."""
    from qi_core.composer import declarations
    from qi_core.params import specs
    from qi_core.plugin_host import host

    try:
        recipe = host().registry.get("pipeline", pipeline).load()
    except QiError:
        return {}
    return add_parameter_flags(parser, specs(declarations(recipe), recipe.defaults, recipe.required))


def _record(path: str) -> dict[str, Any]:
    from qi_core.images import image_settings

    try:
        return image_settings(path)
    except OSError as e:
        raise InvalidInputError(f"--from {path!r} cannot be read as an image ({e})") from None


def _from(args: argparse.Namespace) -> dict[str, Any]:
    """The call recorded in ``--from``, its run settings applied to ``args`` where the command line left them
    unset; every input file is found by path and checked by its SHA-256."""
    from qi_plugins.doors.outputs import sha256

    record = _record(args.source)
    if not record or "pipeline" not in record:
        raise InvalidInputError(f"--from {args.source!r} has no qi settings (was it written by qi generate?)")
    for f, digest in record.get("inputs_sha256", {}).items():
        if not Path(f).is_file():
            raise InvalidInputError(f"--from: input file {f!r} of the recorded run is missing; put it back")
        if sha256(f) != digest:
            raise InvalidInputError(f"--from: input file {f!r} changed since the run (SHA-256 differs)")
    for lora in record.get("loras", []):
        if not Path(lora["file"]).is_file() or sha256(lora["file"]) != lora["sha256"]:
            raise InvalidInputError(
                f"--from: LoRA {lora['file']!r} of the recorded run is missing or changed"
            )
    args.pipeline = args.pipeline or record["pipeline"]
    args.model = args.model or record.get("model")
    args.adapter = args.adapter or record.get("adapters") or None
    args.lora = args.lora or [f"{x['file']}:{x['scale']}" for x in record.get("loras", [])] or None
    args.memory = args.memory or record.get("memory")
    args.dtype = args.dtype or record.get("dtype")
    args.device = args.device or record.get("device")
    for dest, name in args.option_flags.items():
        if getattr(args, dest, None) is None and name in record.get("options", {}):
            setattr(args, dest, record["options"][name])
    return {k: v for k, v in record.items() if k not in RUN_SETTINGS}


def _prompt_file(path: str) -> list[dict[str, Any]]:
    """Rows of ``--prompts``: a text file gives one prompt a line; JSONL one object a line with a ``prompt``."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InvalidInputError(f"--prompts {path!r} cannot be read: {e.strerror}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.endswith(".jsonl"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"--prompts {path}:{n} is not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise InvalidInputError(f'--prompts {path}:{n} must be an object with a "prompt" string')
            rows.append(row)
        else:
            rows.append({"prompt": line.strip()})
    if not rows:
        raise InvalidInputError(f"--prompts {path!r} has no prompt")
    return rows


def calls_of(args: argparse.Namespace, given: dict[str, Any]) -> list[dict[str, Any]]:
    """The pipeline calls of a run: the prompts that share parameters go together (one batch); each JSONL row
    with parameters of its own is a call of its own."""
    rows = [{"prompt": p} for p in args.prompt] + (_prompt_file(args.prompts) if args.prompts else [])
    if not rows and "prompt" in given:
        rows = [{"prompt": given["prompt"]}]
    if not rows:
        raise InvalidInputError('give a prompt: qi generate "a red fox" (or --prompts FILE, or --from IMAGE)')
    calls: list[dict[str, Any]] = []
    for row in rows:
        extra = {k: v for k, v in row.items() if k != "prompt"}
        same = next((c for c in calls if c["extra"] == extra), None)
        if same is None:
            calls.append({"extra": extra, "prompts": [row["prompt"]]})
        else:
            same["prompts"].append(row["prompt"])
    return [{**given, **c["extra"], "prompt": c["prompts"][0] if len(c["prompts"]) == 1 else c["prompts"]}
            for c in calls]  # fmt: skip


def _loras(specs: list[str] | None) -> list[tuple[str, float]]:
    out = []
    for spec in specs or ():
        path, _, scale = spec.rpartition(":")
        try:
            value = float(scale)
        except ValueError:
            path, value = spec, 1.0
        if not path or not Path(path).is_file():
            raise InvalidInputError(f"--lora {spec!r}: no such file; give FILE or FILE:SCALE")
        out.append((path, value))
    return out


def _size_from_input(pipe: Any, call: dict[str, Any]) -> None:
    """Without --height/--width, the size of the first given image input (rounded to the size multiple)."""
    if "height" in call or "width" in call:
        return
    from qi_core.images import load_image

    for spec in pipe.parameter_specs():
        value = call.get(spec["name"])
        if spec["kind"] in ("image", "images") and value is not None:
            first = value[0] if isinstance(value, (list, tuple)) else value
            w, h = load_image(first, spec["name"]).size
            m = pipe.size_multiple
            call["width"], call["height"] = max(m, round(w / m) * m), max(m, round(h / m) * m)
            return


def _items(call: dict[str, Any], seed: int) -> list[tuple[str, int]]:
    prompts = call["prompt"] if isinstance(call["prompt"], list) else [call["prompt"]]
    n = int(call.get("num_images_per_prompt", 1))
    return [(p, seed + j) for p in prompts for j in range(n)]


def run(args: argparse.Namespace) -> int:
    import random

    import qi_core as qi
    from qi_core.composer import check_call
    from qi_core.devices import check_device, check_seed, default_device, parse_dtype
    from qi_core.images import IMAGE_SUFFIXES, save_image
    from qi_plugins.doors.outputs import output_paths, reproduction_record, sha256, summary

    start = time.perf_counter()
    recorded = _from(args) if args.source else {}
    args.pipeline = args.pipeline or DEFAULT_PIPELINE
    given = {**recorded, **call_from_args(args, args.parameter_flags)}
    calls = calls_of(args, given)
    # Everything the user typed is checked before the model loads: a bad --out must not cost a generation.
    if not 1 <= args.quality <= 100:
        raise InvalidInputError(f"--quality must be 1-100, got {args.quality}")
    device = check_device(args.device) if args.device is not None else default_device()
    world = launch.prepare(args)  # --nproc/--cfg-parallel/--ulysses checked; the run's process count
    rank = int(os.environ.get("RANK", "0"))
    if device == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: one device a process
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    dtype = parse_dtype(args.dtype, ("float32", "bfloat16", "float16"))
    loras = _loras(args.lora)
    drawn: list[int] = []  # seeds drawn here, printed once the output names are checked
    for call in calls:
        check_seed(call.get("seed"))
        if call.get("seed") is None and world > 1:
            raise InvalidInputError(
                "give --seed when running on several processes: every rank draws the noise"
            )
        if call.get("seed") is None:
            call["seed"] = random.randrange(2**31)
            drawn.append(call["seed"])
        try:  # values against the declarations (e.g. --cfg-scale nan), before loading
            check_call(args.pipeline, call)
        except InvalidInputError as e:
            raise as_flag_error(e, args.parameter_flags) from None
    items = [item for call in calls for item in _items(call, int(call["seed"]))]
    paths = iter(output_paths(args.out, items, IMAGE_SUFFIXES))
    for seed in drawn:
        print(f"seed {seed}")
    if launch.wanted(args):  # everything checked: start the workers, each runs this command (rank 0 writes)
        return launch.launch(args)

    memory = args.memory or "none"
    parts = {"step_runner": args.step_runner} if args.step_runner else {}
    pipe = qi.compose(args.pipeline, model=args.model, device=device, torch_dtype=dtype,
                      adapters=args.adapter or (), memory=memory, **parts, **options_from_args(args))  # fmt: skip
    applied = []
    if loras:
        from qi_core.plugin_host import host

        if host().pm.get_plugin("lora") is None:
            raise InvalidInputError("--lora needs the lora plugin, which is disabled or not installed")
        from qi_plugins.lora.adapter import load_lora

        for path, scale in loras:
            load_lora(pipe, path, scale)
            applied.append({"file": path, "scale": scale, "sha256": sha256(path)})
    generation, steps = 0.0, 0
    for call in calls:
        _size_from_input(pipe, call)
        began = time.perf_counter()
        try:
            out = pipe(**call)
        except InvalidInputError as e:
            raise as_flag_error(e, args.parameter_flags) from None
        generation += time.perf_counter() - began
        settings = {**pipe.parameters(), **call}
        steps += int(settings["num_inference_steps"])
        batch = isinstance(call["prompt"], list) or int(call.get("num_images_per_prompt", 1)) > 1
        images = out if batch else [out]
        for image, (prompt, seed) in zip(images, _items(call, int(call["seed"])), strict=True):
            item = {**settings, "prompt": prompt, "seed": seed}  # this image alone
            if "num_images_per_prompt" in item:
                item["num_images_per_prompt"] = 1
            meta = reproduction_record(pipe, item, pipeline=args.pipeline, model=args.model,
                                       adapters=args.adapter or [], loras=applied, memory=memory,
                                       options=options_from_args(args))  # fmt: skip
            path = next(paths)
            for k, frame in enumerate(image if isinstance(image, list) else [image]):  # frames of one item
                where = path if k == 0 else path.with_name(f"{path.stem}_frame{k}{path.suffix}")
                if rank == 0:  # every rank holds the same image; one writes it
                    save_image(frame, where, meta, quality=args.quality)
                    print(f"wrote {where}")
    if rank == 0:
        print(summary(start, generation, steps, str(pipe.device)))
    return 0
