"""``qi serve`` over HTTP: the queue under load, the API key, field errors, body and upload limits, LoRAs by
name only, jobs and their progress as server-sent events."""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from serve_helpers import pixels, png, running, serve_fixture, tiny  # noqa: F401

FAST = {"size": "16x16", "num_inference_steps": 1, "cfg_scale": 1.0}


def post(base: str, path: str = "v1/images/generations", timeout: float = 120, **kw) -> httpx.Response:
    return httpx.post(base + path, timeout=timeout, **kw)


def error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert set(body) >= {"message", "type", "param"}
    return body


def test_fifty_concurrent_requests_with_queue_4(serve):
    base = serve(tiny("qwen-image"), queue=4)
    with httpx.Client(base_url=base, timeout=120, limits=httpx.Limits(max_connections=50)) as http:
        with ThreadPoolExecutor(50) as pool:
            call = lambda i: http.post("v1/images/generations", json={"prompt": f"p{i}", "seed": i, **FAST})  # noqa: E731
            answers = list(pool.map(call, range(50)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error"
    assert post(base, json={"prompt": "after", **FAST}).status_code == 200  # alive and serving


def test_api_key(serve):
    base = serve(tiny("qwen-image"), api_key="s3cret")
    assert error(post(base, json={"prompt": "x", **FAST}), 401)["type"] == "authentication_error"
    wrong = post(base, json={"prompt": "x", **FAST}, headers={"Authorization": "Bearer s3cre"})
    assert error(wrong, 401)["message"].startswith("missing or wrong API key")
    assert httpx.get(base + "v1/models").status_code == 401
    ok = post(base, json={"prompt": "x", **FAST}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert httpx.get(base).status_code == 200  # the page itself holds nothing secret


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"cfg_scale": "x"}, "cfg_scale"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"tiled": 1}, "tiled"),
        ({"size": "17x16"}, "size"),
        ({"size": "big"}, "size"),
        ({"size": "4112x4096"}, "size"),
        ({"n": 11}, "n"),
        ({"seed": -1}, "seed"),
        ({"cfg_scal": 2}, "cfg_scal"),
        ({"progress_bar_cmd": "tqdm"}, "progress_bar_cmd"),
        ({"input_image": "/etc/passwd"}, "input_image"),
        ({"response_format": "jpeg"}, "response_format"),
        ({"model": "dall-e-3"}, "model"),
        ({"loras": [{"name": "x"}]}, "loras"),
        ({"cache": "bogus"}, "cache"),
        ({"compile": True}, "compile"),
    ],
)
def test_invalid_field_is_400_naming_it(serve, fields, param):
    base = serve(tiny("qwen-image"))
    assert error(post(base, json={"prompt": "x", **FAST, **fields}), 400)["param"] == param


def test_required_image_and_bad_uploads(serve):
    base = serve(tiny("qwen-image-edit"), max_pixels=64 * 64)
    edits = "v1/images/edits"
    assert error(post(base, edits, data={"prompt": "x"}), 400)["param"] == "image"
    too_big = post(base, edits, data={"prompt": "x"}, files={"image": ("a.png", png(65, 64), "image/png")})
    assert "at most 4096 pixels" in error(too_big, 400)["message"]
    # a decompression bomb: a 100000 x 100000 PNG header over a few bytes is refused before decoding
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + chunk(b"IEND", b"")
    )
    r = post(base, edits, data={"prompt": "x"}, files={"image": ("bomb.png", bomb, "image/png")})
    assert error(r, 400)["param"] == "image"
    # a JSON request cannot give a required image by path
    assert error(post(base, json={"prompt": "x", **FAST}), 400)["param"] == "edit_image"


