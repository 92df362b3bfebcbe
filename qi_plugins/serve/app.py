"""The FastAPI app of ``qi serve``: the OpenAI images API, jobs with progress as server-sent events, output
files and the web page, over one composed pipeline run by one worker thread.

Every ``/v1`` route needs the API key when one is set (``Authorization: Bearer KEY``, compared with
``hmac.compare_digest``); bodies over ``max_body`` bytes are refused with 413 before they are read whole.
Errors have the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from qi_core.errors import InvalidInputError, QiError
from qi_plugins.serve.calls import (
    FORMATS,
    MAX_N,
    Call,
    declared,
    decode_image,
    form_fields,
    option_specs,
    parse_request,
    settable,
    upload_targets,
)
from qi_plugins.serve.jobs import FINAL, Job, QueueFullError, ShuttingDownError, Worker, error_body
from qi_plugins.serve.loras import LoraFolder, invalid
from qi_plugins.serve.runner import run_call

MiB = 2**20
#: A served file: ``{job id}-{image}[-{layer}].{png,jpg,webp}`` (job ids are random: the names are not guessable).
FILE_NAME = re.compile(r"[0-9a-f]{32}-\d+(?:-\d+)?\.(?:png|jpg|webp)")
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".webp": "image/webp"}
KEEP_ALIVE_S = 15.0  # an SSE comment line this often keeps proxies from closing a quiet stream


class BodyTooLargeError(QiError):
    """A request body is larger than the server takes (HTTP 413)."""


def _error(status: int, message: str, type_: str, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(error_body(message, type_, param), status_code=status, headers=headers)


class Guard:
    """ASGI middleware: the API key on ``/v1`` routes, and the body limit (Content-Length checked before
    anything is read; a body without one is counted as it arrives)."""

    def __init__(self, app: Any, api_key: str | None, max_body: int):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.max_body = max_body

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        api = (scope["path"] + "/").startswith("/v1/")
        if self.key is not None and api and not self._authorized(headers):
            response = _error(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                              "authentication_error", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
            await response(scope, receive, send)
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            await _error(413, self._message(), "invalid_request_error")(scope, receive, send)
            return
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise BodyTooLargeError(self._message())
            return message

        await self.app(scope, counted, send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)

    def _message(self) -> str:
        return f"request body over {self.max_body / MiB:g} MiB (qi serve --max-body-mb)"


def create_app(pipe: Any, *, api_key: str | None = None, queue: int = 16, lora_dir: str | Path | None = None,
               out_dir: str | Path = "qi-serve-output", max_body: int = 32 * MiB,
               max_pixels: int = 4096 * 4096) -> FastAPI:  # fmt: skip
    """The app serving ``pipe`` (a composed pipeline, or a list of equal ones: one worker thread each, e.g. one
    per device, behind the one queue). ``queue``: jobs that may wait (more: 429).
    ``lora_dir``: the folder of LoRAs requests may name. ``out_dir``: where ``url`` images are written.
    ``max_body``: the largest request body in bytes (413). ``max_pixels``: the largest image, uploaded or
    generated (400).
    The worker thread starts and stops with the app's lifespan; ``app.state.worker`` is it."""
    if queue < 1:
        raise InvalidInputError(f"queue must be at least 1, got {queue}")
    out = Path(out_dir)
    loras = LoraFolder(lora_dir) if lora_dir is not None else None
    pipes = list(pipe) if isinstance(pipe, (list, tuple)) else [pipe]
    pipe = pipes[0]  # the one requests are checked against (the others are equal)
    worker = Worker([lambda job, p=p: run_call(p, job, out, loras) for p in pipes], capacity=queue)
    specs = declared(pipe)
    image_param, mask_param = upload_targets(specs)
    page = (files("qi_plugins.serve") / "page" / "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        worker.close()
        await asyncio.to_thread(worker.join)

    app = FastAPI(title="qi serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(Guard, api_key=api_key, max_body=max_body)

    # -- errors ------------------------------------------------------------------------------------------
    @app.exception_handler(QueueFullError)
    async def _queue_full(request: Request, e: QueueFullError):
        return _error(429, str(e), "rate_limit_error", headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(ShuttingDownError)
    async def _shutting_down(request: Request, e: ShuttingDownError):
        return _error(503, str(e), "server_shutdown")

    @app.exception_handler(BodyTooLargeError)
    async def _too_large(request: Request, e: BodyTooLargeError):
        return _error(413, str(e), "invalid_request_error")

    @app.exception_handler(QiError)
    async def _qi_error(request: Request, e: QiError):
        return _error(400, str(e), "invalid_request_error", getattr(e, "param", None))

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException):
        return _error(e.status_code, str(e.detail), "invalid_request_error", headers=e.headers)

    # -- requests → calls --------------------------------------------------------------------------------
    async def json_call(request: Request) -> Call:
        try:
            fields = json.loads(await request.body() or b"null")
        except ValueError as err:
            raise invalid(f"the body must be a JSON object ({err})", None) from None
        if not isinstance(fields, dict):
            raise invalid("the body must be a JSON object of request fields", None)
        return parse_request(pipe, specs, fields, loras=loras, max_pixels=max_pixels)

    async def form_call(request: Request, image_required: bool) -> Call:
        form = await request.form(max_files=64, max_fields=256)
        try:
            fields, uploads = form_fields(pipe, specs, list(form.multi_items()))
            if image_required and not any(target == image_param for target, _, _ in uploads):
                raise invalid(f"image is required: the image(s) for {image_param or 'the pipeline'}", "image")
            images: dict[str, list[Any]] = {}
            for target, name, upload in uploads:
                data = await upload.read()
                images.setdefault(target, []).append(
                    await run_in_threadpool(decode_image, data, name, max_pixels)
                )
        finally:
            await form.close()
        return parse_request(pipe, specs, fields, images, loras=loras, max_pixels=max_pixels)

    def submit(request: Request, call: Call) -> Job:
        return worker.submit(call, str(request.base_url))

    async def answer(request: Request, job: Job) -> Response:
        """Wait for the job; a client that goes away cancels it if it has not started (else it finishes)."""
        version = job.version
        while not job.done:
            version = await job.changed(version, timeout=1.0)
            if not job.done and await request.is_disconnected():
                worker.cancel(job, "the client disconnected before the job started")
                return Response(status_code=499)
        snap = job.snapshot()
        worker.forget(job)  # answered: nobody looks it up by id (its requester never learnt the id)
        if snap["status"] == "succeeded":
            return JSONResponse(snap["result"])
        return JSONResponse({"error": snap["error"]}, status_code=job.http_status)

    # -- routes ------------------------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": pipe.name, "object": "model", "owned_by": "qi",
                                            "created": 0, "weights": str(pipe.model)}]}  # fmt: skip

    @app.get("/v1/pipeline")
    async def pipeline() -> dict[str, Any]:
        """The served pipeline and the declared parameters a request can set (the page's form)."""
        return {
            "name": pipe.name,
            "model": str(pipe.model),
            "parameters": [*(s for s in specs.values() if settable(s)), *option_specs()],
            "required": list(pipe.required),
            "image_parameter": image_param,
            "mask_parameter": mask_param,
            "size_multiple": pipe.size_multiple,
            "max_n": MAX_N,
            "output_formats": list(FORMATS),
            "loras": loras.names() if loras else [],
        }

    @app.post("/v1/images/generations")
    async def generations(request: Request) -> Response:
        return await answer(request, submit(request, await json_call(request)))

    @app.post("/v1/images/edits")
    async def edits(request: Request) -> Response:
        return await answer(request, submit(request, await form_call(request, image_required=True)))

    @app.post("/v1/jobs", status_code=202)
    async def create_job(request: Request) -> JSONResponse:
        """Queue a job (a generations JSON body, or an edits form) and answer at once with its id."""
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        call = await (form_call(request, image_required=False) if multipart else json_call(request))
        return JSONResponse(submit(request, call).snapshot(), status_code=202)

    def find(job_id: str) -> Job:
        job = worker.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r} (finished jobs are kept for a while only)")
        return job

    @app.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        return find(job_id).snapshot()

    @app.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str) -> StreamingResponse:
        """Server-sent events: ``progress`` ({id, status, progress}) on each change, then ``done`` (the job)."""
        job = find(job_id)

        async def stream():
            version = -1
            while True:
                current = job.version
                if current != version:
                    version = current
                    snap = job.snapshot()
                    if snap["status"] in FINAL:
                        yield f"event: done\ndata: {json.dumps(snap)}\n\n"
                        return
                    brief = {k: snap[k] for k in ("id", "status", "progress")}
                    yield f"event: progress\ndata: {json.dumps(brief)}\n\n"
                else:
                    yield ": keep-alive\n\n"
                await job.changed(version, timeout=KEEP_ALIVE_S)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @app.get("/v1/files/{name}")
    async def output_file(name: str) -> FileResponse:
        path = out / name
        if not FILE_NAME.fullmatch(name) or not path.is_file():
            raise HTTPException(404, f"no file {name!r}")
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix])

    return app
