"""What ``qi serve`` adds on top of the pipeline, on the tiny model: the time from a request to its first
progress event, and the throughput (images per minute) for a few request counts, next to the same images
generated in-process through ``qi.compose`` (the ratio server/direct is the server's cost; 1.00 = none).

    python benchmarks/serve_latency.py [--counts 1 4 16] [--size 64] [--steps 4] [--repeats 5] [--rounds 3]

The server is a real ``qi serve --model tiny`` process on a free loopback port; the requests come from threads
of this process, all at once (the server runs them one at a time); each count runs ``--rounds`` times and the
fastest round counts, for the server and the direct run alike. The server is stopped before the direct run, so
the two never share the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(pipeline: str, port: int, log: Path, out_dir: str) -> subprocess.Popen:
    qi = str(Path(sys.executable).with_name("qi"))
    cmd = [qi, "serve", "--pipeline", pipeline, "--model", "tiny", "--port", str(port), "--queue", "256",
           "--out-dir", out_dir]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
    deadline = time.monotonic() + 300
    while "listening on" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"qi serve did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc


def first_progress(client: httpx.Client, body: dict) -> float:
    """Seconds from POST /v1/jobs to the first event of the denoising loop (progress with a step total)."""
    began = time.perf_counter()
    job = client.post("v1/jobs", json=body).json()["id"]
    seen = None
    with client.stream("GET", f"v1/jobs/{job}/events") as events:
        for line in events.iter_lines():
            if line.startswith("data:") and seen is None and json.loads(line[5:])["progress"]["total"] > 0:
                seen = time.perf_counter() - began
    return seen


def fastest(rounds: int, run, count: int) -> float:
    """The fastest of ``rounds`` runs of ``run(count)``, in seconds."""
    times = []
    for _ in range(rounds):
        began = time.perf_counter()
        run(count)
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default="qwen-image")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 4, 16], help="concurrent request counts")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="latency samples")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs of each request count; the fastest counts"
    )
    args = parser.parse_args()
    body = {"prompt": "a red fox in the snow", "size": f"{args.size}x{args.size}", "seed": 0,
            "num_inference_steps": args.steps}  # fmt: skip

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(args.pipeline, port, Path(tmp) / "server.log", str(Path(tmp) / "out"))
        try:
            limits = httpx.Limits(max_connections=max(args.counts) + 2)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}/", timeout=600, limits=limits) as client:

                def generate(i: int) -> None:
                    client.post("v1/images/generations", json={**body, "seed": i}).raise_for_status()

                def burst(count: int) -> None:
                    with ThreadPoolExecutor(count) as pool:
                        list(pool.map(generate, range(count)))

                generate(0)  # warm-up
                latency = [first_progress(client, body) for _ in range(args.repeats)]
                served = {count: fastest(args.rounds, burst, count) for count in args.counts}
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    import torch

    import qi_core as qi

    pipe = qi.compose(args.pipeline, model="tiny", progress=False)
    call = {"prompt": body["prompt"], "height": args.size, "width": args.size, "num_inference_steps": args.steps,
            "progress_bar_cmd": lambda steps: steps}  # fmt: skip

    def direct_run(count: int) -> None:
        for i in range(count):
            pipe(seed=i, **call)

    direct_run(1)  # warm-up
    direct = {count: fastest(args.rounds, direct_run, count) for count in args.counts}

    print(f"qi serve on {args.pipeline} tiny, {args.size}x{args.size}, {args.steps} steps, CFG on; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"fastest of {args.rounds} rounds")  # fmt: skip
    print(f"request → first progress event: median {statistics.median(latency) * 1000:.0f} ms "
          f"(min {min(latency) * 1000:.0f}, max {max(latency) * 1000:.0f}, {len(latency)} requests, idle server)")  # fmt: skip
    print(
        f"{'requests':>8}  {'server s':>9}  {'img/min':>8}  {'direct s':>9}  {'img/min':>8}  {'server/direct':>13}"
    )
    for count in args.counts:
        s, d = served[count], direct[count]
        print(
            f"{count:>8}  {s:>9.2f}  {count / s * 60:>8.1f}  {d:>9.2f}  {count / d * 60:>8.1f}  {s / d:>13.2f}"
        )


if __name__ == "__main__":
    main()
