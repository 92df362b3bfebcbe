"""``qi serve``: an OpenAI-compatible image server (FastAPI + uvicorn) for one composed pipeline, with a job
queue, progress as server-sent events and a web page whose form is generated from the pipeline's declared
call parameters.

Registration is cheap: FastAPI, uvicorn and torch load when ``qi serve`` runs (``pip install 'qi[serve]'``).
"""

from __future__ import annotations

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = (
    "lora",
    "doors",
)  # request LoRAs load through lora; image records are written as doors writes them


@hookimpl
def qi_register_commands(register):
    register(
        "serve",
        "qi_plugins.serve.cli:configure",
        help="serve a pipeline over HTTP: OpenAI images API, jobs with progress, a web page",
    )
