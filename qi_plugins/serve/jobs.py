"""Jobs and the worker threads that run them, one pipeline a thread, one job at a time each (a pipeline is not
thread-safe).

A bounded queue holds the jobs waiting; a full queue refuses with :class:`QueueFullError` (HTTP 429, with a
Retry-After estimated from recent jobs). :meth:`Worker.close` refuses new jobs (:class:`ShuttingDownError`,
HTTP 503), cancels the waiting ones and lets the running one finish. Jobs change state in the worker thread;
the event loop awaits those changes with :meth:`Job.changed`, woken through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from qi_core.errors import QiError

log = logging.getLogger("qi.serve")

FINAL = ("succeeded", "failed", "cancelled")


class QueueFullError(QiError):
    """The job queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDownError(QiError):
    """The server is shutting down and takes no new jobs."""


def error_body(message: str, type_: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


class Job:
    """One request's work: its state, progress (steps done of all its images' steps), result or error."""

    def __init__(self, call: Any, base_url: str = ""):
        self.id = secrets.token_hex(16)  # 128 random bits: ids (and file names) are not guessable
        self.call = call
        self.base_url = base_url  # where the result's file URLs point
        self.status = "queued"
        self.step = 0
        self.total = 0
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.http_status = 200  # the status a request waiting for this job answers with
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.version = 0
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def done(self) -> bool:
        return self.status in FINAL

    def snapshot(self) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it (one consistent state)."""
        with self._lock:
            return {
                "id": self.id,
                "object": "job",
                "status": self.status,
                "progress": {"step": self.step, "total": self.total},
                "created": self.created,
                "started": self.started,
                "finished": self.finished,
                "result": self.result,
                "error": self.error,
            }

    # -- changes (worker thread) -------------------------------------------------------------------------
    def update(self, **fields: Any) -> None:
        """Set fields and wake every coroutine waiting in :meth:`changed`. The status is set last: whoever sees
        a final status sees its result or error."""
        with self._lock:
            for k, v in sorted(fields.items(), key=lambda kv: kv[0] == "status"):
                setattr(self, k, v)
            self.version += 1
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: nobody is waiting any more
                pass

    def fail(self, http_status: int, body: dict[str, Any], status: str = "failed") -> None:
        self.update(status=status, error=body["error"], http_status=http_status, finished=time.time())

    def progress_bar(self, index: int, count: int) -> Callable[[Iterable[Any]], Iterator[Any]]:
        """A ``progress_bar_cmd`` for image ``index`` of ``count``: reports each finished step of the loop."""

        def bar(steps: Iterable[Any]) -> Iterator[Any]:
            steps = list(steps)
            per = len(steps)
            self.update(step=index * per, total=count * per)
            for i, s in enumerate(steps):
                yield s
                self.update(step=index * per + i + 1)

        return bar

    # -- waiting (event loop) ----------------------------------------------------------------------------
    async def changed(self, version: int, timeout: float | None = None) -> int:
        """Wait until the job changes after ``version`` (or ``timeout`` seconds pass); the current version."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            if self.version != version:
                return self.version
            self._waiters.append(waiter)
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except asyncio.TimeoutError:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return self.version


class Worker:
    """Runs jobs with ``run(job) -> result``, one at a time in each of its threads (one thread per function in
    ``run``, when a list: one pipeline each, behind the one queue); at most ``capacity`` jobs wait.

    ``run`` raising a :class:`QiError` fails the job with 400 (the error names the parameter where it can);
    anything else fails it with 500 and is logged; the worker goes on with the next job either way.
    """

    def __init__(self, run: Callable[[Job], dict[str, Any]] | list[Callable[[Job], dict[str, Any]]],
                 capacity: int, keep: int = 64):  # fmt: skip
        self._runs = list(run) if isinstance(run, (list, tuple)) else [run]
        self.capacity = capacity
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=capacity)
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._keep = keep  # finished jobs remembered for GET /v1/jobs/{id}
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._loop, args=(r,), name=f"qi-serve-worker-{k}", daemon=True)
                         for k, r in enumerate(self._runs)]  # fmt: skip
        self._seconds = 0.0  # moving average of a job's run time, for Retry-After
        self.closing = False

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def submit(self, call: Any, base_url: str = "") -> Job:
        """Queue a job; QueueFullError when ``capacity`` jobs wait already, ShuttingDownError when closing."""
        job = Job(call, base_url)
        with self._lock:
            if self.closing:
                raise ShuttingDownError("the server is shutting down and takes no new jobs")
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                wait = max(1, math.ceil(self._seconds * (self.capacity + 1) / len(self._runs)))
                raise QueueFullError(
                    f"the queue is full ({self.capacity} jobs waiting); retry in about {wait} s", wait
                ) from None
            self._jobs[job.id] = job
            self._forget_old()
        return job

    def forget(self, job: Job) -> None:
        """Stop listing a job (``get`` no longer finds it); it still runs if it was to."""
        with self._lock:
            self._jobs.pop(job.id, None)

    def cancel(self, job: Job, message: str, http_status: int = 499) -> bool:
        """Cancel a job that has not started (the worker skips it); False when it already runs or ran."""
        with self._lock:
            if job.status != "queued":
                return False
            job.fail(http_status, error_body(message, "cancelled"), status="cancelled")
            return True

    def close(self) -> None:
        """Take no new jobs, cancel the waiting ones (503), let the running ones finish and stop the threads."""
        with self._lock:
            if self.closing:
                return
            self.closing = True
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None and job.status == "queued":
                    job.fail(503, error_body("the server shut down before this job started", "server_shutdown"),
                             status="cancelled")  # fmt: skip
        for _ in self._threads:  # one stop mark a thread (a full queue frees a place as each thread stops)
            self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.done]
        for k in finished[: max(0, len(finished) - self._keep)]:
            del self._jobs[k]

    def _loop(self, run: Callable[[Job], dict[str, Any]]) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                if job.status != "queued":  # cancelled while waiting
                    continue
                job.update(status="running", started=time.time())
            self._execute(job, run)

    def _execute(self, job: Job, run: Callable[[Job], dict[str, Any]]) -> None:
        began = time.perf_counter()
        try:
            result = run(job)
        except QiError as e:
            job.fail(400, error_body(str(e), "invalid_request_error", getattr(e, "param", None)))
        except Exception as e:  # the worker must outlive any one job
            log.exception("job %s failed", job.id)
            job.fail(500, error_body(f"internal error: {type(e).__name__}: {e}", "server_error"))
        else:
            job.update(status="succeeded", result=result, finished=time.time())
        seconds = time.perf_counter() - began
        self._seconds = seconds if not self._seconds else 0.7 * self._seconds + 0.3 * seconds
