"""Helpers of the ``qi serve`` tests: the tiny pipelines (composed once per session), servers over real HTTP on
127.0.0.1 (uvicorn in a thread, on a free port) and image helpers. (No conftest.py here: a second module named
``conftest`` would shadow the root one that other test folders import from.)"""

from __future__ import annotations

import functools
import io
import threading
import time
from contextlib import ExitStack, contextmanager

import numpy as np
import pytest
import uvicorn
from PIL import Image

import qi_core as qi
from qi_plugins.serve.app import create_app
from qi_plugins.serve.server import Server, listen, url


@functools.cache
def tiny(name: str):
    """The tiny random ``name`` pipeline, composed once per test session."""
    return qi.compose(name, model="tiny", progress=False)


@contextmanager
def running(pipe, **options):
    """``create_app(pipe, **options)`` served by uvicorn in a thread; yields (base URL, app)."""
    app = create_app(pipe, **options)
    sock = listen("127.0.0.1", 0)
    server = Server(uvicorn.Config(app, log_level="warning"), app.state.worker)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield url(sock), app
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"


@pytest.fixture(name="serve")
def serve_fixture(tmp_path):
    """``serve(pipe, **create_app options)`` → a running server's base URL (outputs under tmp_path/out)."""
    with ExitStack() as stack:

        def start(pipe, **options):
            options.setdefault("out_dir", tmp_path / "out")
            return stack.enter_context(running(pipe, **options))[0]

        yield start


def png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A random PNG, as bytes."""
    rng = np.random.default_rng(seed)
    shape = (height, width) if mode == "L" else (height, width, len(mode))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(image(data).convert("RGB"))


def direct(pipe, **params) -> np.ndarray:
    """The pixels of the same call made in-process."""
    return np.asarray(pipe(progress_bar_cmd=lambda steps: steps, **params).convert("RGB"))
