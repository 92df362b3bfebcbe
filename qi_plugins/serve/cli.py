"""``qi serve``: flags, the start-up checks (all before the model loads) and the server.

Binding beyond loopback needs an API key (``--api-key`` or ``QI_API_KEY``); a missing FastAPI or uvicorn is a
typed error naming ``pip install 'qi[serve]'``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from qi_core.errors import InvalidInputError, PluginError

DEFAULT_PIPELINE = "qwen-image"
MiB = 2**20


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Serve one pipeline over HTTP: the OpenAI images API (/v1/images/generations, /v1/images/edits), jobs "
        "with progress as server-sent events (/v1/jobs), and a web page at /."
    )
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="recipe name (see `qi pipelines`)")
    parser.add_argument(
        "--model", default=None, help="folder, hub id (hf:ORG/NAME for Hugging Face) or 'tiny'"
    )
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; beyond loopback only with an API key (default: 127.0.0.1)")  # fmt: skip
    parser.add_argument("--port", type=int, default=8000, help="port (0: a free one; default: 8000)")
    parser.add_argument("--api-key", default=None,
                        help="key clients send as 'Authorization: Bearer KEY' (default: $QI_API_KEY; none: no check)")  # fmt: skip
    parser.add_argument("--queue", type=int, default=16,
                        help="jobs that may wait behind the running one; more are answered 429 (default: 16)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1,
                        help="pipelines serving the one queue, one per GPU with --device cuda (default: 1)")  # fmt: skip
    parser.add_argument("--lora-dir", default=None, help="folder of NAME.safetensors LoRAs requests may name")
    parser.add_argument("--out-dir", default="qi-serve-output",
                        help="folder of the images answered as URLs (default: qi-serve-output)")  # fmt: skip
    parser.add_argument("--max-body-mb", type=float, default=32.0,
                        help="largest request body in MiB; larger ones are answered 413 (default: 32)")  # fmt: skip
    parser.add_argument("--max-image-pixels", type=int, default=4096 * 4096,
                        help="largest image in pixels, uploaded (checked before decoding) or generated (default: 4096x4096)")  # fmt: skip
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when available)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                        help="compute dtype (default: float32 on the CPU, bfloat16 elsewhere)")  # fmt: skip
    parser.add_argument("--memory", default="none", help="memory policy name (default: none)")
    parser.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (a host name other than localhost may not be)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace, api_key: str | None) -> None:
    """Every flag checked before anything loads."""
    if not api_key and not is_loopback(args.host):
        raise InvalidInputError(
            f"--host {args.host} is reachable from other machines: give --api-key KEY (or set QI_API_KEY), "
            "or listen on 127.0.0.1"
        )
    if not 0 <= args.port <= 65535:
        raise InvalidInputError(f"--port must be 0-65535, got {args.port}")
    if args.queue < 1:
        raise InvalidInputError(f"--queue must be at least 1, got {args.queue}")
    if args.workers < 1:
        raise InvalidInputError(f"--workers must be at least 1, got {args.workers}")
    if not args.max_body_mb > 0:
        raise InvalidInputError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    if args.max_image_pixels < 1:
        raise InvalidInputError(f"--max-image-pixels must be positive, got {args.max_image_pixels}")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise InvalidInputError(f"--lora-dir {args.lora_dir!r} is not a folder")


def require_server_packages() -> None:
    """PluginError naming the extra when FastAPI, uvicorn or python-multipart is missing."""
    from importlib.util import find_spec

    missing = [
        package
        for package, modules in (
            ("fastapi", ("fastapi",)),
            ("uvicorn", ("uvicorn",)),
            ("python-multipart", ("python_multipart", "multipart")),
        )  # fmt: skip
        if not any(find_spec(m) is not None for m in modules)
    ]
    if missing:
        raise PluginError(f"qi serve needs {', '.join(missing)}: pip install 'qi[serve]'")


def worker_devices(device: str, workers: int) -> list[str]:
    """One device a worker: ``cuda`` spreads them over the GPUs (``cuda:0`` … ``cuda:N-1``); any other device
    (``cpu``, ``cuda:K``) holds every worker's pipeline."""
    import torch

    if device != "cuda" or workers == 1:
        return [device] * workers
    if workers > torch.cuda.device_count():
        raise InvalidInputError(f"--workers {workers} needs as many GPUs; this machine has "
                                f"{torch.cuda.device_count()}")  # fmt: skip
    return [f"cuda:{k}" for k in range(workers)]


def run(args: argparse.Namespace) -> int:
    from qi_core.atomic import check_writable_parent

    api_key = args.api_key or os.environ.get("QI_API_KEY") or None
    check_args(args, api_key)
    check_writable_parent(Path(args.out_dir) / "image.png", "--out-dir")
    require_server_packages()

    import qi_core as qi
    from qi_core.devices import check_device, default_device, parse_dtype
    from qi_plugins.serve.app import create_app
    from qi_plugins.serve.server import listen, serve

    device = check_device(args.device) if args.device is not None else default_device()
    dtype = parse_dtype(args.dtype, ("float32", "bfloat16", "float16"))
    sock = listen(args.host, args.port)  # a taken port fails now, not after the model loads
    try:
        pipes = [qi.compose(args.pipeline, model=args.model, device=d, torch_dtype=dtype, memory=args.memory)
                 for d in worker_devices(device, args.workers)]  # fmt: skip
        app = create_app(pipes, api_key=api_key, queue=args.queue, lora_dir=args.lora_dir, out_dir=args.out_dir,
                         max_body=int(args.max_body_mb * MiB), max_pixels=args.max_image_pixels)  # fmt: skip
        serve(app, sock)
    finally:
        sock.close()
    return 0