def test_body_limit_is_413_before_reading(serve):
    base = serve(tiny("qwen-image"), max_body=1024)
    big = json.dumps({"prompt": "x" * 2000, **FAST}).encode()
    assert error(post(base, content=big, headers={"Content-Type": "application/json"}), 413)

    def chunked():  # no Content-Length: counted as it arrives
        yield big[:600]
        yield big[600:]

    assert error(post(base, content=chunked(), headers={"Content-Type": "application/json"}), 413)
    files = {"image": ("a.png", png(64, 64), "image/png")}
    assert error(post(base, "v1/images/edits", data={"prompt": "x"}, files=files), 413)
    assert post(base, json={"prompt": "x", **FAST}).status_code == 200


def test_loras_by_name_only(serve, tmp_path):
    from qi_plugins.lora.adapter import torch_module
    from qi_plugins.lora.tiny import save_tiny_lora

    pipe = tiny("qwen-image")
    folder = tmp_path / "loras"
    save_tiny_lora(folder / "style.safetensors", torch_module(pipe.components["dit"], "dit"), seed=0, std=0.5)
    outside = save_tiny_lora(
        tmp_path / "secret.safetensors", torch_module(pipe.components["dit"], "dit"), seed=1
    )
    (folder / "link.safetensors").symlink_to(outside)
    base = serve(pipe, lora_dir=folder)
    call = {"prompt": "x", "seed": 1, **FAST}
    for name in ("../secret", "/etc/passwd", "a/b", "..", ".hidden", "link", "style.safetensors", 3):
        r = post(base, json={**call, "loras": [{"name": name}]})
        assert error(r, 400)["param"] == "loras[0].name", name
    assert error(post(base, json={**call, "loras": [{"name": "style", "scale": "1"}]}), 400)["param"] == (
        "loras[0].scale"
    )
    before = pixels(base64.b64decode(post(base, json=call).json()["data"][0]["b64_json"]))
    r = post(base, json={**call, "loras": [{"name": "style", "scale": 1.0}]})
    assert r.status_code == 200
    assert (
        r.json()["parameters"]["loras"][0]["sha256"]
        == __import__("hashlib").sha256((folder / "style.safetensors").read_bytes()).hexdigest()
    )
    assert not np.array_equal(pixels(base64.b64decode(r.json()["data"][0]["b64_json"])), before)
    after = pixels(base64.b64decode(post(base, json=call).json()["data"][0]["b64_json"]))
    np.testing.assert_array_equal(after, before)  # removed after the job
    assert pipe.adapters == [] and httpx.get(base + "v1/pipeline").json()["loras"] == ["style"]


def test_job_progress_as_server_sent_events(serve):
    pipe = Gated(tiny("qwen-image"))  # the job waits until the stream is open, however busy the machine
    base = serve(pipe)
    r = post(base, "v1/jobs", json={"prompt": "x", "size": "16x16", "num_inference_steps": 3, "n": 2})
    assert r.status_code == 202
    job = r.json()["id"]
    events = []
    with httpx.stream("GET", f"{base}v1/jobs/{job}/events", timeout=60) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in s.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                events.append((kind, json.loads(line[6:])))
                pipe.gate.set()
    assert events[-1][0] == "done" and events[-1][1]["status"] == "succeeded"
    steps = [e["progress"]["step"] for k, e in events if k == "progress" and e["progress"]["total"] == 6]
    assert steps and steps == sorted(steps) and steps[-1] >= 5  # 2 images x 3 steps, in order
    got = httpx.get(f"{base}v1/jobs/{job}").json()
    assert got["progress"] == {"step": 6, "total": 6} and [d["seed"] for d in got["result"]["data"]] == [
        got["result"]["seed"],
        got["result"]["seed"] + 1,
    ]
    assert error(httpx.get(f"{base}v1/jobs/nope"), 404)


class Gated:
    """A pipeline whose calls wait for ``gate`` (a job that runs as long as the test wants), counted."""

    def __init__(self, pipe):
        self._pipe, self.gate, self.calls = pipe, threading.Event(), 0

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def __call__(self, **params):
        self.calls += 1
        assert self.gate.wait(30)
        return self._pipe(**params)


