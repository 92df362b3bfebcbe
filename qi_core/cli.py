"""The ``qi`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from qi_core.atomic import atomic_file, check_output_file, check_writable_parent
from qi_core.errors import InvalidInputError, OutputPathError, QiError

DEFAULT_PIPELINE = "qwen-image"
EXIT_ERROR = 2  # a QiError: bad input, named in one line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def _plugins(args: argparse.Namespace) -> int:
    from qi_core import plugins

    report = plugins()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for p in report:
        where = f"{p['distribution'] or '-'} {p['version'] or ''}".strip()
        print(f"{p['name']:<24} {p['status']:<18} {where}")
        if p["status"] == "ok":
            for kind, names in p["provides"].items():
                print(f"    {kind}: {', '.join(names)}")
        else:
            print(f"    {p['error']}")
    return 0


def _pipelines(args: argparse.Namespace) -> int:
    from qi_core import pipelines
    from qi_core.composer import describe
    from qi_core.plugin_host import host

    if args.json:
        print(json.dumps([describe(r) for r in pipelines()], indent=2, ensure_ascii=False))
        return 0
    reg = host().registry
    for r in pipelines():
        plugin = reg.get("pipeline", r.name).plugin
        print(f"{r.name:<32} {r.description}  [{plugin}; default model {r.model}]")
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    from qi_core.plugin_host import host
    from qi_core.registry import Entry

    recipe = host().registry.get("pipeline", args.pipeline).load()
    if recipe.tiny is None:
        raise QiError(f"pipeline {args.pipeline!r} has no tiny-model builder")
    check_writable_parent(args.dir, "model folder")
    build = Entry("pipeline", recipe.name, recipe.tiny, "").load()
    out = build(args.dir, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote tiny {recipe.name} model to {out}")
    return 0


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def save_image(image: Any, path: Path, meta: dict[str, Any], quality: int = 95) -> None:
    """Write an image in the format its suffix names, with the generation settings, atomically: PNG text chunks
    (``parameters`` = the JSON, and one ``qi:KEY`` chunk per setting); JPEG and WebP carry the JSON in the
    EXIF ImageDescription."""
    text = json.dumps(meta, ensure_ascii=False, default=str)
    suffix = path.suffix.lower()
    try:
        with atomic_file(path) as tmp:
            if suffix == ".png":
                from PIL.PngImagePlugin import PngInfo

                info = PngInfo()
                for k, v in meta.items():
                    info.add_text(f"qi:{k}", str(v))
                info.add_text("parameters", text)
                image.save(tmp, format="PNG", pnginfo=info)
            else:
                from PIL import Image

                exif = Image.Exif()
                exif[0x010E] = text  # ImageDescription
                fmt = "WEBP" if suffix == ".webp" else "JPEG"
                image.convert("RGB").save(tmp, format=fmt, quality=quality, exif=exif.tobytes())
    except PermissionError as e:  # the up-front check passed, yet the folder refused (ACLs, a quota …)
        raise OutputPathError(f"cannot write {path}: {e.strerror}; choose a writable --out location") from e


def save_png(image: Any, path: Path, meta: dict[str, Any]) -> None:
    """Write a PNG with the generation settings as text chunks, atomically."""
    save_image(image, path, meta)


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reproduction_record(pipe: Any, settings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """What reproduces a run: every call parameter with a JSON form, the pipeline, model, adapters, memory
    policy, dtype, device and qi version, and the SHA-256 of every input file."""
    import qi_core as qi
    from qi_core.params import json_params

    meta = json_params(settings)
    files = [v for k, v in settings.items() if isinstance(v, str) and k != "prompt" and Path(v).is_file()]
    files += [
        x
        for v in settings.values()
        if isinstance(v, list)
        for x in v
        if isinstance(x, str) and Path(x).is_file()
    ]
    meta.update(
        pipeline=args.pipeline, model=str(args.model or pipe.model), adapters=list(args.adapter or ()),
        memory=args.memory, dtype=str(pipe.dtype).removeprefix("torch."), device=str(pipe.device),
        qi_version=qi.__version__, inputs_sha256={f: _sha256(f) for f in files},
    )  # fmt: skip
    return meta


def _summary(start: float, generation: float, steps: int, device: str) -> str:
    """The closing line: wall time, seconds per step of the generation call (prompt encoding, denoising and
    decoding over the steps), peak memory (RSS; GPU memory where used)."""
    import resource
    import time

    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux → GiB
    line = f"{wall:.1f} s in all, {generation / max(steps, 1):.2f} s/step, peak RSS {rss:.2f} GiB"
    if device.startswith("cuda"):
        import torch

        line += f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    return line


def _generate(args: argparse.Namespace) -> int:
    import time

    import qi_core as qi
    from qi_core.composer import check_call
    from qi_core.devices import check_device, check_seed, default_device, parse_dtype
    from qi_core.flags import as_flag_error, call_from_args

    start = time.perf_counter()
    # Everything the user typed is checked before the model loads: a bad --out must not cost a generation.
    target = check_output_file(args.out, IMAGE_SUFFIXES, "--out")
    if not 1 <= args.quality <= 100:
        raise InvalidInputError(f"--quality must be 1-100, got {args.quality}")
    device = check_device(args.device) if args.device is not None else default_device()
    check_seed(args.seed)
    dtype = parse_dtype(args.dtype, ("float32", "bfloat16", "float16"))
    call: dict[str, Any] = {"prompt": args.prompt, **call_from_args(args, args.parameter_flags)}
    try:  # values against the declarations (e.g. --cfg-scale nan), before loading
        check_call(args.pipeline, call)
    except InvalidInputError as e:
        raise as_flag_error(e) from None
    pipe = qi.compose(args.pipeline, model=args.model, device=device, torch_dtype=dtype,
                      adapters=args.adapter or (), memory=args.memory)  # fmt: skip
    settings = {**pipe.parameters(), **call}
    if settings["seed"] is None:
        import random

        settings["seed"] = call["seed"] = random.randrange(2**31)
        print(f"seed {call['seed']}")
    began = time.perf_counter()
    try:
        out = pipe(**call)
    except InvalidInputError as e:
        raise as_flag_error(e) from None
    generation = time.perf_counter() - began
    images = out if isinstance(out, list) else [out]
    meta = reproduction_record(pipe, {**settings, **call}, args)
    for i, image in enumerate(images):
        path = target if len(images) == 1 else target.with_name(f"{target.stem}_{i}{target.suffix}")
        save_image(image, path, meta, quality=args.quality)
        print(f"wrote {path}")
    print(_summary(start, generation, int(settings["num_inference_steps"]), str(pipe.device)))
    return 0


def _parameter_flags(parser: argparse.ArgumentParser, pipeline: str) -> dict[str, str | None]:
    """Flags for every declared parameter of ``pipeline`` (an unknown name is reported when the command runs)."""
    from qi_core.composer import declarations
    from qi_core.flags import add_parameter_flags
    from qi_core.params import specs
    from qi_core.plugin_host import host

    try:
        recipe = host().registry.get("pipeline", pipeline).load()
    except QiError:
        return {}
    return add_parameter_flags(parser, specs(declarations(recipe), recipe.defaults, recipe.required))


def _pipeline_in(argv: list[str] | None) -> str | None:
    """The ``--pipeline`` of a ``qi generate`` command line (its flags depend on it), else the default; None
    for other commands (building the flags imports the pipeline's injectors, which ``qi plugins`` must not)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "generate":
        return None
    for i, a in enumerate(argv):
        if a == "--pipeline" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--pipeline="):
            return a.split("=", 1)[1]
    return DEFAULT_PIPELINE


def build_parser(pipeline: str | None = DEFAULT_PIPELINE) -> argparse.ArgumentParser:
    """The ``qi`` parser; ``qi generate`` gets the flags of ``pipeline``'s declared parameters (none: None)."""
    from qi_core import __version__

    parser = argparse.ArgumentParser(prog="qi", description="Run and train the Qwen-Image family.")
    parser.add_argument("--version", action="version", version=f"qi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate an image",
                       description="Generate an image. `qi generate --pipeline NAME --help` lists NAME's flags.")  # fmt: skip
    g.add_argument("prompt")
    g.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="recipe name (see `qi pipelines`)")
    g.add_argument("--model", default=None, help="folder, hub id (hf:ORG/NAME for Hugging Face) or 'tiny'")
    g.set_defaults(parameter_flags=_parameter_flags(g, pipeline) if pipeline else {})
    g.add_argument("--adapter", action="append", help="adapter name (repeatable)")
    g.add_argument("--memory", default="none", help="memory policy name")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    g.add_argument(
        "--out", default="out.png", help="image to write: .png, .jpg or .webp (format from the suffix)"
    )
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality, 1-100 (default: 95)")
    g.set_defaults(func=_generate)

    p = sub.add_parser("plugins", help="list installed plugins")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_plugins)

    pl = sub.add_parser("pipelines", help="list pipelines (recipes)")
    pl.add_argument("--json", action="store_true", help="machine-readable: each pipeline with its parameters")
    pl.set_defaults(func=_pipelines)

    t = sub.add_parser("make-tiny-model", help="write a tiny random model in the official layout")
    t.add_argument("dir")
    t.add_argument("--pipeline", default="qwen-image")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=_make_tiny)

    from qi_core.plugin_host import host

    for entry in host().registry.entries("command"):
        if entry.name in sub.choices:
            continue  # built-in commands win; the collision is visible in `qi plugins`
        help_ = entry.meta.get("help") or f"(from plugin {entry.plugin})"
        aliases = [a for a in entry.aliases if a not in sub.choices]  # a taken alias stays the other's
        cmd = sub.add_parser(entry.name, aliases=aliases, help=help_)
        try:
            entry.load()(cmd)
        except Exception as e:  # one broken plugin command must not take the whole CLI down
            cmd.set_defaults(func=_broken(entry.name, entry.plugin, e))
    return parser


