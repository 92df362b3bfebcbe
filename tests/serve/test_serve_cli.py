"""``qi serve`` as a command: start-up refusals, and SIGTERM in the middle of a job."""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import direct, pixels, tiny

from qi_core.cli import main
from qi_plugins.serve.cli import configure

QI = str(Path(sys.executable).with_name("qi"))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_binding_beyond_loopback_needs_a_key(host, capsys, monkeypatch):
    monkeypatch.delenv("QI_API_KEY", raising=False)
    assert main(["serve", "--model", "tiny", "--host", host]) == 2
    assert f"--host {host} is reachable from other machines: give --api-key" in capsys.readouterr().err


def test_flags_are_checked_before_the_model_loads(capsys, tmp_path):
    assert main(["serve", "--queue", "0"]) == 2
    assert main(["serve", "--lora-dir", str(tmp_path / "nowhere")]) == 2
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    with busy:
        assert main(["serve", "--model", "tiny", "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_missing_server_packages_name_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn → ImportError
    assert main(["serve", "--model", "tiny"]) == 2
    assert "qi serve needs uvicorn: pip install 'qi[serve]'" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steps_lasting(pipe, seconds: float) -> int:
    """How many 32x32 steps of ``pipe`` take about ``seconds`` on this machine (at least 16)."""
    for _ in range(2):  # the second call is warm
        began = time.perf_counter()
        direct(pipe, prompt="x", height=32, width=32, seed=0, num_inference_steps=4)
        per_step = (time.perf_counter() - began) / 4
    return max(16, math.ceil(seconds / per_step))


def test_sigterm_finishes_the_running_job_refuses_the_rest_and_exits_0(tmp_path):
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([QI, "serve", "--model", "tiny", "--port", str(port), "--out-dir", str(tmp_path / "out")],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip
    events = []

    def follow(job_id):
        with httpx.stream("GET", f"http://127.0.0.1:{port}/v1/jobs/{job_id}/events", timeout=120) as stream:
            events.extend(line for line in stream.iter_lines() if line.startswith("data:"))

    try:
        pipe = tiny("qwen-image")  # composed in-process while the server starts: its image is the reference
        deadline = time.monotonic() + 90
        while "listening on" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        steps = steps_lasting(pipe, 1.5)  # a job that outlasts the few requests below, on any machine
        body = {
            "prompt": "x",
            "size": "32x32",
            "seed": 1,
            "num_inference_steps": steps,
            "response_format": "url",
        }
        running = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        running.request(
            "POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"}
        )
        time.sleep(0.2)  # sent whole above; the server takes it before the next one
        queued = httpx.post(f"http://127.0.0.1:{port}/v1/jobs", json={"prompt": "queued", "size": "16x16"})
        assert queued.status_code == 202
        follower = threading.Thread(target=follow, args=(queued.json()["id"],))
        follower.start()
        while not events:
            assert time.monotonic() < deadline + 30
            time.sleep(0.01)
        assert '"status": "queued"' in events[0]  # so the first job is running
        proc.send_signal(signal.SIGTERM)
        answer = running.getresponse()
        result = json.loads(answer.read())
        assert proc.wait(timeout=120) == 0
        follower.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert answer.status == 200, result
    last = json.loads(events[-1][5:])  # the waiting job was cancelled, and its followers told so
    assert last["status"] == "cancelled" and last["error"]["type"] == "server_shutdown"
    # the signal came while the job ran: uvicorn's shutdown line precedes the running request's access line
    assert text.index("Shutting down") < text.index('"POST /v1/images/generations HTTP/1.1" 200'), text
    name = result["data"][0]["url"].rsplit("/", 1)[1]
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]  # written whole, nothing half-written
    want = direct(pipe, prompt="x", height=32, width=32, seed=1, num_inference_steps=steps)
    np.testing.assert_array_equal(pixels((tmp_path / "out" / name).read_bytes()), want)
    with pytest.raises(httpx.ConnectError):  # new requests are refused
        httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", json={"prompt": "z"}, timeout=5)


def test_docs_list_every_flag():
    parser = argparse.ArgumentParser(prog="qi serve")
    configure(parser)
    text = (Path(__file__).parents[2] / "docs" / "serve.md").read_text()
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"]
    assert [f for f in flags if f"| `{f} " not in text] == []
