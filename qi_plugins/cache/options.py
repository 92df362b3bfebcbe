"""The cache plugin's compose options: ``cache=`` (a step cache as the pipeline's step runner; also per call) and
``compile=`` (regional compilation of the denoiser's repeated block).

    pipe = qi.compose("qwen-image", cache="fbcache", compile=True)
    pipe(prompt, num_inference_steps=50, cache={"name": "teacache", "threshold": 0.2})
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from typing import Any

from qi_core.errors import InvalidInputError
from qi_core.pipeline import build_part

#: the step caches by the names ``cache=`` takes (True: the first)
CACHES = ("first-block-cache", "fbcache", "teacache")
#: step runners a cache may replace (a cache computes everything on one device, as these do)
REPLACEABLE = ("batched",)


def cache_spec(value: Any) -> dict[str, Any] | None:
    """``cache=`` as a step-runner spec: True → ``first-block-cache``; a name; ``{"name": NAME, **options}``; or
    options alone (``{"threshold": 0.1}``: the first-block cache with them). None or False: no cache."""
    if value is None or value is False:
        return None
    if value is True:
        return {"name": CACHES[0]}
    if isinstance(value, str):
        spec = {"name": value}
    elif isinstance(value, dict):
        spec = {"name": CACHES[0], **value}
    else:
        raise InvalidInputError(
            f"cache must be True, a cache name ({', '.join(CACHES)}) or a dict of options, got {value!r}"
        )
    if spec["name"] not in CACHES:
        raise InvalidInputError(
            f"cache {spec['name']!r} is not a step cache; choose one of {', '.join(CACHES)}"
        )
    return spec


def cache(pipe: Any, value: Any) -> Callable[[], None] | None:
    """Make a step cache the pipeline's step runner (refused over a runner that is not the default one, such as
    ``parallel``: a cache and that runner cannot share the step); returns the undo."""
    spec = cache_spec(value)
    if spec is None:
        return None
    previous = pipe.step_runner
    name = previous if isinstance(previous, str) else getattr(previous, "name", type(previous).__name__)
    if name not in (*REPLACEABLE, *CACHES):
        raise InvalidInputError(
            f"cache= replaces the step runner, but this pipeline runs {name!r}; a step cache runs on one "
            "device and cannot be combined with it: drop one of the two"
        )
    pipe.step_runner = build_part("step_runner", spec)

    def undo() -> None:
        pipe.step_runner = previous

    return undo


def compile_settings(value: Any) -> dict[str, Any] | None:
    """``compile=`` as :func:`compile_blocks` keywords (None: off)."""
    if value is None or value is False:
        return None
    if value is not True and not isinstance(value, dict):
        raise InvalidInputError(
            f"compile must be True, False or a dict of torch.compile options, got {value!r}"
        )
    known = ("backend", "mode", "dynamic", "fullgraph", "options")
    unknown = [k for k in (value if isinstance(value, dict) else ()) if k not in known]
    if unknown:
        raise InvalidInputError(f"compile has no setting {unknown[0]!r}; settings: {', '.join(known)}")
    return {} if value is True else dict(value)


def compile_(pipe: Any, value: Any) -> Callable[[], None] | None:
    """``compile=True`` (inductor) or ``compile={"backend": ..., "mode": ...}``: :func:`compile_blocks` on the
    pipeline's denoiser. On a CPU without a C++ compiler inductor cannot build code: a warning, and nothing
    changes (name another backend to compile anyway)."""
    from qi_plugins.cache.compiling import compile_blocks, uncompile_blocks

    if value is None or value is False:
        return None
    if value is not True and not isinstance(value, dict):
        raise InvalidInputError(
            f"compile must be True, False or a dict of torch.compile options, got {value!r}"
        )
    options = {} if value is True else dict(value)
    backend = options.get("backend", "inductor")
    if (
        backend == "inductor"
        and pipe.device.type == "cpu"
        and not (shutil.which("c++") or shutil.which("g++"))
    ):
        warnings.warn(
            "compile=True does nothing here: inductor needs a C++ compiler for CPU code and none is on PATH "
            "(install g++, or pass compile={'backend': 'aot_eager'})",
            UserWarning,
            stacklevel=3,
        )
        return None
    role = pipe.roles["denoiser"]
    compile_blocks(pipe, role=role, **options)
    return lambda: uncompile_blocks(pipe, role=role)