def test_a_client_that_disconnects_blocks_nothing(tmp_path):
    pipe = Gated(tiny("qwen-image"))
    with running(pipe, out_dir=tmp_path) as (base, app):
        with ThreadPoolExecutor(3) as pool:
            gone = [pool.submit(post, base, json={"prompt": "x", **FAST}, timeout=0.5) for _ in range(3)]
            for f in gone:
                with pytest.raises(httpx.TimeoutException):
                    f.result()
        deadline = time.monotonic() + 20  # the two jobs that had not started are cancelled, not run
        while sorted(j.status for j in app.state.worker._jobs.values()) != [
            "cancelled",
            "cancelled",
            "running",
        ]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pipe.gate.set()  # the running one finishes for nobody; the worker goes on
        assert post(base, json={"prompt": "x", **FAST}).status_code == 200
        assert pipe.calls == 2


def test_a_closing_server_refuses_new_jobs_with_503(tmp_path):
    with running(tiny("qwen-image"), out_dir=tmp_path) as (base, app):
        app.state.worker.close()  # what SIGTERM does first
        r = post(base, json={"prompt": "x", **FAST})
        assert error(r, 503)["type"] == "server_shutdown"
        assert error(post(base, "v1/jobs", json={"prompt": "x", **FAST}), 503)


def test_workers_share_the_one_queue(tmp_path, monkeypatch):
    """Two pipelines behind one queue: both take jobs, and each answer equals the call made in-process."""
    from serve_helpers import direct

    import qi_core as qi

    pipes = [tiny("qwen-image"), qi.compose("qwen-image", model="tiny", progress=False)]
    ran: dict[int, set[str]] = {id(p): set() for p in pipes}
    original = type(pipes[0]).__call__

    def recording(self, *args, **kwargs):  # which pipeline ran a call, on which worker thread
        ran[id(self)].add(threading.current_thread().name)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(pipes[0]), "__call__", recording)
    body = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 2, "seed": 3}
    with running(pipes, out_dir=tmp_path / "out") as (base, _):
        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(lambda _: post(base, json=body), range(6)))
    monkeypatch.undo()
    assert [r.status_code for r in results] == [200] * 6
    assert all(len(threads) == 1 for threads in ran.values())  # both served, each from its own thread
    assert ran[id(pipes[0])] != ran[id(pipes[1])]
    want = direct(pipes[0], prompt="a fox", height=64, width=64, num_inference_steps=2, seed=3)
    for r in results:
        assert np.array_equal(pixels(base64.b64decode(r.json()["data"][0]["b64_json"])), want)


def test_a_per_call_option_is_a_field(serve):
    """``cache`` (a per-call option of the cache plugin) as a JSON or form field: the image of the same call in
    Python, and the option in the image's record."""
    pipe = tiny("qwen-image")
    base = serve(pipe)
    fields = {"prompt": "a red cube", "size": "32x32", "num_inference_steps": 12, "seed": 3, "cfg_scale": 1.0}
    cache = {"threshold": 0.6}
    got = post(base, json={**fields, "cache": cache})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["parameters"]["options"] == {"cache": cache}
    want = pipe("a red cube", height=32, width=32, num_inference_steps=12, seed=3, cfg_scale=1.0, cache=cache,
                progress_bar_cmd=lambda x: x)  # fmt: skip
    plain = pipe("a red cube", height=32, width=32, num_inference_steps=12, seed=3, cfg_scale=1.0,
                 progress_bar_cmd=lambda x: x)  # fmt: skip
    image = pixels(base64.b64decode(body["data"][0]["b64_json"]))
    assert np.array_equal(image, np.asarray(want)) and not np.array_equal(image, np.asarray(plain))
    from qi_plugins.serve.calls import declared, form_fields

    for text, value in ((json.dumps(cache), cache), ("fbcache", "fbcache"), ("true", True)):  # a form's field
        assert form_fields(pipe, declared(pipe), [("prompt", "x"), ("cache", text)])[0]["cache"] == value