def _broken(name: str, plugin: str, error: Exception):
    def run(args: argparse.Namespace) -> int:
        print(f"qi: error: command {name!r} of plugin {plugin!r} failed to load: {error}", file=sys.stderr)
        return EXIT_ERROR

    return run


def _end_progress_bars() -> None:
    """Close the tqdm bars an exception left running, so the message below starts on its own line."""
    std = sys.modules.get("tqdm.std")  # no bar can be live if tqdm was never imported
    if std is None:
        return
    bars = [bar for bar in list(getattr(std.tqdm, "_instances", ())) if not bar.disable]
    for bar in bars:
        bar.close()  # leave=False bars clear their line; the others finish theirs
    if bars and not sys.stderr.isatty():
        sys.stderr.write("\n")  # a log file keeps the bar's text; end that line


def _stdout_gone() -> None:
    """After a BrokenPipeError (``qi … | head -1``): point stdout at devnull, so the interpreter's final flush
    does not raise again (the recipe of the Python docs, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a stand-in stdout (tests, embedding) has no descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: list[str] | None = None) -> int:
    """Run the ``qi`` command; exit code 0, 2 for a :class:`QiError` (one line on stderr), 130 on Ctrl-C."""
    try:
        try:
            args = build_parser(_pipeline_in(argv)).parse_args(argv)
            return args.func(args)
        finally:
            sys.stdout.flush()  # a closed pipe shows up here (also after --help), not at interpreter exit
    except BrokenPipeError:
        _stdout_gone()
        return 1
    except KeyboardInterrupt:
        _end_progress_bars()
        print("qi: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except QiError as e:
        _end_progress_bars()
        print(f"qi: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
