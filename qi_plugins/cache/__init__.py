"""Step caches and regional compilation.

* Step runners ``first-block-cache`` (FBCache: the first block's output residual decides whether the other
  blocks' residual of the last computed step is reused) and ``teacache`` (TeaCache: the accumulated relative
  change of block 0's timestep-modulated input decides whether every block's residual is reused). Both work
  on a denoiser that offers the three stages ``enter`` / ``run_blocks`` / ``exit`` (``docs/cache.md``); any
  other denoiser runs as with the default ``batched`` runner.

      pipe = qi.compose("qwen-image", cache="fbcache")  # the option; per call too: pipe(..., cache=...)
      pipe = qi.compose("qwen-image", step_runner="first-block-cache")
      pipe = qi.compose("qwen-image", step_runner=FirstBlockCache(threshold=0.12, warmup=3))

* :func:`compile_blocks`: ``torch.compile`` on each repeated transformer block (regional compilation),
  dynamic in the sequence sizes, so other image sizes and fused-LoRA changes reuse the compiled code;
  ``qi.compose(..., compile=True)``.

Registration is cheap: torch is imported on first use.
"""

from __future__ import annotations

from typing import Any

from qi_core.hookspecs import hookimpl

QI_HOOK_API = 1
QI_REQUIRES = ("sampling",)  # the fallback for denoisers without stages is the default ``batched`` runner
_P = "qi_plugins.cache"


@hookimpl
def qi_register_options(register):
    register("cache", f"{_P}.options:cache", per_call=True, check=f"{_P}.options:cache_spec",
             help="a step cache as the step runner: True, first-block-cache | teacache, or {name, threshold, ...}")  # fmt: skip
    register("compile", f"{_P}.options:compile_", switch=True, check=f"{_P}.options:compile_settings",
             help="torch.compile the denoiser's repeated block: True, or {backend, mode, ...}")  # fmt: skip


@hookimpl
def qi_register_step_runners(register):
    register("first-block-cache", f"{_P}.runners:FirstBlockCache", aliases=("fbcache",))
    register("teacache", f"{_P}.runners:TeaCache")


def __getattr__(name: str) -> Any:  # the public objects, imported (with torch) on first use
    if name in ("FirstBlockCache", "TeaCache"):
        from qi_plugins.cache import runners

        return getattr(runners, name)
    if name in ("compile_blocks", "uncompile_blocks"):
        from qi_plugins.cache import compiling

        return getattr(compiling, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FirstBlockCache", "TeaCache", "compile_blocks", "uncompile_blocks"]
