"""uvicorn with ``qi serve``'s shutdown: on SIGTERM (or Ctrl-C) the worker takes no new jobs (503) and cancels
the waiting ones, uvicorn stops listening and waits for the open requests (the running job's included), the
worker thread finishes, and the process exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from qi_core.errors import InvalidInputError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), or InvalidInputError naming the address."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise InvalidInputError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise InvalidInputError(
            f"cannot listen on {host}:{port}: {e.strerror or e}; choose another --port"
        ) from None
    return sock


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


class Server(uvicorn.Server):
    """A uvicorn server whose exit signals close ``worker`` first (from the event loop, never inside the
    signal handler, which may interrupt the loop holding the worker's lock) and are not raised again after
    the graceful shutdown (uvicorn's own re-raises them, which turns a clean SIGTERM into exit status -15)."""

    def __init__(self, config: uvicorn.Config, worker: Any):
        super().__init__(config)
        self.worker = worker
        self.loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
            yield
            return
        previous = {s: signal.signal(s, self.handle_exit) for s in SIGNALS}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.worker.close)
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and sockets:
            print(f"qi serve: listening on {url(sockets[0])} (Ctrl-C or SIGTERM to stop)", flush=True)


def serve(app: Any, sock: socket.socket, log_level: str = "info") -> None:
    """Serve ``app`` on the bound ``sock`` until a signal (main thread) or ``should_exit``."""
    Server(uvicorn.Config(app, log_level=log_level), app.state.worker).run(sockets=[sock])
