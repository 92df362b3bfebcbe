"""Every registered pipeline composed on its built-in tiny model, offline; shared by the tiny-model tests.

Bind the fixtures in a test module (``tiny_pipeline = tiny_helpers.tiny_pipeline``, and ``offline`` and
``tiny_cache_dir``, which it requests). The cache folder and the composed pipelines live at module level, so
every test module that binds them shares one build and one composition per pipeline.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest

_CACHE: list[Path] = []  # the session's QI_CACHE_DIR, made on first use
_PIPELINES: dict[str, Any] = {}


class HubAccess(AssertionError):
    """Something tried to reach a model hub (or the network) where everything must be local."""


@pytest.fixture
def tiny_cache_dir(tmp_path_factory) -> Path:
    """``QI_CACHE_DIR`` of the tiny-model tests: each recipe's tiny model is built once per session, here."""
    if not _CACHE:
        _CACHE.append(tmp_path_factory.mktemp("qi-cache"))
    return _CACHE[0]


@pytest.fixture
def offline(monkeypatch, tiny_cache_dir):
    """``QI_CACHE_DIR`` in the session folder, every hub client refusing and sockets refusing to connect: a tiny
    model must be built and loaded without any network. An attempt fails the test even if something caught
    the error."""
    from qi_core.plugin_host import host

    attempts: list[str] = []

    def refuse_download(model_id, local_dir, patterns):
        attempts.append(f"{model_id} {patterns}")
        raise HubAccess(f"tried to download {model_id} ({patterns}) while offline")

    def refuse_connect(*args, **kwargs):
        address = args[1] if args and isinstance(args[0], socket.socket) else (args or (kwargs,))[0]
        attempts.append(f"connection to {address!r}")
        raise HubAccess(f"tried to connect to {address!r} while offline")

    monkeypatch.setenv("QI_CACHE_DIR", str(tiny_cache_dir))
    monkeypatch.setenv("QI_MODEL_DIR", str(tiny_cache_dir / "downloads"))  # never ./models, should one slip
    for source in host().registry.entries("source"):
        monkeypatch.setattr(source, "obj", refuse_download)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(socket, "create_connection", refuse_connect)
    yield
    assert not attempts, f"network access attempted: {attempts}"


@pytest.fixture
def tiny_pipeline(offline):
    """``get(name)``: ``qi.compose(name, model="tiny")``, composed once per session and shared by the tests
    (they must not change it)."""
    import qi_core as qi

    def get(name: str):
        if name not in _PIPELINES:
            _PIPELINES[name] = qi.compose(name, model="tiny", progress=False)
        return _PIPELINES[name]

    return get
